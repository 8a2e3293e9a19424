"""Slowing down password guessing: failure counts, fair checks, equal-time rejections.

The defences :class:`~gittornado.inipolicy.IniPolicy` puts around every
password check, each usable on its own by an embedder's policy:

* clients are named by :func:`~gittornado.connections.client_group` (an IPv6
  address by its /64), as the connection caps name them;
* :class:`FailureThrottle` counts attempts per client and user, slows them
  down, then refuses them (429);
* :class:`FairVerifier` runs checks in a small thread pool, taking turns
  between clients, so one client's queue of guesses delays nobody else much;
* :class:`CheckCosts` makes every rejection last as long as a check of the
  slowest hash, so its time tells nothing about which names exist.

README.md's "Access control" section says what these promise.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Dict, Iterable, Mapping, Optional, Tuple, TypeVar

from .access import AccessDenied
from .passwords import hash_setting

T = TypeVar("T")

#: What a timed password check returns: whether it matched, when it began, how long it took (seconds).
TimedCheck = Tuple[bool, float, float]


class FailureThrottle:
    """Counts failed logins per client and per (client, user); slows them down, then refuses them.

    A client is an address group (:func:`client_group`).  Each attempt is
    counted when it is admitted, before its password is checked, and given
    back (:meth:`forgive`) when the password was right, so a burst of parallel
    guesses is counted as it arrives, not after its checks finish.

    Two counters hold each attempt, and each is a leaky bucket that forgets
    its whole limit over ``window`` seconds (one failure every
    ``window / limit`` seconds), so occasional typos never add up:

    * per (client, user name): the first ``free`` failures cost nothing, later
      attempts wait ``delay`` seconds, doubling up to ``max_delay``; at
      ``limit`` that name is refused (429 with ``Retry-After``) from that client;
    * per client, all names together: the same with ``address_free`` (default
      ``4 * free``) and ``address_limit`` (default ``5 * limit``), which stops
      a client trying one password on many names.  ``address_limit`` exceeds
      ``limit``, so one user's failures never lock out other users of the
      client's address.

    At most ``max_clients`` counters are kept, least recently used dropped
    first.  User names are kept as digests, so long names cost no memory.
    """

    def __init__(
        self,
        free: int = 5,
        limit: int = 20,
        delay: float = 0.25,
        max_delay: float = 4.0,
        window: float = 3600.0,
        max_clients: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        *,
        address_free: Optional[int] = None,
        address_limit: Optional[int] = None,
    ) -> None:
        self.free = free
        self.limit = limit
        self.delay = delay
        self.max_delay = max_delay
        self.window = window
        self.address_free = address_free if address_free is not None else 4 * free
        self.address_limit = address_limit if address_limit is not None else 5 * limit
        if self.address_limit <= limit:
            raise ValueError("address_limit must exceed limit, or one user could lock out an address")
        self.max_clients = max_clients
        self._clock = clock
        #: counter key -> (failures, when last updated)
        self._levels: OrderedDict[Tuple[str, ...], Tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._levels)

    def _counters(self, client: str, user: Optional[str]) -> Tuple[Tuple[Tuple[str, ...], int, int], ...]:
        """(key, free, limit) of the counters an attempt of ``user`` from ``client`` goes into."""
        address = (("address", client), self.address_free, self.address_limit)
        if user is None:
            return (address,)
        name = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return (address, (("user", client, name), self.free, self.limit))

    def _level(self, key: Tuple[str, ...], limit: int, now: float) -> float:
        entry = self._levels.get(key)
        if entry is None:
            return 0.0
        level, updated = entry
        return max(0.0, level - (now - updated) * limit / self.window)

    def _add(self, key: Tuple[str, ...], limit: int, amount: float, now: float) -> None:
        level = self._level(key, limit, now) + amount
        if level <= 0:
            self._levels.pop(key, None)
            return
        self._levels[key] = (level, now)
        self._levels.move_to_end(key)
        while len(self._levels) > self.max_clients:
            self._levels.popitem(last=False)

    def failures(self, client: str, user: Optional[str] = None) -> float:
        """Failures ``client`` is charged with: for ``user``, or for all names together."""
        key, _, limit = self._counters(client, user)[-1]
        return self._level(key, limit, self._clock())

    async def admit(self, client: str, user: str) -> None:
        """Count an attempt of ``user`` from ``client`` and wait what it has earned.

        Raises a 429 :class:`AccessDenied` (nothing counted) when a counter is full.
        """
        now = self._clock()
        counters = self._counters(client, user)
        levels = [self._level(key, limit, now) for key, _, limit in counters]
        for (_, _, limit), level in zip(counters, levels):
            if level > limit - 1:
                retry_after = math.ceil((level - (limit - 1)) * self.window / limit)
                raise AccessDenied(429, "Too many failed logins", retry_after=max(1, retry_after))
        for key, _, limit in counters:
            self._add(key, limit, 1, now)
        # A failure counts whole until it has leaked away entirely (ceil), give or take float error.
        steps = max(math.ceil(level - 1e-9) - free for (_, free, _), level in zip(counters, levels))
        if steps >= 0:
            await asyncio.sleep(min(self.delay * 2**steps, self.max_delay))

    def forgive(self, client: str, user: str) -> None:
        """Give back the attempt :meth:`admit` counted: its password was right."""
        now = self._clock()
        for key, _, limit in self._counters(client, user):
            self._add(key, limit, -1, now)


class FairVerifier:
    """Runs password checks in a small thread pool, taking turns between clients.

    Each client (:func:`client_group`) has its own queue and at most
    ``per_client`` checks running; a free thread takes the next check of the
    next client in turn, so a client with many queued guesses delays another
    client's login by about one check, not by its whole queue.  The pool is
    created on first use, so a server that forks starts no thread before.
    """

    def __init__(self, workers: int = 2, per_client: int = 2) -> None:
        self.workers = workers
        self.per_client = per_client
        self._executor: Optional[ThreadPoolExecutor] = None
        self._running: Dict[str, int] = {}
        self._queues: OrderedDict[str, Deque[Tuple[Callable[[], object], asyncio.Future]]] = OrderedDict()

    async def run(self, client: str, check: Callable[[], T]) -> T:
        """Run ``check`` in the pool, in ``client``'s turn; its result."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(client, deque()).append((check, done))
        self._start_checks()
        return await done

    def _start_checks(self) -> None:
        while sum(self._running.values()) < self.workers:
            for client in self._queues:
                if self._running.get(client, 0) < self.per_client:
                    break
            else:
                return
            queue = self._queues.pop(client)
            check, done = queue.popleft()
            if queue:
                self._queues[client] = queue  # at the end: the others go first next time
            if done.cancelled():
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="gittornado-passwords")
            self._running[client] = self._running.get(client, 0) + 1
            running = asyncio.wrap_future(self._executor.submit(check))
            running.add_done_callback(lambda finished, c=client, d=done: self._finished(c, finished, d))

    def _finished(self, client: str, finished: asyncio.Future, done: asyncio.Future) -> None:
        self._running[client] -= 1
        if not self._running[client]:
            del self._running[client]
        if not done.done():
            error = finished.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(finished.result())
        self._start_checks()


class CheckCosts:
    """How long a password check takes per hash setting, so every rejection can take the slowest's time.

    A setting (:func:`~gittornado.passwords.hash_setting`) is measured the
    first time a rejection needs it, by checking a wrong password against one
    of its hashes in the verifier's pool with ``check`` (the policy's own
    timed check, so measurements and logins run the same code).  Real checks can only raise the
    estimate (when the machine is busy), never lower it below that
    measurement: a client could otherwise send passwords that fail fast (a NUL
    byte, which bcrypt refuses unchecked) to shorten every rejection.
    """

    def __init__(self, verifier: FairVerifier, check: Callable[[bytes, str], TimedCheck]) -> None:
        self._verifier = verifier
        self._check = check
        self._measured: Dict[str, float] = {}
        self._recent: Dict[str, float] = {}
        self._measuring: Dict[str, asyncio.Future] = {}

    def observe(self, setting: str, seconds: float) -> None:
        """Count one real check of ``setting`` that took ``seconds``."""
        recent = self._recent.get(setting)
        self._recent[setting] = seconds if recent is None else 0.8 * recent + 0.2 * seconds

    async def slowest(self, samples: Mapping[str, str]) -> float:
        """Seconds a check of the slowest setting in ``samples`` (setting -> one of its hashes) takes."""
        missing = [setting for setting in samples if setting not in self._measured]
        for setting in missing:
            if setting not in self._measuring:
                self._measuring[setting] = asyncio.ensure_future(self._measure(setting, samples[setting]))
        if missing:
            measuring = [self._measuring[setting] for setting in missing if setting in self._measuring]
            await asyncio.gather(*map(asyncio.shield, measuring), return_exceptions=True)
        return max((max(self._measured.get(s, 0.0), self._recent.get(s, 0.0)) for s in samples), default=0.0)

    async def pad_rejection(self, began: float, samples: Mapping[str, str]) -> None:
        """Wait until a rejection that began at ``began`` took as long as the slowest check in ``samples``.

        It always ends on a timer, whether or not a check ran: a check that already took the slowest time
        would otherwise end a moment sooner than a wait for it, and that moment can be measured.
        """
        slowest = await self.slowest(samples)
        await asyncio.sleep(max(_PAD_MARGIN, began + slowest + _PAD_MARGIN - time.monotonic()))

    async def _measure(self, setting: str, hashed: str) -> None:
        try:
            check = functools.partial(self._check, secrets.token_hex(16).encode(), hashed)
            _, _, seconds = await self._verifier.run("(measuring)", check)
            self._measured[setting] = seconds
        finally:
            del self._measuring[setting]


#: Seconds every rejection waits beyond the slowest check (see CheckCosts.pad_rejection).
_PAD_MARGIN = 0.005


def setting_samples(hashes: Iterable[str]) -> Dict[str, str]:
    """One hash of each setting among ``hashes``, to measure what checking it costs."""
    samples: Dict[str, str] = {}
    for hashed in hashes:
        samples.setdefault(hash_setting(hashed), hashed)
    return samples
