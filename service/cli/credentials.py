"""``tinydrift credentials``: Mosquitto passwords for devices and the service, and the ACL check.

A device's MQTT username is its device id (= client id, ``edge_agent/README.md`` §1); the broker
keeps one ``username:hash`` line per account in its ``password_file``. Entries are written by
``mosquitto_passwd`` when it is on ``PATH`` (the password goes over its stdin, never on a command
line where ``ps`` would show it), otherwise hashed here in Mosquitto 2's own format::

    username:$7$<iterations>$<base64 salt, 12 bytes>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>

(``src/password_mosq.c`` and ``apps/mosquitto_passwd/mosquitto_passwd.c`` in eclipse/mosquitto:
salt length 12, ``PW_DEFAULT_ITERATIONS`` 101, standard base64 with padding). Mosquitto verifies
every CONNECT on its single thread, so the iteration count is its default: 100,000 devices
reconnecting after a broker restart cost 100,000 hashes.

The ACL (``deploy/acl``) confines devices with ``%u`` patterns, so adding a device needs no ACL
entry; ``tinydrift credentials acl`` checks that the patterns (and the service's block) are there.

>>> entry = hash_password("s3cret", salt=bytes(12))
>>> entry.split("$")[:4]
['', '7', '101', 'AAAAAAAAAAAAAAAA']
>>> verify_password(entry, "s3cret"), verify_password(entry, "wrong")
(True, False)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from edge_agent.wire.errors import WireError
from edge_agent.wire.topics import PREFIX, Leaf, validate_id
from service.cli.errors import fail

app = typer.Typer(
    help="Broker accounts: device and service passwords, the ACL check.", no_args_is_help=True
)

SERVICE_USERNAME = "tinydrift-service"
"""The service's broker account (``deploy/acl`` grants it ``td/v1/#``)."""
PBKDF2_ITERATIONS = 101
"""Mosquitto 2's default (``PW_DEFAULT_ITERATIONS``), what ``mosquitto_passwd`` writes."""
SALT_LEN = 12
HASH_LEN = 64
MAX_PASSWORD_LEN = 1024
DEVICE_WRITES: tuple[Leaf, ...] = (Leaf.TEL, Leaf.LBL, Leaf.STATUS, Leaf.ACK, Leaf.BLOB_GET)
"""Leaves a device publishes (device → service)."""
DEVICE_READS: tuple[Leaf, ...] = (Leaf.DESIRED, Leaf.BLOB_DATA)
"""Leaves a device subscribes to (service → device)."""


class CredentialsError(Exception):
    """A password file or ACL cannot be used; the message is one line naming the fix."""


# -- hashing ----------------------------------------------------------------------------------


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The Mosquitto 2 hash field ``$7$iterations$salt$hash`` for ``password``."""
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    if len(salt) != SALT_LEN:
        raise ValueError(f"salt must be {SALT_LEN} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_LEN)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(field: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$…`` hash field (as the broker checks a CONNECT)."""
    parts = field.strip().split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if iterations < 1 or len(salt) != SALT_LEN:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(got, expected)


# -- the password file ------------------------------------------------------------------------


def read_entries(path: Path) -> dict[str, str]:
    """``username → hash field`` as Mosquitto reads the file (``#`` comments, no-colon lines
    skipped); an absent file has no entries."""
    if path.exists() and not path.is_file():
        raise CredentialsError(f"{path} is not a file (give --password-file a file path)")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        user, _, field = line.partition(":")
        entries[user.strip()] = field.strip()
    return entries


def _ensure_file(path: Path) -> None:
    """Create an empty password file readable by its owner only, if there is none."""
    if path.exists():
        if not path.is_file():
            raise CredentialsError(f"{path} is not a file (give --password-file a file path)")
        return
    if not path.parent.is_dir():
        raise CredentialsError(f"directory {path.parent} does not exist (create it first)")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise CredentialsError(f"cannot create {path}: {exc.strerror}") from None


def _rewrite(path: Path, username: str, field: str | None) -> None:
    """Replace (or append, or with ``field=None`` remove) ``username``'s line, keeping every
    other line and the file's mode.

    The file is rewritten in place, as ``mosquitto_passwd`` does, not replaced by a new one: a
    single-file bind mount (docker-compose.yml) keeps showing the old inode after a rename.
    """
    lines = path.read_text().splitlines()
    out: list[str] = []
    placed = False
    for line in lines:
        user = line.partition(":")[0].strip()
        if not line.startswith("#") and ":" in line and user == username:
            if field is not None and not placed:
                out.append(f"{username}:{field}")
                placed = True
            continue
        out.append(line)
    if field is not None and not placed:
        out.append(f"{username}:{field}")
    with path.open("r+") as f:
        f.write("".join(f"{line}\n" for line in out))
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def mosquitto_passwd() -> str | None:
    """Path of ``mosquitto_passwd``, if installed."""
    return shutil.which("mosquitto_passwd")


def write_entry(path: Path, username: str, password: str, *, tool: str | None) -> str:
    """Set ``username``'s password in ``path`` (created 0600 if absent) with ``tool`` (the
    ``mosquitto_passwd`` binary) or, when ``tool`` is None, in Python. Returns what hashed it."""
    _ensure_file(path)
    if tool is None:
        try:
            _rewrite(path, username, hash_password(password))
        except OSError as exc:
            raise CredentialsError(f"cannot write {path}: {exc.strerror}") from None
        return "tinydrift (PBKDF2-SHA512, Mosquitto 2 format)"
    # interactive mode reads the password twice from stdin: it never appears in argv
    done = subprocess.run(
        [tool, str(path), username],
        input=f"{password}\n{password}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
        raise CredentialsError(f"mosquitto_passwd failed on {path}: {why[-1]}")
    return "mosquitto_passwd"


def remove_entry(path: Path, username: str) -> bool:
    """Remove ``username``'s line; whether there was one."""
    if username not in read_entries(path):
        return False
    try:
        _rewrite(path, username, None)
    except OSError as exc:
        raise CredentialsError(f"cannot write {path}: {exc.strerror}") from None
    return True


# -- the ACL ----------------------------------------------------------------------------------


def acl_text(service_username: str = SERVICE_USERNAME) -> str:
    """The pattern-based ACL: each device confined to its own id, the service to ``td/v1``."""
    lines = [
        "# Each device is its own MQTT username (= client id = device id). %u is the username.",
        "# A device may publish only under its own id, and read only its own desired state and "
        "blob chunks.",
        *(f"pattern write {PREFIX}/+/%u/{leaf.value}" for leaf in DEVICE_WRITES),
        *(f"pattern read {PREFIX}/+/%u/{leaf.value}" for leaf in DEVICE_READS),
        "",
        "# The service reads everything tinydrift and writes desired state and blob chunks.",
        f"user {service_username}",
        f"topic read {PREFIX}/#",
        *(f"topic write {PREFIX}/+/+/{leaf.value}" for leaf in DEVICE_READS),
    ]
    return "\n".join(lines) + "\n"


def _acl_rules(text: str) -> tuple[set[str], dict[str, set[str]], list[str]]:
    """``(patterns, topics by user, anonymous topics)`` of an ACL, each rule ``access topic``."""
    patterns: set[str] = set()
    users: dict[str, set[str]] = {}
    anonymous: list[str] = []
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "user":
            current = rest
            users.setdefault(current, set())
            continue
        if word not in ("topic", "pattern"):
            continue
        access, _, topic = rest.partition(" ")
        if access not in ("read", "write", "readwrite", "deny"):  # "topic TOPIC" = readwrite
            access, topic = "readwrite", rest
        rule = f"{access} {topic.strip()}"
        if word == "pattern":
            patterns.add(rule)
        elif current is None:
            anonymous.append(rule)
        else:
            users[current].add(rule)
    return patterns, users, anonymous


def check_acl(text: str, service_username: str = SERVICE_USERNAME) -> list[str]:
    """Problems of an ACL against :func:`acl_text` (empty: it confines every device)."""
    want_patterns, want_users, _ = _acl_rules(acl_text(service_username))
    patterns, users, _anonymous = _acl_rules(text)
    problems = [f"missing 'pattern {r}'" for r in sorted(want_patterns - patterns)]
    for rule in sorted(patterns - want_patterns):
        access, _, topic = rule.partition(" ")
        levels = topic.split("/")
        own = len(levels) > 3 and levels[3] in ("%u", "%c") and "#" not in levels[:4]
        if access != "deny" and not own:
            problems.append(f"'pattern {rule}' grants every device more than its own topics")
    have = users.get(service_username)
    if have is None:
        problems.append(f"no 'user {service_username}' block for the service")
    else:
        problems += [
            f"missing 'topic {r}' under 'user {service_username}'"
            for r in sorted(want_users[service_username] - have)
        ]
    return problems


# -- the command line -------------------------------------------------------------------------

PasswordFile = Annotated[
    Path,
    typer.Option(
        "--password-file",
        help="Mosquitto password_file to update (created 0600 if absent), e.g. deploy/passwd.",
    ),
]
PasswordStdin = Annotated[
    bool,
    typer.Option(
        "--password-stdin", help="Read the password from the first line of stdin; else generate."
    ),
]
Replace = Annotated[
    bool, typer.Option("--replace", help="Rotate the password of an existing account.")
]


def _password(from_stdin: bool) -> tuple[str, bool]:
    """``(password, generated)``."""
    if not from_stdin:
        return secrets.token_urlsafe(24), True
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("--password-stdin: stdin gave no password (pipe one line, or omit the flag)")
    if len(password) > MAX_PASSWORD_LEN or "\n" in password or "\r" in password:
        fail(f"--password-stdin: the password must be one line of ≤ {MAX_PASSWORD_LEN} characters")
    return password, False


def _set(path: Path, username: str, from_stdin: bool, replace: bool, what: str) -> None:
    try:
        exists = username in read_entries(path)
    except CredentialsError as exc:
        fail(str(exc))
    if exists and not replace:
        fail(f"{what} already has a password in {path} (add --replace to rotate it)")
    password, generated = _password(from_stdin)
    try:
        hasher = write_entry(path, username, password, tool=mosquitto_passwd())
    except CredentialsError as exc:
        fail(str(exc))
    verb = "rotated" if exists else "added"
    typer.echo(f"{verb} {what} in {path} (hashed by {hasher})", err=True)
    typer.echo(
        "the broker reads the file at start and on SIGHUP (deploy/README.md: credentials)",
        err=True,
    )
    if generated:
        typer.echo("its password is shown only now:", err=True)
        typer.echo(password)


def _check_id(value: str, option: str) -> str:
    try:
        return validate_id(value)
    except WireError:
        fail(f"{option} {value[:80]!r} is not a valid id (1–64 characters of A-Z a-z 0-9 _ . -)")


@app.command("add")
def add(
    device_id: Annotated[str, typer.Argument(help="Device id = MQTT username = client id.")],
    fleet: Annotated[str, typer.Option("--fleet", help="The device's fleet.")],
    password_file: PasswordFile,
    password_stdin: PasswordStdin = False,
    replace: Replace = False,
) -> None:
    """Give a device a broker password (printed once unless --password-stdin)."""
    _check_id(device_id, "DEVICE_ID")
    _check_id(fleet, "--fleet")
    if device_id == SERVICE_USERNAME:
        fail(f"{device_id!r} is the service's account; choose another device id")
    _set(password_file, device_id, password_stdin, replace, f"device {device_id}")
    own = f"{PREFIX}/{fleet}/{device_id}"
    typer.echo(
        f"it may publish {own}/{{{','.join(leaf.value for leaf in DEVICE_WRITES)}}} and read "
        f"{own}/{{{','.join(leaf.value for leaf in DEVICE_READS)}}} (ACL patterns, no entry "
        "needed)",
        err=True,
    )


@app.command("service")
def service_account(
    password_file: PasswordFile,
    username: Annotated[
        str, typer.Option(help="The service's broker username (the ACL's 'user' block).")
    ] = SERVICE_USERNAME,
    password_stdin: PasswordStdin = False,
    replace: Replace = False,
) -> None:
    """Give the service its broker password (printed once unless --password-stdin)."""
    _check_id(username, "--username")
    _set(password_file, username, password_stdin, replace, f"service account {username}")
    typer.echo(
        f"run the service with TINYDRIFT_MQTT_USERNAME={username} and TINYDRIFT_MQTT_PASSWORD "
        "set to this password",
        err=True,
    )


@app.command("remove")
def remove(
    username: Annotated[str, typer.Argument(help="Device id (or the service's username).")],
    password_file: PasswordFile,
) -> None:
    """Revoke an account: the broker refuses it after its next reload."""
    try:
        removed = remove_entry(password_file, username)
    except CredentialsError as exc:
        fail(str(exc))
    if not removed:
        fail(f"{username!r} has no password in {password_file} (nothing to remove)")
    typer.echo(f"removed {username} from {password_file}; reload the broker (SIGHUP)", err=True)


@app.command("acl")
def acl(
    acl_file: Annotated[
        Path | None,
        typer.Option("--acl-file", help="Check this ACL (e.g. deploy/acl); omit to print one."),
    ] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Write the ACL to --acl-file if it is absent.")
    ] = False,
    service_username: Annotated[
        str, typer.Option(help="The service's broker username.")
    ] = SERVICE_USERNAME,
) -> None:
    """Print or check the pattern ACL; devices need no per-device entries."""
    _check_id(service_username, "--service-username")
    text = acl_text(service_username)
    if acl_file is None:
        if write:
            fail("--write needs --acl-file PATH")
        typer.echo(text, nl=False)
        return
    if write and not acl_file.exists():
        try:
            acl_file.write_text(text)
        except OSError as exc:
            fail(f"cannot write {acl_file}: {exc.strerror}")
        typer.echo(f"wrote {acl_file}", err=True)
    try:
        current = acl_file.read_text()
    except OSError as exc:
        fail(f"cannot read {acl_file}: {exc.strerror} (create it: --write)")
    problems = check_acl(current, service_username)
    if problems:
        fail(
            f"{acl_file}: {'; '.join(problems)} (compare with 'tinydrift credentials acl', "
            "or delete the file and rerun with --write)"
        )
    typer.echo(
        f"{acl_file}: pattern ACL ok: every device may use only td/v1/<fleet>/<its username>/…, "
        f"and {service_username} all of td/v1; no per-device entries are needed "
        "(the fleet level is not checked by the broker: deploy/README.md)"
    )
