"""Output safety for every tool that writes: never overwrite what is read, fail before the work.

    python -c "from runtime.outputs import check_outputs; check_outputs([('--output', 'r.jsonl')], [('--engine', 'm.onnx')])"

check_outputs runs at the start of probres-infer, probres-eval, export.onnx and
export.tensorrt, before any model is loaded. It refuses (OutputError, one line naming both
paths; the tools exit 2):
  - an output that is the same file as an input: same resolved path, or same device and
    inode (a symlink or hard link to the model, an image, the annotations, the checkpoint);
  - an existing output that lies inside an input directory and would itself be read
    (an image the directory walk reaches);
  - an output that is a directory or a socket, or whose location cannot be written: the
    nearest existing parent directory of the (symlink-resolved) target is probed by creating
    and removing a temp file there (os.access is not enough: it ignores read-only mounts, and
    says yes to root everywhere); a device or FIFO, written in place, must be writable.

ResultFile is the streaming side: records are written batch by batch, each batch's lines in
one write and flushed whole, into a temp file that is renamed over the target on success and
also on Ctrl-C, SIGTERM or SIGHUP (so what was classified is kept), or appended to the target
itself (--resume). A device or FIFO is written in place (runtime.fileio's rules), and a regular
output is locked against a second run while it is written (runtime.fileio.OutputLock).
stop_on_signals turns SIGTERM and SIGHUP into Interrupted, a KeyboardInterrupt: one code path
for Ctrl-C, `timeout`, `docker stop`, systemd and batch schedulers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from runtime.errors import UsageError
from runtime.fileio import OutputLock, atomic_open, in_place, write_target

Named = tuple[str, "str | os.PathLike[str] | None"]     # (flag or role, path); None = not given


class OutputError(UsageError):
    """An unsafe or unwritable output; str() is the one line for stderr."""


def _stat(p: Path) -> os.stat_result | None:
    try:
        return os.stat(p)
    except OSError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    """Same resolved path, or (both existing) the same device and inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    sa, sb = _stat(a), _stat(b)
    return sa is not None and sb is not None and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: Path, directory: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, root]) == root and real != root


def check_writable(flag: str, path: str | os.PathLike[str], append: bool = False) -> None:
    """OutputError unless `path` can be created (or replaced, or appended to) without running anything first."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {p}: is a directory; give a file name")
    if in_place(p):                                          # written in place, never replaced
        if stat.S_ISSOCK(os.stat(p).st_mode):
            raise OutputError(f"{flag} {p}: is a socket; give a file name")
        if append:
            raise OutputError(f"{flag} {p}: is not a regular file; --resume appends to a file it can read back")
        if not os.access(p, os.W_OK):                        # opening a FIFO to test it would block
            raise OutputError(f"{flag} {p}: cannot write it (permission denied)")
        return
    parent = write_target(p).parent                          # a symlink's target is what gets replaced
    while not parent.exists() and parent != parent.parent:   # atomic_open creates missing parents
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {p}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probres-write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
        if append and p.exists():
            with open(p, "ab"):
                pass
    except OSError as e:
        where = p if append and p.exists() else parent
        raise OutputError(f"{flag} {p}: cannot write {where} ({e.strerror or e})") from None


def check_outputs(outputs: Iterable[Named], inputs: Iterable[Named],
                  reads: Callable[[str], bool] = lambda name: True, append: Iterable[str] = ()) -> None:
    """Refuse (OutputError) any output that is an input, or lies in an input directory and would be read,
    or cannot be written. `reads(name)` says which files an input directory's walk reads (default all);
    outputs whose flag is in `append` are opened for appending (their existing content is kept). An
    output and an input under the same flag are one file the tool updates in place (a timing cache)."""
    outs = [(f, Path(p)) for f, p in outputs if p is not None]
    ins = [(f, Path(p)) for f, p in inputs if p is not None]
    for i, (fa, a) in enumerate(outs):
        for fb, b in outs[i + 1:]:
            if _same_file(a, b):
                raise OutputError(f"{fa} {a} and {fb} {b} are the same file")
    for fo, o in outs:
        for fi, i in ins:
            if fi == fo:                         # read and rewritten by design (a timing cache)
                continue
            if _same_file(o, i):
                raise OutputError(f"{fo} {o} is the same file as {fi} {i}: refusing to overwrite an input")
            if i.is_dir() and o.exists() and reads(o.name) and _inside(o, i):
                raise OutputError(f"{fo} {o} is an input inside {fi} {i}: refusing to overwrite it")
    append = set(append)
    for fo, o in outs:
        check_writable(fo, o, append=fo in append)


def model_inputs(flag: str, model: str | os.PathLike[str] | None) -> list[Named]:
    """A model path and the files that travel with it (a TensorRT plan's .json sidecar)."""
    if model is None:
        return []
    p = Path(model)
    return [(flag, p), (f"{flag}'s sidecar", p.with_name(p.name + ".json"))] if p.suffix in (
        ".plan", ".engine", ".trt") else [(flag, p)]


class ResultFile:
    """Text records written batch by batch: each batch's text goes out in one write() and is flushed.

    Without append: into a temp file beside `path`, renamed over it on close() and also when
    the run is interrupted (KeyboardInterrupt), so an interrupted run keeps what it wrote;
    a failure (any other exception) leaves `path` untouched. With append: onto `path` itself, locked
    (--resume), so a hard kill loses at most the batch in flight; a line cut short by the kill
    is repaired by the next --resume (runtime.inputs.read_done).
    """

    def __init__(self, path: str | os.PathLike[str] | None, append: bool = False) -> None:
        self.path, self._parts, self.kept, self._writing, self._lock = path, [], 0, False, None
        self._file = path is not None and not in_place(path)     # a regular file (else a stream or device)
        if path is None:
            self._ctx, self.f = None, sys.stdout
        elif append:
            self._lock = OutputLock(path).acquire()               # held until __exit__
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)    # as atomic_open does (check_writable allows it)
                self._ctx, self.f = None, open(path, "a", encoding="utf-8")
            except BaseException:
                self._lock.release()
                raise
        else:
            self._ctx = atomic_open(path, "w", commit_on=(KeyboardInterrupt,))
            self.f = self._ctx.__enter__()
        self._end = self._tell()

    def _tell(self) -> int | None:
        """Byte offset in the file; None for a stream (stdout, a FIFO, a device: never cut back)."""
        return self.f.tell() if self._file else None

    def write(self, text: str) -> None:
        """Buffered until end_batch(): a batch's records reach the file together."""
        self._parts.append(text)

    def end_batch(self, records: int = 0) -> None:
        """Write and flush what write() buffered: `records` more inputs are now in the file."""
        self._writing = True
        if self._parts:
            self.f.write("".join(self._parts))
            self._parts.clear()
        self.f.flush()
        self._writing = False
        self.kept += records
        self._end = self._tell()              # byte offset of the last whole batch

    def __enter__(self) -> "ResultFile":
        return self

    def __exit__(self, et, ev, tb) -> bool:
        self._parts.clear()                    # an unfinished batch is dropped whole (at most one batch lost)
        try:
            if self._writing and self._end is not None:
                # Ctrl-C cut a batch's write() short (the signal interrupts the system call): cut the
                # file back to the end of the last whole batch rather than keep half a line.
                self.f.flush()
                self.f.truncate(self._end)
        finally:
            self._close(et, ev, tb)
        return False

    def _close(self, et, ev, tb) -> None:
        try:
            if self._ctx is not None:
                self._ctx.__exit__(et, ev, tb)     # rename on success or Ctrl-C; temp removed on any other error
            elif self.path is not None:
                self.f.close()
        finally:
            if self._lock is not None:
                self._lock.release()


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so a run ends the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal killed: 130 for
    Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(e, "signum", signal.SIGINT)


def interrupted_by(e: KeyboardInterrupt) -> str:
    """'' for Ctrl-C, ' by SIGTERM' or ' by SIGHUP' otherwise: what the message says stopped the run."""
    signum = getattr(e, "signum", signal.SIGINT)
    return "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While inside: each signal in `signums` raises Interrupted in the main thread (unless it was
    ignored when we started: nohup's SIGHUP). The first one sets them all to ignored, so a second `kill` cannot cut short the commit of what was done.
    The previous handlers come back on exit. Outside the main thread, nothing is installed."""
    def handler(signum, frame):
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    try:                                          # a signal ignored by whoever started us (nohup) stays ignored
        old = {s: signal.signal(s, handler) for s in signums if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:                            # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
