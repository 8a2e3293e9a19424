"""Worker processes that share one listening socket, and the parent that minds them.

This follows :func:`tornado.process.fork_processes` (fork after binding, start
a new worker when one dies abnormally, exit when all have exited) with one
difference that makes it a separate function: the parent here knows its
workers' process ids, so it passes SIGTERM, SIGINT and SIGHUP on to them.
``kill <parent>`` (what systemd and shells do) then stops every worker
gracefully, and ``kill -HUP <parent>`` reloads every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Callable, Dict, Optional, Sequence

log = logging.getLogger("gittornado")

#: Signals the parent passes on to every worker.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A worker that dies sooner than this after starting is restarted only after
#: this delay, so a worker that cannot start does not fork in a tight loop.
RESTART_DELAY = 1.0
#: A worker that lived at least this long was healthy; shorter lives count as failed starts.
HEALTHY_LIFETIME = 10.0
#: After this many failed starts in a row the parent stops everything and exits
#: with an error, so a supervisor such as systemd sees the failure.
MAX_FAILED_STARTS = 10


class WorkerPool:
    """``count`` forked workers, restarted when they die, stopped when the parent is told to stop.

    ``sockets`` are the listening sockets the workers inherit; the parent
    closes its copies when it is told to stop, so that once the workers stop
    accepting, new connections are refused instead of left waiting.
    ``on_exit`` is called in the parent with the pid of each worker that exits.
    """

    def __init__(
        self,
        count: int,
        sockets: Sequence[socket.socket],
        on_exit: Optional[Callable[[int], object]] = None,
    ) -> None:
        self.count = count
        self.sockets = sockets
        self.on_exit = on_exit
        self.children: Dict[int, int] = {}  # pid -> worker index
        self.started: Dict[int, float] = {}  # pid -> time.monotonic() at fork
        self.stopping = False

    def run(self) -> Optional[int]:
        """Fork the workers and mind them.

        Returns the worker's index (``0 .. count-1``) in each worker, which
        should then serve.  Returns ``None`` in the parent once every worker
        has exited after a stop signal; raises :class:`SystemExit` in the
        parent if workers keep failing to start.
        """
        for signum in FORWARDED:
            signal.signal(signum, self._forward)
        for index in range(self.count):
            if self._fork(index):
                return index
        failed_starts = 0
        while self.children:
            pid, status = os.wait()
            index = self.children.pop(pid, None)
            if index is None:
                continue
            lifetime = time.monotonic() - self.started.pop(pid)
            if self.on_exit is not None:
                self.on_exit(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping or code == 0:
                log.info("worker %d (pid %d) exited", index, pid)
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            failed_starts = failed_starts + 1 if lifetime < HEALTHY_LIFETIME else 0
            if failed_starts >= MAX_FAILED_STARTS:
                log.error("worker %d (pid %d) %s; it keeps failing, stopping", index, pid, how)
                self._forward(signal.SIGTERM, None)
                continue
            log.warning("worker %d (pid %d) %s; starting a new one", index, pid, how)
            if lifetime < RESTART_DELAY:
                time.sleep(RESTART_DELAY - lifetime)
            if not self.stopping and self._fork(index):
                return index
        if failed_starts >= MAX_FAILED_STARTS:
            raise SystemExit("gittornado: workers keep failing to start; gave up")
        return None

    def _fork(self, index: int) -> bool:
        """Start worker ``index``; True in the new worker, False in the parent."""
        # Block the forwarded signals across fork() so the new worker can never
        # run the parent's handler.  The worker keeps them blocked until its
        # event loop has installed its own handlers (serve() unblocks them), so
        # a signal forwarded while it starts waits for it instead of killing it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            for signum in FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            return True
        self.children[pid] = index
        self.started[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return False

    def _forward(self, signum: int, frame: object) -> None:
        if signum != signal.SIGHUP and not self.stopping:
            self.stopping = True
            for sock in self.sockets:
                sock.close()
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # exited; os.wait() will report it
