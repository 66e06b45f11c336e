"""Worker threads that take blocking calls off the event loop in batches.

``loop.run_in_executor`` costs a queue hand-off, a future chain and a loop wake-up per call;
in a boot storm of a thousand spawns those, and the GIL hand-offs they cause, cost more than
the calls themselves. Here the threads drain a shared queue and hand their finished results
back to the loop in one wake-up per batch: under load the batches grow on their own, and an
idle agent still answers each call at once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Item = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]

_MAX_BATCH = 64


class Workers:
    """A fixed set of threads serving blocking calls for one event loop.

    Call ``shutdown()`` to finish and stop them; they are daemon threads so that a start-up
    failure that never gets there cannot keep the process alive.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._queue: collections.deque[_Item] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closing = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        for t in self._threads:
            t.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a worker; the returned future resolves on the calling loop."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._ready:
            if self._closing:
                raise RuntimeError("workers are shut down")
            self._queue.append((fn, args, fut))
            self._ready.notify()
        return fut

    def _serve(self) -> None:
        done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                fn, args, fut = self._queue.popleft()
            try:
                done.append((fut, True, fn(*args)))
            except BaseException as exc:
                done.append((fut, False, exc))
            # Deliver when nothing more is queued now (another worker may have emptied the
            # queue while this call ran), so no result waits for a call that may never come.
            if not self._queue or len(done) >= _MAX_BATCH:
                batch, done = done, []
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(_deliver, batch)
                except RuntimeError:
                    return

    def shutdown(self) -> None:
        """Finish the queued calls, then stop the threads."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        for t in self._threads:
            t.join()


def _deliver(batch: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in batch:
        if fut.cancelled():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
