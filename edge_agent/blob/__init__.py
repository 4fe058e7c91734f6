"""Signed, parameter-only update blobs: schema, format, Ed25519 keys, known-answer tests."""

from edge_agent.blob.errors import REJECT_REASONS, BlobRejectedError, RejectReason
from edge_agent.blob.header import BlobHeader
from edge_agent.blob.kat import KnownAnswers, check_known_answers, make_known_answers
from edge_agent.blob.keys import (
    KeyFileError,
    SigningKey,
    generate_key,
    key_id_of,
    load_public_key,
    load_signing_key,
    trusted_keys,
    verify_signature,
    write_keypair,
)
from edge_agent.blob.parameter_set import ParameterSet
from edge_agent.blob.schema import ParameterSchema
from edge_agent.blob.signed_blob import VerifiedBlob, build_blob, inspect_header, verify_blob

__all__ = [
    "REJECT_REASONS",
    "BlobHeader",
    "BlobRejectedError",
    "KeyFileError",
    "KnownAnswers",
    "ParameterSchema",
    "ParameterSet",
    "RejectReason",
    "SigningKey",
    "VerifiedBlob",
    "build_blob",
    "check_known_answers",
    "generate_key",
    "inspect_header",
    "key_id_of",
    "load_public_key",
    "load_signing_key",
    "make_known_answers",
    "trusted_keys",
    "verify_blob",
    "verify_signature",
    "write_keypair",
]
