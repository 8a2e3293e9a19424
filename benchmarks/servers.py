"""The servers under test, each started from throwaway configuration and stopped afterwards.

* :class:`GittornadoServer`: the ``gittornado`` command, with an access file
  that lets everyone push.
* :class:`HttpBackendServer`: ``git http-backend`` run by fcgiwrap behind
  nginx, configured to stream both ways (no request or response buffering,
  no body size limit), which is what people deploy instead.

Both expose :meth:`classify`, which splits a process table into the server's
tree and the server's own processes (git's processes excluded), for
:class:`benchmarks.memory.MemorySampler`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Set, Tuple

from .memory import ProcessTable, descendants

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


def free_port() -> int:
    """A port nobody listens on right now (for servers that cannot report the one they picked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    """Block until something accepts connections on ``port``, or fail if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: Starts the gittornado command with git's pipes at the kernel's default size, 64 KiB.
SMALL_PIPES = (
    "import sys, gittornado.process as p; p.STDOUT_PIPE_SIZE = p.STDIN_PIPE_SIZE = 65536; "
    "from gittornado.server import main; sys.argv[0] = 'gittornado'; main()"
)


class GittornadoServer:
    """gittornado serving ``root`` on a free loopback port."""

    name = "gittornado"

    def __init__(
        self, root: Path, env: Dict[str, str], tmp: Path, args: Sequence[str] = (), small_pipes: bool = False
    ) -> None:
        self.root = root
        self.env = env
        self.tmp = tmp
        self.args = list(args)  # more options, e.g. --pack-cache DIR
        self.small_pipes = small_pipes
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self.command = ""

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        access = self.tmp / "users.ini"
        access.write_text("[users]\n[access]\n* = *=rw\n")
        argv = ["gittornado", "--port", "0", "--address", "127.0.0.1", "--gitbase", str(self.root)]
        if self.small_pipes:  # as where the kernel refuses larger pipes (a user holding many)
            argv = [sys.executable, "-c", SMALL_PIPES, *argv[1:]]
        argv += ["--accessfile", str(access), *self.args]
        self.command = " ".join(["gittornado --accessfile (everyone rw)", *self.args])
        if self.small_pipes:
            self.command += ", 64 KiB pipes"
        log = open(self.tmp / "gittornado.log", "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            cwd=Path(__file__).resolve().parent.parent,
            text=True,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"http://[^:]+:(\d+)/", line)
        if not match:
            stop_process(self.proc)
            raise RuntimeError(f"gittornado did not start: {line!r}; see {self.tmp / 'gittornado.log'}")
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def classify(self, table: ProcessTable) -> Tuple[Set[int], Set[int]]:
        """Own: the Python process.  Tree: it and every git it spawned."""
        assert self.proc is not None
        return descendants([self.proc.pid], table), {self.proc.pid} & set(table)


NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    fastcgi_temp_path {tmp}/fastcgi;
    proxy_temp_path {tmp}/proxy;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        # Stream both ways, no size cap: pushes of any size go straight to git.
        client_max_body_size 0;
        location / {{
            fastcgi_pass unix:{socket};
            fastcgi_request_buffering off;
            fastcgi_buffering off;
            fastcgi_read_timeout 600s;
            fastcgi_param SCRIPT_FILENAME {backend};
            fastcgi_param GIT_PROJECT_ROOT {root};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_CONFIG_NOSYSTEM 1;
            fastcgi_param HOME {home};
            # git http-backend enables receive-pack for authenticated users only.
            fastcgi_param REMOTE_USER bench;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param PATH_INFO $uri;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
        }}
    }}
}}
"""


class HttpBackendServer:
    """nginx (one worker) -> fcgiwrap (``children`` preforked) -> git http-backend, serving ``root``."""

    name = "http-backend"
    #: Process names (as /proc shows them) that belong to this server rather than to git.
    OWN = ("nginx", "fcgiwrap", "git-http-backen")

    def __init__(self, root: Path, env: Dict[str, str], tmp: Path, children: int = 32) -> None:
        self.root = root
        self.env = env
        self.tmp = tmp
        self.children = children
        self.nginx: Optional[subprocess.Popen] = None
        self.fcgiwrap: Optional[subprocess.Popen] = None
        self.url = ""
        self.command = f"nginx (1 worker) + fcgiwrap -c {children} + git http-backend"

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        fcgiwrap = shutil.which("fcgiwrap") or "/usr/sbin/fcgiwrap"
        self.tmp.mkdir(parents=True, exist_ok=True)
        sock = self.tmp / "fcgiwrap.sock"
        port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                # As root, keep the workers root too so they may use the socket
                # and read the repositories; otherwise nginx ignores "user".
                user="user root root;" if os.geteuid() == 0 else "",
                tmp=self.tmp,
                port=port,
                socket=sock,
                backend=HTTP_BACKEND,
                root=self.root,
                home=self.env.get("HOME", "/nonexistent"),
            )
        )
        log = open(self.tmp / "fcgiwrap.log", "wb")
        self.fcgiwrap = subprocess.Popen(
            [fcgiwrap, "-c", str(self.children), "-s", f"unix:{sock}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self.env,
            start_new_session=True,  # a group of its own, so stop() ends its children too
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.fcgiwrap.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fcgiwrap did not start; see {self.tmp / 'fcgiwrap.log'}")
            time.sleep(0.02)
        self.nginx = subprocess.Popen(
            [nginx, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self.env,
        )
        log.close()
        wait_for_port(port, self.nginx, "nginx")
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.nginx is not None:
            stop_process(self.nginx)  # TERM is nginx's fast shutdown
        if self.fcgiwrap is not None:
            # fcgiwrap's TERM ends only itself: its preforked children would live on, orphaned.
            stop_process(self.fcgiwrap)
            try:
                os.killpg(self.fcgiwrap.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nginx = self.fcgiwrap = None

    def classify(self, table: ProcessTable) -> Tuple[Set[int], Set[int]]:
        """Own: nginx, fcgiwrap and git http-backend.  Tree: those and the git they spawned."""
        roots = [p.pid for p in (self.nginx, self.fcgiwrap) if p is not None]
        tree = descendants(roots, table)
        return tree, {pid for pid in tree if table[pid][1].startswith(self.OWN)}


def temp_dir(prefix: str) -> Path:
    """A fresh directory for one server's configuration, logs and sockets."""
    return Path(tempfile.mkdtemp(prefix=prefix))
