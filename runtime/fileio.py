"""Small file helpers shared by every layer: atomic writes, strict JSON and hashing.

    python -c "from runtime.fileio import sha256_file; print(sha256_file('model.onnx'))"

Results are written to a temp file in the destination directory and renamed over the
target, so an interrupted run never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8",
                commit_on: tuple[type[BaseException], ...] = ()) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`.

    commit_on: exceptions that still commit what was written before re-raising (probres-infer
    passes KeyboardInterrupt: Ctrl-C keeps the results so far); any other removes the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
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
                _commit(f, tmp, path)
                raise
            _commit(f, tmp, path)
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
