"""The bytes of chunk data the service holds at once: each put's receive buffer and each fetch's chunk
buffers, from the moment they are allocated until the put is stored or the fetch's response is sent.

Without a bound, memory grows with the number of concurrent requests (each up to ``max_body_bytes``, or a
fetch of ``max_chunks_per_batch`` chunks). With one, a request whose bytes do not fit waits its turn, first
come first served, so a large request is not starved by a stream of small ones. A request larger than the
whole budget takes all of it and runs alone. A cancelled wait leaves the queue: the service cancels a request's
wait when its client leaves or after ``budget_wait_s`` (``Service.hold`` in :mod:`kvtier.api.app`). All calls
run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """At most ``limit`` bytes held at once; ``held`` and ``waiting`` are what a metrics scrape reads."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a byte budget must be positive, got {limit}")
        self.limit = limit
        self.held = 0
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for their bytes."""
        return len(self._queue)

    def try_acquire(self, nbytes: int) -> int | None:
        """Hold ``nbytes`` (at most the whole budget) now if they fit and nobody waits: the bytes held, to be
        given to :meth:`release`; None if the request would have to wait."""
        n = min(max(0, nbytes), self.limit)
        if n == 0:  # nothing to hold (a fetch past the prompt's last chunk): no need to queue
            return 0
        if not self._queue and self.held + n <= self.limit:
            self.held += n
            return n
        return None

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (at most the whole budget) fit behind every earlier request, and hold them.
        Returns the bytes held, to be given to :meth:`release`. Cancelling the wait leaves the queue."""
        held = self.try_acquire(nbytes)
        if held is not None:
            return held
        n = min(nbytes, self.limit)
        entry = (n, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        try:
            await entry[1]  # set by _grant once the bytes are held for us
        except asyncio.CancelledError:
            if not entry[1].cancelled():
                self.release(n)  # granted just as the request was cancelled
            else:
                if entry in self._queue:
                    self._queue.remove(entry)
                self._grant()  # the next in line may fit now
            raise
        return n

    def release(self, n: int) -> None:
        """Give back ``n`` bytes from :meth:`acquire`."""
        self.held -= n
        self._grant()

    def _grant(self) -> None:
        while self._queue and self.held + self._queue[0][0] <= self.limit:
            n, future = self._queue.popleft()
            if future.cancelled():  # its request was cancelled and has not yet left the queue itself
                continue
            self.held += n
            future.set_result(None)
