"""``python -m service.registry DATABASE_URL``: migrate a registry database to the head revision."""

from __future__ import annotations

import sys

from service.registry.errors import RegistryError
from service.registry.migrate import head_revision, upgrade_to_head


def main(argv: list[str] | None = None) -> int:
    """Migrate the database at the one argument; print the revision, or one error line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m service.registry DATABASE_URL", file=sys.stderr)
        return 2
    try:
        upgrade_to_head(args[0])
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"registry at revision {head_revision()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
