"""Input paths -> chunks of up to batch_size, read in a thread, so an input that stalls never holds back work.

    python -c "from runtime.chunks import Chunks; c = Chunks(['a', 'b', 'c'], 2); print(c.next(), c.next(), c.next())"

iter_batches once read each batch's paths in its producer before it handed out the batch
before, so `tail -f list | probres-infer --from-list -` classified nothing until another
batch of paths had arrived (and nothing at all if none came). Here a reader thread takes the
paths and closes a chunk at batch_size; the consumer takes a partial chunk when the input ends,
or when no path has arrived for `linger` seconds. A list file or a directory walk fills every
chunk (its reader never pauses that long); a stream on stdin gets a partial one when it pauses.
Memory stays fixed: the reader is at most READ_AHEAD full chunks ahead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterable

LINGER_S = 0.05      # a pause this long in the input closes a partial chunk
READ_AHEAD = 2       # full chunks the reader may hold before it waits


class Chunks:
    """Chunks of `size` paths from `source`, read by a daemon thread (see the module docstring)."""

    def __init__(self, source: Iterable[str], size: int, linger: float = LINGER_S) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._source, self._size, self._linger = iter(source), size, linger
        self._cond = threading.Condition()
        self._ready: deque[list[str]] = deque()
        self._partial: list[str] = []
        self._last = time.monotonic()             # when the last path arrived
        self._done = self._closed = False
        self._error: BaseException | None = None
        threading.Thread(target=self._read, name="probres-paths", daemon=True).start()

    def _read(self) -> None:
        try:
            for path in self._source:
                with self._cond:
                    if self._closed:
                        return
                    self._partial.append(path)
                    self._last = time.monotonic()
                    if len(self._partial) < self._size:
                        continue
                    while len(self._ready) >= READ_AHEAD and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    if self._partial:     # next() may have taken it while we waited (a "pause"): no empty chunk
                        self._ready.append(self._partial)
                        self._partial = []
                    self._cond.notify_all()
        except BaseException as e:  # a failing path iterator: raised by next() after the paths before it
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def next(self, block: bool = True, linger: float | None = None,
             stop: Callable[[], bool] = lambda: False) -> list[str] | None:
        """The next chunk; None at the end of the input (or when `stop()`); re-raises the source's exception.

        block=False: [] at once when no chunk is ready (none full, and no partial one to close yet).
        linger: this call's pause that closes a partial chunk (default: the constructor's).
        """
        linger = self._linger if linger is None else linger
        with self._cond:
            while True:
                if self._ready:
                    chunk = self._ready.popleft()
                    self._cond.notify_all()
                    return chunk
                if self._done or self._partial and time.monotonic() - self._last >= linger:
                    chunk, self._partial = self._partial, []
                    if chunk:
                        return chunk
                    if self._error is not None:
                        e, self._error = self._error, None
                        raise e
                    return None
                if not block:
                    return []
                if stop():
                    return None
                pause = time.monotonic() - self._last
                self._cond.wait(max(linger - pause, 0.001) if self._partial else linger)

    def ended(self) -> bool:
        """True when every path has been handed out: the input is over."""
        with self._cond:
            return self._done and not self._ready and not self._partial and self._error is None

    def close(self) -> None:
        """Let the reader stop at its next path (one blocked reading stdin stays, as a daemon thread)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
