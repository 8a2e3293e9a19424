"""Git LFS transfers through gittornado beside nginx moving the same bytes: ``python -m benchmarks.lfs``.

nginx is the floor a Python server is measured against: a static file
served with ``sendfile`` (download), and ``dav_methods PUT`` writing a
request body to disk (upload).  gittornado does more for each upload (it
hashes the body and fsyncs the object before it becomes visible), and both
move the bytes through the kernel's loopback.  The client is curl for both,
so the client's cost is the same.

gittornado's own memory (the PSS of its process, sampled every 25 ms while
the transfer runs) is measured for a small (10 MB) and a large (1 GiB)
object: streaming means the two are the same.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from .memory import MemorySampler, MemoryTrace
from .servers import GittornadoServer, free_port, stop_process, temp_dir, wait_for_port

MIB = 2**20
NGINX_DAV = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {root}/.incoming;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            root {root};
            dav_methods PUT;
            create_full_put_path on;
        }}
    }}
}}
"""


def make_object(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MIB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def curl(*args: str) -> float:
    """Run curl; return the seconds the transfer took, as curl measured it."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total}", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out)


class Nginx:
    """nginx serving and accepting (WebDAV PUT) files under ``root``."""

    def __init__(self, root: Path, tmp: Path) -> None:
        port = free_port()
        (root / ".incoming").mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        user = "user root root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_DAV.format(user=user, tmp=tmp, root=root, port=port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, self.proc, "nginx")
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        stop_process(self.proc)


def batch(server: GittornadoServer, operation: str, oid: str, size: int) -> Dict:
    body = json.dumps({"operation": operation, "objects": [{"oid": oid, "size": size}]}).encode()
    request = urllib.request.Request(
        f"{server.url}/bench.git/info/lfs/objects/batch",
        data=body,
        headers={"Content-Type": "application/vnd.git-lfs+json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())["objects"][0]


def nginx_upload(nginx: Nginx, root: Path, source: Path) -> float:
    """PUT the object to nginx as a new file, as gittornado writes one (replacing one costs its removal)."""
    (root / "big").unlink(missing_ok=True)
    return curl("-T", str(source), f"{nginx.url}/big")


def gittornado_upload(server: GittornadoServer, repo: Path, source: Path, oid: str, size: int) -> float:
    shutil.rmtree(repo / "lfs", ignore_errors=True)
    href = batch(server, "upload", oid, size)["actions"]["upload"]["href"]
    return curl("-T", str(source), href)


def gittornado_download(server: GittornadoServer, oid: str, size: int) -> float:
    return curl(batch(server, "download", oid, size)["actions"]["download"]["href"])


def interleaved(runs: int, transfers: Dict[str, Callable[[], float]]) -> Dict[str, Tuple[float, List[float]]]:
    """Each transfer ``runs`` times, taking turns, each from a clean page cache (``sync`` first).

    Without the turns and the ``sync``, a run pays for writing back the
    previous run's gigabyte, and whichever server goes first looks faster.
    """
    times: Dict[str, List[float]] = {name: [] for name in transfers}
    for _ in range(runs):
        for name, transfer in transfers.items():
            os.sync()
            times[name].append(transfer())
    return {name: (min(seconds), seconds) for name, seconds in times.items()}


def measure_memory(server: GittornadoServer, transfer: Callable[[], float]) -> MemoryTrace:
    with MemorySampler(server.classify) as trace:
        transfer()
    return trace


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of the large object (default: 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each transfer, in turns; best counts")
    args = parser.parse_args(argv)

    work = temp_dir("gittornado-lfs-bench-")
    try:
        gitbase = work / "repos"
        repo = gitbase / "bench.git"
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
        objects = {}
        for label, size in (("10 MB", 10 * 10**6), (f"{args.size} MiB", args.size * MIB)):
            path = work / f"object-{size}"
            objects[label] = (path, make_object(path, size), size)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        server = GittornadoServer(gitbase, env, work / "gittornado")
        server.start()
        nginx_root = work / "nginx-root"
        (work / "nginx-tmp").mkdir()
        nginx = Nginx(nginx_root, work / "nginx-tmp")
        try:
            big_path, big_oid, big_size = objects[f"{args.size} MiB"]
            results = {}
            for direction, transfers in (
                (
                    "upload",
                    {
                        "nginx": lambda: nginx_upload(nginx, nginx_root, big_path),
                        "gittornado": lambda: gittornado_upload(server, repo, big_path, big_oid, big_size),
                    },
                ),
                (
                    "download",
                    {
                        "nginx": lambda: curl(f"{nginx.url}/big"),
                        "gittornado": lambda: gittornado_download(server, big_oid, big_size),
                    },
                ),
            ):
                for name, result in interleaved(args.runs, transfers).items():
                    results[direction, name] = result
            print(
                f"# Git LFS: one {args.size} MiB object, best of {args.runs} in turns, each after `sync`"
                " (curl on loopback)\n"
            )
            print("| direction | server | MB/s | seconds (each run) | vs nginx |")
            print("| --- | --- | ---: | --- | ---: |")
            for direction in ("upload", "download"):
                floor = results[direction, "nginx"][0]
                for name in ("nginx", "gittornado"):
                    seconds, times = results[direction, name]
                    runs = ", ".join(f"{t:.2f}" for t in times)
                    rate = big_size / seconds / 1e6
                    print(f"| {direction} | {name} | {rate:,.0f} | {runs} | {floor / seconds:.2f}x |")

            print("\n# gittornado's own memory (PSS of its process, peak while the transfer runs)\n")
            print("| object | upload peak MiB | download peak MiB |")
            print("| --- | ---: | ---: |")
            for label, (path, oid, size) in objects.items():
                up = measure_memory(
                    server, functools.partial(gittornado_upload, server, repo, path, oid, size)
                )
                down = measure_memory(server, functools.partial(gittornado_download, server, oid, size))
                print(f"| {label} | {up.own_peak / MIB:.1f} | {down.own_peak / MIB:.1f} |")
        finally:
            nginx.stop()
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
