"""runtime.chunks: the paths reader behind iter_batches (full chunks, a partial one when the input pauses)."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from runtime.chunks import READ_AHEAD, Chunks


def test_a_list_gives_full_chunks_then_the_rest_then_none():
    c = Chunks([f"p{i}" for i in range(7)], 3)
    assert c.next() == ["p0", "p1", "p2"] and c.next() == ["p3", "p4", "p5"] and c.next() == ["p6"]
    assert c.next() is None and c.ended() and c.next() is None


def test_a_pause_in_the_input_closes_a_partial_chunk_and_the_rest_follows():
    go = threading.Event()

    def stream():                    # three paths, then nothing until `go` (stdin that stays open)
        yield from ("a", "b", "c")
        go.wait(10)
        yield from ("d", "e", "f", "g")

    c = Chunks(stream(), 4, linger=0.05)
    t0 = time.monotonic()
    assert c.next() == ["a", "b", "c"] and time.monotonic() - t0 < 5       # not held for "d"
    assert c.next(block=False) == [] and not c.ended()                       # nothing there yet: at once
    go.set()
    assert c.next() == ["d", "e", "f", "g"] and c.next() is None


def test_the_source_error_comes_after_the_paths_before_it():
    def broken():
        yield from ("a", "b")
        raise OSError("list file went away")

    c = Chunks(broken(), 4)
    assert c.next() == ["a", "b"]
    with pytest.raises(OSError, match="went away"):
        c.next()
    assert c.next() is None


def test_the_reader_stays_a_fixed_number_of_chunks_ahead():
    taken = itertools.count()
    c = Chunks((f"p{next(taken)}" for _ in itertools.repeat(None)), 5)     # an endless input
    time.sleep(0.3)
    assert next(taken) <= (READ_AHEAD + 1) * 5 + 1                          # not the whole (endless) input
    assert c.next() == [f"p{i}" for i in range(5)]
    stopped = Chunks(iter(lambda: time.sleep(0.01) or "x", None), 10**6)   # never a full chunk
    assert stopped.next(stop=lambda: True, linger=60) is None              # stop() ends a blocked wait
    c.close()
    stopped.close()
