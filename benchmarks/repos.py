"""Seeded, reproducible test repositories, built with ``git fast-import`` and cached.

Two shapes, both generated from a seed so every machine builds the same
objects:

* a history-rich repository (:class:`HistorySpec`): many commits touching many
  files, blob contents drawn from seeded random bytes so the pack stays large
  (a few hundred MB at full size), with an annotated tag every so often;
* a big-blob repository (:class:`BlobSpec`): one commit holding one
  incompressible blob (1 GiB at full size), streamed to fast-import in
  1 MiB pieces so it is never held in memory.

Built repositories are cached under ``benchmarks/work/repos/`` in a directory
named after their parameters, so a rerun with the same parameters skips the
build; a build goes to a temporary name first and is renamed when complete,
so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict

#: Everything the benchmark generates lives here (git-ignored).
WORK = Path(__file__).resolve().parent / "work"
#: The directory both servers serve; cached repositories are built straight into it.
REPOS = WORK / "repos"
#: Timestamps start here so commit ids do not depend on the day of the build.
EPOCH = 1_600_000_000
#: Piece size when streaming a big blob into fast-import.
PIECE = 1024 * 1024


def git_env(home: Path) -> Dict[str, str]:
    """Environment for every git the benchmark runs: no user or system config leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME="Bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="Bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
    )
    return env


@dataclass(frozen=True)
class HistorySpec:
    """A repository with a long history over many files.

    ``commits`` commits each rewrite ``touch`` files (the first passes create
    all ``files`` paths, later ones pick paths at random); blobs are
    ``blob_bytes`` on average, base64 of seeded random bytes.
    """

    commits: int
    files: int
    blob_bytes: int
    touch: int = 2
    tag_every: int = 1000
    seed: int = 5

    @property
    def name(self) -> str:
        return f"history-c{self.commits}-f{self.files}-b{self.blob_bytes}-t{self.touch}-s{self.seed}.git"


@dataclass(frozen=True)
class BlobSpec:
    """A repository whose one commit holds one incompressible blob of ``size`` bytes."""

    size: int
    seed: int = 5

    @property
    def name(self) -> str:
        return f"blob-{self.size}-s{self.seed}.git"


def _data(out: BinaryIO, payload: bytes) -> None:
    out.write(b"data %d\n" % len(payload))
    out.write(payload)
    out.write(b"\n")


def _write_history(spec: HistorySpec, out: BinaryIO) -> None:
    """Emit the fast-import stream of ``spec`` (deterministic for a given spec)."""
    rng = random.Random(spec.seed)
    mark = 0
    created = 0
    per_dir = 200
    for number in range(spec.commits):
        changes = []
        for _ in range(spec.touch):
            if created < spec.files:
                index = created
                created += 1
            else:
                index = rng.randrange(spec.files)
            size = rng.randint(spec.blob_bytes // 4, spec.blob_bytes * 7 // 4) * 3 // 4
            mark += 1
            out.write(b"blob\nmark :%d\n" % mark)
            _data(out, base64.encodebytes(rng.randbytes(size)))
            changes.append(b"M 100644 :%d d%03d/f%05d.txt\n" % (mark, index // per_dir, index))
        when = EPOCH + number * 60
        out.write(b"commit refs/heads/main\n")
        out.write(b"committer Bench <bench@example.com> %d +0000\n" % when)
        _data(out, b"commit %d\n" % number)
        out.writelines(changes)
        out.write(b"\n")
        if spec.tag_every and (number + 1) % spec.tag_every == 0:
            out.write(b"tag v%d\nfrom refs/heads/main\n" % (number + 1))
            out.write(b"tagger Bench <bench@example.com> %d +0000\n" % when)
            _data(out, b"release %d\n" % (number + 1))


def _write_blob(spec: BlobSpec, out: BinaryIO) -> None:
    """Emit one commit with ``big.bin`` of ``spec.size`` seeded random bytes, in pieces."""
    rng = random.Random(spec.seed)
    out.write(b"blob\nmark :1\ndata %d\n" % spec.size)
    left = spec.size
    while left:
        piece = min(PIECE, left)
        out.write(rng.randbytes(piece))
        left -= piece
    out.write(b"\ncommit refs/heads/main\n")
    out.write(b"committer Bench <bench@example.com> %d +0000\n" % EPOCH)
    _data(out, b"one big blob\n")
    out.write(b"M 100644 :1 big.bin\n\n")


def build(spec: HistorySpec | BlobSpec, home: Path, log=print) -> Path:
    """Return the cached bare repository for ``spec``, building it first if needed."""
    target = REPOS / spec.name
    if (target / "bench-complete").exists():
        return target
    REPOS.mkdir(parents=True, exist_ok=True)
    partial = REPOS / (spec.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    env = git_env(home)
    log(f"building {spec.name} (cached for later runs) ...")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(partial)], env=env, check=True)
    proc = subprocess.Popen(
        # unpackLimit=0: keep even a one-object import packed (a loose 1 GiB
        # object would be recompressed by every clone).
        ["git", "-C", str(partial), "-c", "fastimport.unpackLimit=0", "fast-import", "--quiet", "--done"],
        stdin=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    with proc.stdin as out:
        if isinstance(spec, HistorySpec):
            _write_history(spec, out)
        else:
            _write_blob(spec, out)
        out.write(b"done\n")
    if proc.wait() != 0:
        raise RuntimeError(f"git fast-import failed for {spec.name}")
    if isinstance(spec, HistorySpec):
        # What a served repository looks like after `git gc`: one pack with a
        # reachability bitmap, so clones spend their time sending, not counting.
        subprocess.run(
            ["git", "-C", str(partial), "repack", "-a", "-d", "-q", "--write-bitmap-index"],
            env=env,
            check=True,
        )
    (partial / "bench-complete").write_text(repr(spec) + "\n")
    partial.rename(target)
    return target


def pack_bytes(repo: Path) -> int:
    """Total size of the repository's packs (what a full clone sends, roughly)."""
    return sum(p.stat().st_size for p in (repo / "objects" / "pack").glob("*.pack"))
