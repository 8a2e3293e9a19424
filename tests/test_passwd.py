"""gittornado-passwd: set and delete passwords, keeping every other byte of the file."""

from __future__ import annotations

import io
import os
import random
import re
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from gittornado import passwd
from gittornado.access import load_access_file, verify_password
from gittornado.passwords import hash_password

EXAMPLE = Path(__file__).parent.parent / "users.ini"
#: Low bcrypt cost keeps the tests fast; the default (12) is checked once.
FAST = ["-C", "4"]


def run(*args: str, input: Optional[str] = "s3cret pass\n") -> subprocess.CompletedProcess:
    """The installed command, with the password on a pipe (not a terminal)."""
    return subprocess.run(
        ["gittornado-passwd", *args], input=input, capture_output=True, text=True, timeout=60
    )


def changed_lines(before: str, after: str) -> List[str]:
    old = before.split("\n")
    return [line for line in after.split("\n") if line not in old]


def test_adds_a_user_to_the_example_keeping_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    before = EXAMPLE.read_text()
    path.write_text(before)
    result = run(*FAST, str(path), "alice")
    assert result.returncode == 0, result.stderr
    assert "Added password for user alice" in result.stderr
    after = path.read_text()
    [added] = changed_lines(before, after)
    assert added.startswith("alice = $2y$04$")
    # The new line sits at the end of [users], before [groups]; nothing else moved.
    lines = after.split("\n")
    assert lines.index(added) == lines.index("[groups]") - 2
    assert [line for line in lines if line != added] == before.split("\n")
    rules = load_access_file(str(path))
    assert verify_password(b"s3cret pass", rules.users["alice"])


def test_changes_only_the_hash_keeping_spacing_and_comment(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    original = (
        "; top comment\r\n"
        "[users]\r\n"
        "bob   : {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=   ; bob's, from htpasswd -s\r\n"
        "carol = $apr1$Lg2e3A9h$99c0A8o2TnYShDsx.0PG3/\r\n"
        "\r\n"
        "[access]\r\n"
        "bob = proj=r   # read only\r\n"
    )
    path.write_bytes(original.encode())
    result = run(*FAST, str(path), "bob", input="new password\r\n")
    assert result.returncode == 0, result.stderr
    assert "Updated password for user bob" in result.stderr
    after = path.read_bytes().decode()
    old_lines, new_lines = original.split("\n"), after.split("\n")
    assert len(old_lines) == len(new_lines)
    differing = [(o, n) for o, n in zip(old_lines, new_lines) if o != n]
    assert len(differing) == 1
    old, new = differing[0]
    assert new.startswith("bob   : $2y$04$") and new.endswith("   ; bob's, from htpasswd -s\r")
    hashed = new[len("bob   : ") : -len("   ; bob's, from htpasswd -s\r")]
    assert verify_password(b"new password", hashed)


def test_deletes_a_user_and_only_that_line(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    text = (
        "[users]\nbob = {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=\ncarol = $apr1$Lg2e3A9h$99c0A8o2TnYShDsx.0PG3/\n"
        "[access]\nbob = proj=r\n"
    )
    path.write_text(text)
    result = run("-D", str(path), "bob", input=None)
    assert result.returncode == 0, result.stderr
    assert path.read_text() == text.replace("bob = {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=\n", "")
    assert sorted(load_access_file(str(path)).users) == ["carol"]

    again = run("-D", str(path), "bob", input=None)
    assert again.returncode != 0 and "no user 'bob'" in again.stderr


def test_creates_a_missing_file_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "new.ini"
    assert run(*FAST, str(path), "dave").returncode == 0
    assert path.read_text().startswith("[users]\ndave = $2y$04$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run("-D", str(tmp_path / "absent.ini"), "dave", input=None).returncode != 0


def test_default_cost_is_12_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    assert run(str(path), "erin", input="correct horse\n").returncode == 0
    hashed = load_access_file(str(path)).users["erin"]
    assert hashed.startswith("$2y$12$")
    assert verify_password(b"correct horse", hashed)


def test_replaces_atomically_keeping_mode_and_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.ini"
    real.write_text("[users]\n")
    real.chmod(0o640)
    link = tmp_path / "users.ini"
    link.symlink_to(real)
    inode = real.stat().st_ino
    assert run(*FAST, str(link), "frank").returncode == 0
    assert link.is_symlink()
    assert real.stat().st_ino != inode  # a new file renamed into place, never rewritten in place
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert "frank" in load_access_file(str(real)).users
    assert sorted(os.listdir(tmp_path)) == ["real.ini", "users.ini"]  # no temporary file left


@pytest.mark.parametrize(
    "args, input, message",
    [
        (["BAD"], "", "no password on standard input"),
        (["BAD"], "\n", "the password is empty"),
        (["BAD"], "x" * 73 + "\n", "longer than bcrypt's 72 bytes"),
        (["@group"], "pw\n", "not a valid user name"),
        (["a b"], "pw\n", "not a valid user name"),
        (["a:b"], "pw\n", "not a valid user name"),
    ],
)
def test_refuses_bad_input_and_changes_nothing(
    tmp_path: Path, args: List[str], input: str, message: str
) -> None:
    path = tmp_path / "users.ini"
    path.write_text("[users]\n")
    result = run(*FAST, str(path), *[a.replace("BAD", "gina") for a in args], input=input)
    assert result.returncode != 0
    assert message in result.stderr
    assert path.read_text() == "[users]\n"


def test_refuses_to_write_a_file_that_would_not_load(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    broken = "[users]\nhank = plain-text-password\n"
    path.write_text(broken)
    result = run(*FAST, str(path), "ivan")
    assert result.returncode != 0
    assert "line 2: user 'hank'" in result.stderr and "plain-text-password" not in result.stderr
    assert path.read_text() == broken
    # Setting hank's own password is how to repair that line.
    assert run(*FAST, str(path), "hank").returncode == 0
    assert verify_password(b"s3cret pass", load_access_file(str(path)).users["hank"])


def test_asks_twice_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["first", "second", "same", "same"])
    monkeypatch.setattr(passwd.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(passwd.PasswdError, match="do not match"):
        passwd.read_password(Terminal())
    assert passwd.read_password(Terminal()) == "same"


def test_appends_a_users_section_when_there_is_none() -> None:
    text = "[access]\n* = proj=r"
    result = passwd.set_user(text, "jo", "$2y$04$" + "a" * 53)
    assert result == "[access]\n* = proj=r\n\n[users]\njo = $2y$04$" + "a" * 53 + "\n"


def test_keeps_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    path.write_bytes("\ufeff[users]\n".encode())
    assert run(*FAST, str(path), "kim").returncode == 0
    assert path.read_bytes().startswith("\ufeff[users]\nkim = $2y$04$".encode())
    assert "kim" in load_access_file(str(path)).users


# -- runs at the same time -------------------------------------------------------------------------


def test_parallel_runs_lose_no_change(tmp_path: Path) -> None:
    """20 runs at once (adds, password changes, deletions): the file ends as every run reported.

    Meanwhile a reader keeps loading the file, as a server would: it always loads.
    """
    path = tmp_path / "users.ini"
    old = {f"u{i:02}": f"old-u{i:02}" for i in range(13)}
    path.write_text(
        "; shared by everyone\n[users]\n"
        + "".join(f"{user} = {hash_password(pw, 4)}\n" for user, pw in old.items())
        + "[access]\n* = proj=r\n"
    )
    changed = {f"u{i:02}": f"changed-u{i:02}" for i in range(7)}
    added = {f"n{i:02}": f"new-n{i:02}" for i in range(7)}
    deleted = [f"u{i:02}" for i in range(7, 13)]
    runs = [(user, pw) for user, pw in {**changed, **added}.items()] + [(user, None) for user in deleted]
    random.shuffle(runs)

    reads, broken = [0], []

    def reader() -> None:
        while not done.is_set():
            try:
                load_access_file(str(path))
                reads[0] += 1
            except Exception as error:  # noqa: BLE001 - any failure to load is the finding
                broken.append(repr(error))

    done = threading.Event()
    watcher = threading.Thread(target=reader)
    watcher.start()
    processes = []
    try:
        for user, password in runs:
            stdin = tmp_path / f"stdin-{user}"
            stdin.write_text(f"{password}\n" if password else "")
            with open(stdin) as source:
                args = [*FAST, str(path), user] if password else ["-D", str(path), user]
                processes.append(
                    subprocess.Popen(
                        ["gittornado-passwd", *args], stdin=source, stderr=subprocess.PIPE, text=True
                    )
                )
        results = [(process.wait(timeout=60), process.stderr.read()) for process in processes]
    finally:
        done.set()
        watcher.join()
        for process in processes:
            process.stderr.close()

    for (user, password), (code, stderr) in zip(runs, results):
        assert code == 0, stderr
        expected = "Deleted user" if password is None else "Updated" if user in old else "Added"
        assert expected in stderr and user in stderr
    users = load_access_file(str(path)).users
    assert sorted(users) == sorted([*changed, *added])
    for user, password in {**changed, **added}.items():
        assert verify_password(password.encode(), users[user]), user
    assert path.read_text().startswith("; shared by everyone\n[users]\n")
    assert "* = proj=r" in path.read_text()
    assert not broken and reads[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("stdin-")) == ["users.ini"]


def test_a_held_lock_is_waited_for_then_named(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    path.write_text("[users]\n")
    lock = tmp_path / "users.ini.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # as if a run died an hour ago

    begin = time.monotonic()
    result = run(*FAST, "--wait", "1", str(path), "lena")
    assert result.returncode != 0
    assert time.monotonic() - begin >= 1
    said = rf"{lock} exists \(made 360\d s ago\): another gittornado-passwd is changing"
    assert re.search(said, result.stderr), result.stderr
    assert f"remove {lock}" in result.stderr
    assert path.read_text() == "[users]\n" and lock.exists()  # reported, not broken

    # A lock that goes away while a run waits: the run goes ahead.
    with open(tmp_path / "pw", "w+") as stdin:
        stdin.write("pw\n")
        stdin.seek(0)
        waiting = subprocess.Popen(
            ["gittornado-passwd", *FAST, str(path), "lena"], stdin=stdin, stderr=subprocess.PIPE, text=True
        )
        time.sleep(1.0)
        assert waiting.poll() is None
        lock.unlink()
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()
        waiting.stderr.close()
    assert verify_password(b"pw", load_access_file(str(path)).users["lena"])
