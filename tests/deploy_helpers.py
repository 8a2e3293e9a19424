"""Real deployments for the tests: gittornado, nginx and Apache httpd on free loopback ports.

Proxy configurations are built from the files in ``examples/`` by replacing
exact snippets (ports, file paths); each snippet must occur exactly once, so a
change to an example that the tests no longer cover fails loudly instead of
testing something else.  Every process runs in the foreground with its pid
file, logs and temporary files in the test's directory, and is stopped at
teardown.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
APACHE_MODULES = Path("/usr/lib/apache2/modules")

#: Size of the big push: far beyond every default body limit of Tornado (100 MB),
#: nginx (1 MB) and git's http.postBuffer (1 MB).
BIG_PUSH_BYTES = 300 * 2**20
#: Access file that lets anyone read and push everything.
OPEN_ACCESS = "[access]\n* = *=rw\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def from_example(name: str, replacements: Dict[str, str]) -> str:
    """The text of ``examples/<name>`` with each key replaced by its value (each must occur once)."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        count = text.count(old)
        if count != 1:
            raise AssertionError(f"examples/{name}: expected {old!r} exactly once, found it {count} times")
        text = text.replace(old, new)
    return text


class Service:
    """A server process started by a test, with its output in ``directory``."""

    def __init__(self, name: str, argv: Sequence[str], directory: Path, env: Optional[dict] = None) -> None:
        self.name = name
        self.directory = directory
        self.output = directory / f"{name}.out"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def read(self, filename: Optional[str] = None) -> str:
        """One of the service's files in its directory (default: its stdout and stderr)."""
        path = self.directory / filename if filename else self.output
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_port(self, port: int, timeout: float = 20.0) -> None:
        """Return once ``port`` accepts connections; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.name} did not listen on {port} within {timeout}s:\n{self.read()}")

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit in time; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Gittornado(Service):
    """The real ``gittornado`` command; ``url`` is the one its startup line announces."""

    def __init__(self, args: Sequence[str], directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        argv = ["gittornado", "--port", "0", "--address", "127.0.0.1", *args]
        super().__init__("gittornado", argv, directory)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            match = re.search(r"at (https?://127\.0\.0\.1:(\d+)\S*/) ", self.read())
            if match:
                self.url = match.group(1).rstrip("/")
                self.port = int(match.group(2))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"gittornado did not start:\n{self.read()}")

    @property
    def startup_line(self) -> str:
        """The one line gittornado prints when it starts."""
        return self.read().splitlines()[0]

    def log(self) -> str:
        """Everything the server printed so far (startup line and log)."""
        return self.read()


class Services:
    """Starts gittornado, nginx and Apache for one test; :meth:`stop_all` ends them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.started: List[Service] = []
        self.access_file = directory / "users.ini"
        self.access_file.write_text(OPEN_ACCESS)

    def _subdir(self, name: str) -> Path:
        path = self.directory / f"{name}-{len(self.started)}"
        path.mkdir(parents=True)
        return path

    def gittornado(self, gitbase: Path, *args: str, may_push: bool = True) -> Gittornado:
        """``gittornado --gitbase <gitbase> <args>``; with ``may_push``, anyone may push."""
        access = ["--accessfile", str(self.access_file)] if may_push else []
        return self.gittornado_command("--gitbase", str(gitbase), *access, *args)

    def gittornado_command(self, *args: str) -> Gittornado:
        """``gittornado --port 0 --address 127.0.0.1 <args>``, exactly."""
        server = Gittornado(args, self._subdir("gittornado"))
        self.started.append(server)
        return server

    def nginx(self, example: str, replacements: Dict[str, str], ports: Sequence[int]) -> Service:
        """Real nginx running ``examples/<example>`` with ``replacements`` and paths in the test's dir."""
        directory = self._subdir("nginx")
        replacements = {
            "user www-data;\n": "",  # workers run as whoever runs the tests
            "pid /run/nginx.pid;": f"pid {directory}/nginx.pid;",
            "error_log /var/log/nginx/error.log warn;": f"error_log {directory}/error.log warn;",
            "access_log /var/log/nginx/access.log;": (
                # The access log also records how each request body arrived.
                "log_format deploy '$request $status te=$http_transfer_encoding bytes=$request_length "
                "upstream=$upstream_addr';\n"
                f"    access_log {directory}/access.log deploy;\n"
                + "".join(
                    f"    {kind}_temp_path {directory}/{kind}_temp;\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                )
            ),
            **replacements,
        }
        conf = directory / "nginx.conf"
        conf.write_text(from_example(example, replacements))
        argv = ["nginx", "-p", str(directory), "-e", str(directory / "startup.log"), "-c", str(conf)]
        service = Service("nginx", [*argv, "-g", "daemon off;"], directory)
        self.started.append(service)
        for port in ports:
            service.wait_for_port(port)
        return service

    def apache(self, replacements: Dict[str, str], port: int) -> Service:
        """Real Apache httpd running ``examples/apache.conf`` with ``replacements``.

        The example is a Debian site file; the server configuration around it
        loads what Debian enables by default plus the modules the example
        names, with everything that is written kept in the test's directory.
        """
        directory = self._subdir("apache")
        site = directory / "site.conf"
        site.write_text(from_example("apache.conf", replacements))
        modules = (
            "mpm_event authz_core reqtimeout filter deflate setenvif env headers proxy proxy_http".split()
        )
        # Apache refuses to run its workers as root; they only proxy, so nobody will do.
        user = pwd.getpwnam("nobody") if os.getuid() == 0 else pwd.getpwuid(os.getuid())
        lines = [
            f"ServerRoot {directory}",
            f"DefaultRuntimeDir {directory}",
            f"PidFile {directory}/apache.pid",
            f"ErrorLog {directory}/error.log",
            "LogLevel warn",
            f"Listen 127.0.0.1:{port}",
            "ServerName 127.0.0.1",
            f"User {user.pw_name}",
            f"Group #{user.pw_gid}",
            *(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in modules),
            # As Debian enables by default: compress text responses (the example opts out).
            "AddOutputFilterByType DEFLATE text/html text/plain text/xml",
            'LogFormat "%r %>s te=%{Transfer-Encoding}i bytes=%I" deploy',
            f"CustomLog {directory}/access.log deploy",
            f"Include {site}",
        ]
        conf = directory / "httpd.conf"
        conf.write_text("\n".join(lines) + "\n")
        service = Service("apache", ["apache2", "-f", str(conf), "-DFOREGROUND"], directory)
        self.started.append(service)
        service.wait_for_port(port)
        return service

    def stop_all(self) -> None:
        """Stop every service, printing the end of its logs (pytest shows them if the test failed)."""
        for service in reversed(self.started):
            service.stop()
            for name in (None, "error.log"):
                tail = service.read(name)[-3000:]
                if tail:
                    print(f"--- {service.name} {name or 'output'} ({service.directory}):\n{tail}")


def write_random_files(directory: Path, total: int, seed: int, file_size: int = 50 * 2**20) -> None:
    """``total`` bytes of incompressible, reproducible data in files of ``file_size``."""
    rng = random.Random(seed)
    for index in range(0, total, file_size):
        with open(directory / f"blob{index // file_size:02d}.bin", "wb") as f:
            left = min(file_size, total - index)
            while left:
                piece = min(left, 8 * 2**20)
                f.write(rng.randbytes(piece))
                left -= piece


def make_big_repo(directory: Path, env: Dict[str, str]) -> Path:
    """A work tree whose one commit on ``main`` holds :data:`BIG_PUSH_BYTES` of random data.

    Its config skips what only costs time on random data (compression, delta
    search), so each push spends its time on the transfer being tested.
    """

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=directory, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main", ".")
    git("config", "core.compression", "0")
    git("config", "pack.compression", "0")
    git("config", "core.bigFileThreshold", "1m")
    write_random_files(directory, BIG_PUSH_BYTES, seed=4)
    git("add", ".")
    git("commit", "-q", "-m", "300 MB of random data")
    return directory


def init_bare(path: Path) -> Path:
    """An empty bare repository at ``path`` for a push to land in."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    return path


def remove_tree(path: Path) -> None:
    """Delete a big test repository now rather than leaving it to pytest's temp-dir rotation."""
    shutil.rmtree(path, ignore_errors=True)


def make_certificate(directory: Path) -> Tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the PEM certificate and key files."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def processes_naming(needle: str) -> List[int]:
    """PIDs of live (non-zombie) processes whose command line contains ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def children_of(pid: int) -> List[int]:
    """PIDs of the live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def add_remote_addr_hook(repo: Path, directory: Path) -> Path:
    """Make ``repo``'s post-receive hook write the REMOTE_ADDR it sees; returns that file."""
    seen = directory / "remote_addr"
    hook = repo / "hooks" / "post-receive"
    hook.write_text(f'#!/bin/sh\necho "$REMOTE_ADDR" > {seen}\n')
    hook.chmod(0o755)
    return seen


async def commit_and_push(git: Any, work: Path, options: Sequence[str] = (), branch: str = "main") -> str:
    """Commit a new file in the clone ``work`` and push it to origin's ``branch``; returns the commit."""
    name = f"pushed-{time.monotonic_ns()}.txt"
    (work / name).write_text(name + "\n")
    await git.run("add", name, cwd=work)
    await git.run("commit", "-q", "-m", f"add {name}", cwd=work)
    await git.run(*options, "push", "-q", "origin", f"HEAD:{branch}", cwd=work)
    return (await git.run("rev-parse", "HEAD", cwd=work)).stdout.strip()


async def push_big(
    git: Any, work: Path, url: str, target: Path, directory: Path, options: Sequence[str] = ()
) -> float:
    """Push ``work``'s main (:data:`BIG_PUSH_BYTES`) to ``url`` in chunked encoding; return seconds taken.

    A 64 KiB http.postBuffer makes git send the body chunked, as it does for
    every push bigger than the (1 MiB) default.  Checks that the body really
    went chunked and that the commit arrived in ``target``.
    """
    trace = directory / "curl-trace.txt"
    env = {"GIT_TRACE_CURL": str(trace), "GIT_TRACE_CURL_NO_DATA": "1"}
    started = time.monotonic()
    try:
        await git.run(*options, "-c", "http.postBuffer=65536", "push", url, "main", cwd=work, env=env)
        seconds = time.monotonic() - started
        assert re.search(r"Send header: Transfer-Encoding: chunked", trace.read_text(errors="replace"))
        expected = (await git.run("rev-parse", "main", cwd=work)).stdout.strip()
        landed = await git.run("--git-dir", str(target), "rev-parse", "main")
        assert landed.stdout.strip() == expected
        return seconds
    finally:
        trace.unlink(missing_ok=True)
        remove_tree(target)
