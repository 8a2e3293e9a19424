"""``python -m benchmarks.floor``: what any server pays on top of plain upload-pack for a clone.

The full-clone target compares gittornado with ``git upload-pack`` writing
its answer to /dev/null.  A server must also move those bytes through a TCP
socket to a client, and on a 2-core host that costs CPU that upload-pack and
pack-objects would otherwise have.  This measures that floor by itself,
interleaved over ``--rounds`` rounds on the full-clone transfer of the
benchmark's history repository:

* plain ``git upload-pack --stateless-rpc`` into /dev/null;
* the same, relayed to curl by the least an HTTP server can do: one thread,
  blocking ``splice(2)`` from git's pipe into the socket, no chunked framing,
  no event loop;
* gittornado, as ``benchmarks.run`` starts it.

It prints the median of each and its ratio to plain upload-pack.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

from .repos import build, git_env
from .run import FULL
from .servers import GittornadoServer
from .workloads import PlainUploadPack, curl_replay, fetch_request, median


def relay_forever(listener: socket.socket, repo: Path, env: Dict[str, str]) -> None:
    """Answer each POST with upload-pack's output, spliced into the socket, then close."""
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
            length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
            while len(body) < length:
                body += conn.recv(65536)
            git = subprocess.Popen(
                ["git", "upload-pack", "--stateless-rpc", str(repo)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**env, "GIT_PROTOCOL": "version=2"},
            )
            assert git.stdin is not None and git.stdout is not None
            git.stdin.write(body)
            git.stdin.close()
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            while os.splice(git.stdout.fileno(), conn.fileno(), 1 << 20):
                pass
            git.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        home = Path(tmp)
        env = git_env(home)
        repo = build(FULL.history, home)
        request = home / "request"
        request.write_bytes(fetch_request(repo, env))
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=relay_forever, args=(listener, repo, env), daemon=True).start()
        relay_url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        server = GittornadoServer(repo.parent, env, home / "gittornado")
        server.start()

        def plain() -> None:
            PlainUploadPack(env).run(repo, request).wait()

        def via(url: str) -> Callable[[], None]:
            return lambda: curl_replay(url, request).communicate()

        runs: Dict[str, Callable[[], None]] = {
            "plain upload-pack": plain,
            "blocking splice relay": via(relay_url),
            "gittornado": via(f"{server.url}/{repo.name}/git-upload-pack"),
        }
        times: Dict[str, List[float]] = {name: [] for name in runs}
        try:
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        finally:
            server.stop()
        base = median(times["plain upload-pack"]) or 1.0
        for name, samples in times.items():
            value = median(samples) or 0.0
            every = ", ".join(f"{sample:.2f}" for sample in samples)
            print(f"{name:22s} {value:.3f} s  {value / base:.2f}x  ({every})")


if __name__ == "__main__":
    main()
