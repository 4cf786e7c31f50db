"""probres-infer's input stream: command-line paths and --from-list files, sharding, resume bookkeeping.

    probres-infer --engine model.onnx --from-list paths.txt --shard 0/3 --output part0.jsonl --resume

Inputs are a stream, never a list: directories are walked lazily (runtime.pipeline's
iter_image_paths) and a list file is read line by line, so memory does not depend on how many
paths there are. --shard I/N keeps the paths whose stable hash (BLAKE2b of the path string as
given) is I modulo N: the same path lands in the same shard on every machine whatever the
listing order, so N processes given the same paths label a store together, each input once.
--resume reads the JSONL already written and skips every image recorded there (results and
error records alike), keeping only an 8-byte hash per record (8 MB per million), and cuts off
a last line left unfinished by a hard kill. Its provenance header (runtime.provenance; one per
file, or one per part in `cat part*.jsonl`, all the same) is returned for probres-infer to
compare with the run's own; a record whose file name is not UTF-8 is matched by its
"image_base64" (the name's raw bytes).
A list file is a text file: one holding a NUL byte (no path can) is refused before any work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from array import array
from bisect import bisect_left
from itertools import chain
from typing import IO, Iterable, Iterator

import numpy as np

from runtime.errors import UsageError
from runtime.pipeline import iter_image_paths
from runtime.provenance import JSONL_START, describe, parse_header, same_run


RECORD_START = b'{"image": '      # how every record of runtime.report's jsonl writer begins
RAW_KEY = b'"image_base64": '       # present only when the file name is not valid UTF-8 (runtime.report)


class InputError(UsageError):
    """A bad list file, --shard value or resume file; str() is the one line for stderr."""


def path_hash(path: str) -> int:
    """Stable 64-bit hash of a path string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(path), digest_size=8).digest(), "little")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4 (shards are numbered 0..N-1)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need N >= 1 and 0 <= I < N (shards are numbered 0..N-1)")
    return i, n


def read_list(path: str) -> Iterator[str]:
    """Paths from a list file (or '-': stdin), one a line, blank lines skipped; read as it is consumed."""
    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        for lineno, raw in enumerate(_stdin_lines(f) if path == "-" else f, 1):   # bytes: any path, as os.listdir
            if b"\0" in raw:                     # stdin: nothing could check it before the run
                raise InputError(f"--from-list {path} line {lineno}: a NUL byte; this is a binary file, "
                                 f"not a list of paths one a line")
            line = raw.rstrip(b"\r\n")
            if line:
                yield os.fsdecode(line)
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _stdin_lines(f: IO[bytes]) -> Iterator[bytes]:
    """The lines of stdin, after a check of its first read (up to 64 KiB: what is there, no wait for
    more) for a NUL byte, so a binary file piped in is refused before its first "path" is tried."""
    head = f.read1(1 << 16)
    at = head.find(b"\0")
    if at >= 0:
        raise InputError(f"--from-list -: a binary file (NUL byte at offset {at}), not a list of paths one a line")
    parts = head.splitlines(keepends=True)
    if parts and not parts[-1].endswith(b"\n"):
        parts[-1] += f.readline()               # the line the read cut in two
    yield from parts
    yield from f


def check_list(path: str | None) -> None:
    """InputError unless the --from-list file can be read and is text (checked before any work).

    A NUL byte anywhere makes it binary (a model given by mistake, say): no path can hold one.
    The whole file is scanned, in 1 MiB reads: a second for ~1 GB, next to hours of classifying.
    """
    if path is None or path == "-":
        return
    if os.path.isdir(path):
        raise InputError(f"--from-list {path}: is a directory; give a file with one path a line")
    try:
        with open(path, "rb") as f:
            offset = 0
            for chunk in iter(lambda: f.read(1 << 20), b""):
                at = chunk.find(b"\0")
                if at >= 0:
                    raise InputError(f"--from-list {path}: a binary file (NUL byte at offset {offset + at}), "
                                     f"not a list of paths one a line")
                offset += len(chunk)
    except OSError as e:
        raise InputError(f"--from-list {path}: {e.strerror or e}") from None


def iter_inputs(paths: Iterable[str], from_list: str | None = None) -> Iterator[str]:
    """Command-line paths (directories walked), then the list file's paths (taken as given, not walked)."""
    yield from iter_image_paths(paths)
    if from_list is not None:
        yield from read_list(from_list)


def _is_file(path: str, target: str, name: str) -> bool:
    """Is `path` the file `target` (basename `name`)? The basename test first: one string compare per path."""
    return os.path.basename(path) == name and os.path.exists(path) and os.path.samefile(path, target)


def find_in_list(list_path: str, target: str) -> tuple[int, str] | None:
    """(line number, path) of the first entry of a list file that is the existing file `target`, else None."""
    name = os.path.basename(target)
    for lineno, p in enumerate(read_list(list_path), 1):
        if _is_file(p, target, name):
            return lineno, p
    return None


def refuse_output(paths: Iterable[str], output: str, flag: str = "--output") -> Iterator[str]:
    """The same stream; InputError as soon as an input is the existing file `output`.

    The last line of defence, for inputs nothing could list before the run (stdin): the run
    stops before `output` is replaced (a temp file holds the results until the end).
    """
    name = os.path.basename(output)
    for p in paths:
        if _is_file(p, output, name):
            raise InputError(f"{flag} {output} is the same file as the input {p}: refusing to overwrite an input")
        yield p


def take_shard(paths: Iterable[str], index: int, count: int) -> Iterator[str]:
    """The paths of shard `index` of `count` (all of them when count == 1)."""
    if count == 1:
        return iter(paths)
    return (p for p in paths if path_hash(p) % count == index)


def peek(paths: Iterable[str]) -> Iterator[str] | None:
    """The same stream, or None when it is empty (reads one item)."""
    it = iter(paths)
    for first in it:
        return chain([first], it)
    return None


class DoneSet:
    """The images already recorded in a JSONL output: their path hashes, sorted (8 bytes each)."""

    def __init__(self, hashes: np.ndarray, dropped_bytes: int = 0, header: dict | None = None) -> None:
        # array('Q') rather than numpy for lookups: bisect on it costs ~1 us a path, where a scalar
        # np.searchsorted call costs ~10 us of overhead (and batching lookups would stall a stdin list).
        self.hashes = array("Q", np.sort(hashes.astype(np.uint64)).tobytes())
        self.dropped_bytes = dropped_bytes       # size of the unfinished last line cut off, 0 if none
        self.skipped = 0                         # inputs skipped so far by skip_done
        self.header = header                     # the file's provenance header, None if it has none

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, path: str) -> bool:
        h = path_hash(path)
        i = bisect_left(self.hashes, h)
        return i < len(self.hashes) and self.hashes[i] == h

    def skip_done(self, paths: Iterable[str]) -> Iterator[str]:
        """The paths not recorded yet, in order, one at a time; counts the others in self.skipped."""
        if not self.hashes:
            yield from paths
            return
        for p in paths:
            if p in self:
                self.skipped += 1
            else:
                yield p


def _record_image(raw: bytes) -> str:
    """The "image" of one JSONL record, as the input stream gives it. Records this tool wrote begin
    with RECORD_START: only their first value is decoded (raw_decode stops after it: 1M records in
    seconds, not tens). A non-UTF-8 name comes back from its raw bytes ("image_base64")."""
    if raw.startswith(RECORD_START) and raw.rstrip().endswith(b"}") and RAW_KEY not in raw:
        image = _DECODER.raw_decode(raw[len(RECORD_START):].decode("utf-8"))[0]
        if isinstance(image, str):
            return image
    rec = json.loads(raw)
    if "image_base64" in rec:
        return os.fsdecode(base64.b64decode(rec["image_base64"], validate=True))
    return rec["image"]


_DECODER = json.JSONDecoder()


def read_done(path: str) -> DoneSet:
    """Scan an existing probres-infer JSONL for --resume; InputError if it is not one.

    A last line without its newline is what a hard kill mid-write leaves: the file is
    truncated back to the end of the last whole line, and that image is classified again.
    """
    hashes = array("Q")
    if not os.path.exists(path):
        return DoneSet(np.zeros(0, np.uint64))
    end, dropped, head = 0, 0, None
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"--resume: cannot read {path} ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):          # only the last line can lack it
                if not any(raw.startswith(s) or s.startswith(raw) for s in (RECORD_START, JSONL_START)):
                    raise InputError(f"--resume: {path} line {lineno} is not a probres-infer JSONL record "
                                     f"(--resume appends to the JSONL output of an earlier run)")
                dropped = len(raw)
                break
            end += len(raw)
            if not raw.strip():
                continue
            if raw.startswith(JSONL_START) and (h := parse_header(raw)) is not None:
                if head is not None and not same_run(head, h):      # shards concatenated: all one run
                    raise InputError(f"--resume: {path} line {lineno}: a header for {describe(h)} after one for "
                                     f"{describe(head)}: the file mixes two models or decision rules")
                head = head or h
                continue
            try:
                image = _record_image(raw)
            except (ValueError, KeyError, TypeError):
                raise InputError(f"--resume: {path} line {lineno} is not a probres-infer JSONL record "
                                 f"(--resume appends to the JSONL output of an earlier run)") from None
            hashes.append(path_hash(str(image)))
    if dropped:
        os.truncate(path, end)
    return DoneSet(np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64), dropped, head)
