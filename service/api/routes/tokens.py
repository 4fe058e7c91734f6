"""API tokens (admin only). Creating and revoking are audited, actor = the caller's token name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from service.api.auth import Admin
from service.api.deps import RegistryDep
from service.api.schemas import TOKEN_NAME_PATTERN, TokenCreate, TokenCreated, TokenList, TokenOut

router = APIRouter(tags=["tokens"])

TokenName = Annotated[str, Path(pattern=TOKEN_NAME_PATTERN, description="Token name.")]


@router.get("/tokens", response_model=TokenList)
def list_tokens(_: Admin, registry: RegistryDep) -> TokenList:
    """Every token, revoked ones too (names, roles, times; never secrets)."""
    return TokenList(items=[TokenOut.of(t) for t in registry.list_tokens()])


@router.post(
    "/tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "The name is taken."}},
)
def create_token(body: TokenCreate, admin: Admin, registry: RegistryDep) -> TokenCreated:
    """Create a token; the response carries its secret, shown this once (only a hash is kept)."""
    record, plaintext = registry.create_token(body.name, body.role, actor=admin.name)
    return TokenCreated.of_new(record, plaintext)


@router.delete(
    "/tokens/{name}",
    response_model=TokenOut,
    responses={404: {"description": "No such token."}, 409: {"description": "Already revoked."}},
)
def revoke_token(name: TokenName, admin: Admin, registry: RegistryDep) -> TokenOut:
    """Revoke a token: it is refused from now on; its row (and name) stays for the audit trail."""
    return TokenOut.of(registry.revoke_token(name, actor=admin.name))
