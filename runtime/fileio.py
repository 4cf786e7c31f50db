"""Small file helpers shared by every layer: safe writes, output locks, strict JSON and hashing.

    python -c "from runtime.fileio import sha256_file; print(sha256_file('model.onnx'))"

Output rules (docs/outputs.md), applied by atomic_open to every writer that uses it:
  - a regular file (new or existing) is written to a temp file in its directory and renamed
    over it, so an interrupted run never leaves a truncated file behind;
  - a symlink is resolved first and its target treated by the same rule (the link stays);
  - a device or FIFO is written in place, never replaced (/dev/null stays /dev/null; /dev/full
    gives ENOSPC, an OSError every tool reports in one line); a socket cannot be opened (OSError);
  - a regular output is locked (OutputLock) while it is written: a second writer of the same
    file, in another process, gets OutputLocked (an OSError) naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


def in_place(path: str | os.PathLike[str]) -> bool:
    """Does `path` (symlinks followed) exist and is not a regular file or directory: a device, FIFO
    or socket, which is written in place (or refused), never replaced by a rename."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to `path` replaces: the symlink's final target (which may not exist yet)."""
    return Path(os.path.realpath(path))


class OutputLocked(OSError):
    """Another process holds the output's lock; str() and .strerror are the one line for stderr."""

    def __init__(self, path: str | os.PathLike[str], holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(errno.EWOULDBLOCK, f"{path} is being written by another run{who}; "
                                            f"wait for it to finish or choose another output")

    def __str__(self) -> str:
        return self.strerror


_held: dict[str, list] = {}      # lock path -> [fd, count]: this process's locks (nested writers reuse them)


class OutputLock:
    """An exclusive, non-blocking flock on a sidecar `.NAME.lock` beside the output's real target.

    The sidecar (not the target) is locked because the target is replaced by a rename (a lock on
    the old inode would not cover the new one) or does not exist yet. It holds the holder's pid
    and is removed on release, while still locked; an acquirer that finds the file it locked is
    no longer the one at that path (removed meanwhile) tries again. Devices, FIFOs, sockets and
    stdout (path None) are not locked: they are streams, not results one run owns. Re-entrant
    within a process (probres-infer locks before reading --resume, then its writer locks again).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self.lock_path = None
        if path is not None and not in_place(path):
            real = write_target(path)
            self.lock_path = str(real.with_name(f".{real.name}.lock"))

    def acquire(self) -> "OutputLock":
        if self.lock_path is None:
            return self
        if self.lock_path in _held:
            _held[self.lock_path][1] += 1
            return self
        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise OutputLocked(self.path, holder) from None
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                _held[self.lock_path] = [fd, 1]
                return self
            os.close(fd)                          # the holder removed it as we opened it: take the new one
        raise OutputLocked(self.path, "")

    def release(self) -> None:
        entry = _held.get(self.lock_path) if self.lock_path else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.lock_path]
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)         # while still locked: see the class docstring
            os.close(entry[0])

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8",
                commit_on: tuple[type[BaseException], ...] = ()) -> Iterator[IO]:
    """Open a temp file beside `path`'s real target; on clean exit fsync and rename it over that target.

    A device or FIFO is opened and written in place instead (see the module docstring). The
    output is locked (OutputLock) until the file is closed.
    commit_on: exceptions that still commit what was written before re-raising (probres-infer
    passes KeyboardInterrupt: Ctrl-C keeps the results so far); any other removes the temp file.
    """
    binary = "b" in mode
    if in_place(path):
        with open(path, mode, encoding=None if binary else encoding) as f:
            yield f
        return
    with OutputLock(path):
        target = write_target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            # mkstemp creates 0600 files; give the result the mode a plain open() would
            # (0666 minus the umask), so other users (a Triton server, say) can read it.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
                try:
                    yield f
                except commit_on:
                    _commit(f, tmp, target)
                    raise
                _commit(f, tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _commit(f: IO, tmp: str, path: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, path)


def strict_json(obj: object, **kwargs) -> str:
    """json.dumps with every non-finite float (NaN, inf: a metric with no cases) written as null.

    Python writes NaN as a bare `NaN`, which is not JSON: jq, JavaScript and most other readers refuse the file.
    """
    def clean(o: object) -> object:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
