"""``tinydrift credentials``: Mosquitto password entries and the ACL check.

The Python hasher is checked against an entry ``mosquitto_passwd`` 2.0.11 wrote, and the
``mosquitto_passwd`` path against the Python verifier; that a real broker accepts both is
tests/integration/test_deploy_configs.py. Every failure ends with exit code 1 and exactly one
``error:`` line on stderr.
"""

from __future__ import annotations

import base64
import re
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from service.cli.app import app
from service.cli.credentials import (
    PBKDF2_ITERATIONS,
    SERVICE_USERNAME,
    acl_text,
    check_acl,
    hash_password,
    read_entries,
    verify_password,
)

runner = CliRunner()
DEPLOY_ACL = Path(__file__).resolve().parents[2] / "deploy" / "acl"
NO_TOOL = {"PATH": "/nonexistent"}  # mosquitto_passwd not found: the Python hasher runs
# written by `mosquitto_passwd` 2.0.11 (Debian 12) for user dev-1, password "abc"
MOSQUITTO_ENTRY = (
    "dev-1:$7$101$mlI1+GAfc7vnTMhs$LQVmgsYR8loEdn++Mio3qNhQZUJlknxEKHr1/sZyDUec6pSDgrkiF5TaebCSAiW"
    "aOSgzGteuuVM59MItnbh3/w=="
)
ENTRY_RE = re.compile(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==")


def run(*args: str | Path, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, ["credentials", *map(str, args)], input=stdin, env=env)


def assert_fails(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# -- the hash format --------------------------------------------------------------------------


def test_python_hash_has_mosquittos_format():
    assert PBKDF2_ITERATIONS == 101
    field = hash_password("pw")
    assert ENTRY_RE.fullmatch(field), field
    assert hash_password("pw") != field  # a fresh salt each time
    assert verify_password(field, "pw")
    assert not verify_password(field, "pw ")


def test_python_verifier_accepts_an_entry_mosquitto_passwd_wrote():
    _user, _, field = MOSQUITTO_ENTRY.partition(":")
    assert verify_password(field, "abc")
    assert not verify_password(field, "abd")
    salt = field.split("$")[3]
    assert hash_password("abc", salt=base64.b64decode(salt)) == field


@pytest.mark.parametrize(
    "field", ["", "$6$abc$def", "$7$0$AAAAAAAAAAAAAAAA$AAAA", "$7$x$a$b", "$7$101$short$AAAA"]
)
def test_malformed_hash_fields_never_verify(field: str):
    assert not verify_password(field, "anything")


# -- add / service / remove -------------------------------------------------------------------


def test_add_generates_a_password_printed_once(tmp_path: Path):
    pf = tmp_path / "passwd"
    result = run("add", "dev-1", "--fleet", "plant-7", "--password-file", pf, env=NO_TOOL)
    assert result.exit_code == 0, result.output
    password = result.stdout.strip()
    assert len(password) >= 32
    assert "\n" not in password
    assert "shown only now" in result.stderr
    assert "td/v1/plant-7/dev-1/{tel,lbl,status,ack,blob/get}" in result.stderr
    assert "td/v1/plant-7/dev-1/{desired,blob/data}" in result.stderr
    assert stat.S_IMODE(pf.stat().st_mode) == 0o600
    entries = read_entries(pf)
    assert list(entries) == ["dev-1"]
    assert ENTRY_RE.fullmatch(entries["dev-1"])
    assert verify_password(entries["dev-1"], password)
    assert password not in pf.read_text()


def test_password_from_stdin_prints_nothing_on_stdout(tmp_path: Path):
    pf = tmp_path / "passwd"
    result = run(
        "add", "dev-1", "--fleet", "f", "--password-file", pf, "--password-stdin",
        stdin="correct horse\n", env=NO_TOOL,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert verify_password(read_entries(pf)["dev-1"], "correct horse")


def test_existing_account_needs_replace_and_other_lines_survive(tmp_path: Path):
    pf = tmp_path / "passwd"
    pf.write_text(f"# fleet f\n{MOSQUITTO_ENTRY}\n")
    pf.chmod(0o640)
    inode = pf.stat().st_ino
    assert_fails(
        run("add", "dev-1", "--fleet", "f", "--password-file", pf, env=NO_TOOL),
        "dev-1 already has a password",
        "--replace",
    )
    added = run("add", "dev-2", "--fleet", "f", "--password-file", pf, env=NO_TOOL)
    rotated = run("add", "dev-1", "--fleet", "f", "--password-file", pf, "--replace", env=NO_TOOL)
    assert added.exit_code == 0, added.output
    assert rotated.exit_code == 0, rotated.output
    assert "rotated device dev-1" in rotated.stderr
    lines = pf.read_text().splitlines()
    assert lines[0] == "# fleet f"
    assert [line.partition(":")[0] for line in lines[1:]] == ["dev-1", "dev-2"]
    entries = read_entries(pf)
    assert verify_password(entries["dev-1"], rotated.stdout.strip())
    assert not verify_password(entries["dev-1"], "abc")
    assert verify_password(entries["dev-2"], added.stdout.strip())
    assert stat.S_IMODE(pf.stat().st_mode) == 0o640  # the operator's mode is kept
    # rewritten in place: a single-file bind mount (docker-compose.yml) sees the change
    assert pf.stat().st_ino == inode
    assert run("remove", "dev-2", "--password-file", pf).exit_code == 0
    assert pf.stat().st_ino == inode


def test_service_account_and_remove(tmp_path: Path):
    pf = tmp_path / "passwd"
    result = run("service", "--password-file", pf, env=NO_TOOL)
    assert result.exit_code == 0, result.output
    assert "TINYDRIFT_MQTT_USERNAME=tinydrift-service" in result.stderr
    assert verify_password(read_entries(pf)[SERVICE_USERNAME], result.stdout.strip())
    assert run("add", "dev-1", "--fleet", "f", "--password-file", pf, env=NO_TOOL).exit_code == 0
    removed = run("remove", "dev-1", "--password-file", pf)
    assert removed.exit_code == 0, removed.output
    assert list(read_entries(pf)) == [SERVICE_USERNAME]
    assert_fails(run("remove", "dev-1", "--password-file", pf), "'dev-1' has no password")


def test_mosquitto_passwd_writes_entries_the_python_verifier_accepts(tmp_path: Path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd is missing: apt-get install -y mosquitto", pytrace=False)
    pf = tmp_path / "passwd"
    result = run("add", "dev-1", "--fleet", "f", "--password-file", pf)
    assert result.exit_code == 0, result.output
    assert "hashed by mosquitto_passwd" in result.stderr
    stdin = run(
        "add", "dev-2", "--fleet", "f", "--password-file", pf, "--password-stdin",
        stdin="p@ss word:with colon\n",
    )  # fmt: skip
    assert stdin.exit_code == 0, stdin.output
    entries = read_entries(pf)
    assert verify_password(entries["dev-1"], result.stdout.strip())
    assert verify_password(entries["dev-2"], "p@ss word:with colon")
    assert stat.S_IMODE(pf.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no backup left behind


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["add", "dev/1", "--fleet", "f"], ["DEVICE_ID 'dev/1' is not a valid id"]),
        (["add", "dev+", "--fleet", "f"], ["not a valid id"]),
        (["add", "d" * 65, "--fleet", "f"], ["not a valid id"]),
        (["add", "dev-1", "--fleet", "a b"], ["--fleet 'a b' is not a valid id"]),
        (["add", SERVICE_USERNAME, "--fleet", "f"], ["the service's account"]),
        (["service", "--username", "svc#"], ["--username 'svc#' is not a valid id"]),
    ],
)
def test_bad_ids_are_refused(tmp_path: Path, args: list[str], fragments: list[str]):
    pf = tmp_path / "passwd"
    assert_fails(run(*args, "--password-file", pf, env=NO_TOOL), *fragments)
    assert not pf.exists()


def test_password_file_problems_name_the_fix(tmp_path: Path):
    assert_fails(
        run("add", "d", "--fleet", "f", "--password-file", tmp_path / "no" / "passwd"),
        "directory",
        "does not exist (create it first)",
    )
    assert_fails(
        run("add", "d", "--fleet", "f", "--password-file", tmp_path, env=NO_TOOL), "not a file"
    )
    pf = tmp_path / "passwd"
    for stdin in ("", "\n"):
        assert_fails(
            run("add", "d", "--fleet", "f", "--password-file", pf, "--password-stdin", stdin=stdin),
            "stdin gave no password",
        )


# -- the ACL ----------------------------------------------------------------------------------


def test_deploy_acl_is_the_pattern_acl():
    assert check_acl(DEPLOY_ACL.read_text()) == []
    assert check_acl(acl_text()) == []
    result = run("acl", "--acl-file", DEPLOY_ACL)
    assert result.exit_code == 0, result.output
    assert "no per-device entries are needed" in result.stdout
    printed = run("acl")
    assert printed.exit_code == 0
    assert printed.stdout == acl_text()
    assert "pattern write td/v1/+/%u/tel" in printed.stdout


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.replace("pattern read td/v1/+/%u/desired\n", ""), "missing 'pattern read"),
        (lambda t: t + "pattern write td/v1/#\n", "grants every device more"),
        (lambda t: t + "pattern readwrite td/v1/+/+/tel\n", "grants every device more"),
        (lambda t: t + "pattern td/%u/#\n", "grants every device more"),  # outside td/v1
        (lambda t: t.replace("user tinydrift-service", "user someone"), "no 'user tinydrift"),
        (lambda t: t.replace("topic read td/v1/#\n", ""), "missing 'topic read td/v1/#'"),
    ],
)
def test_acl_problems_are_reported(tmp_path: Path, edit, fragment: str):
    acl = tmp_path / "acl"
    acl.write_text(edit(DEPLOY_ACL.read_text()))
    assert_fails(run("acl", "--acl-file", acl), str(acl), fragment, "--write")


def test_acl_write_creates_a_missing_file_only(tmp_path: Path):
    acl = tmp_path / "acl"
    result = run("acl", "--acl-file", acl, "--write")
    assert result.exit_code == 0, result.output
    assert acl.read_text() == acl_text()
    acl.write_text("# mine\n")
    assert_fails(run("acl", "--acl-file", acl, "--write"), "missing")
    assert acl.read_text() == "# mine\n"
    assert_fails(run("acl", "--write"), "--write needs --acl-file")
    assert_fails(run("acl", "--acl-file", tmp_path / "absent"), "cannot read", "--write")
