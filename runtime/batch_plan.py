"""probres-batch's bookkeeping, without Ray: the input plan, the job manifest, chunk files and _SUCCESS.

    python -c "from runtime.batch_plan import *; print(scan_plan(Location.of('out/'), 256).count)"

Exactly once comes from here, not from Ray. The inputs (a directory walked in sorted order as
probres-infer walks it, a list file, or a glob expanded in sorted order) are streamed once into
OUT_DIR/_inputs.txt, then cut into chunks of K consecutive lines: chunk i is lines iK..iK+K-1.
The driver keeps a byte offset and a hash per chunk, never the paths (8 + 8 bytes per K inputs).
OUT_DIR is a runtime.batch_fs.Location: a local directory or a URI (s3://, gs://, file://).
Chunk i's records go to part-IIIIII-HASH.EXT (HASH: of its lines), written to a temp name and
renamed by whichever worker ran it: a retried or duplicated chunk rewrites the same file whole,
so a reader sees each input once and never a partial file. _job.json (written before any chunk)
pins the inputs, the model's sha256, K and the format; --resume keeps the frozen plan, checks
the manifest, and skips the chunks whose file exists. _SUCCESS, written last, lists every
file with its record count.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
from array import array
from dataclasses import dataclass
from typing import Iterator

from runtime.batch_fs import Location, is_uri, iter_uri_dir, last_line
from runtime.inputs import InputError, read_list
from runtime.pipeline import iter_image_paths

PLAN = "_inputs.txt"
MANIFEST = "_job.json"
SUCCESS = "_SUCCESS"
PART_PREFIX = "part-"
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl"}
MANIFEST_KEYS = ("input", "cwd", "model_sha256", "chunk_size", "format", "all_probs")   # must match on --resume


# ---------------------------------------------------------------------------------------------- inputs

def input_kind(spec: str) -> str:
    """'dir', 'list' or 'glob' for --input (a URI: 'dir' or 'list'); InputError when it is none of them."""
    if is_uri(spec):
        try:
            kind = Location.of(spec).kind()
        except (OSError, ValueError) as e:
            raise InputError(f"--input {spec}: {last_line(e)}") from None
        if kind == "missing":
            raise InputError(f"--input {spec}: no such directory or list file")
        return "list" if kind == "file" else "dir"
    if os.path.isdir(spec):
        return "dir"
    if os.path.isfile(spec):
        return "list"
    if glob.has_magic(spec):
        return "glob"
    raise InputError(f"--input {spec}: no such directory, list file or glob pattern")


def _match_parts(parts: list[str], pattern: list[str]) -> bool:
    """Component-wise glob match ('*' never crosses '/'; '**' matches any number of components)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(parts[1:], pattern[1:])


def iter_glob(pattern: str) -> Iterator[str]:
    """Files matching `pattern`, in sorted walk order, streamed (glob.iglob's order is the file system's)."""
    parts = pattern.split(os.sep)
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    prefix = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "")
    root = prefix or "."
    want = parts[fixed:]
    deep = "**" in want

    def walk(d: str, rel: list[str]) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            sub = rel + [e.name]
            if e.is_dir(follow_symlinks=False):
                if deep or len(sub) < len(want):
                    yield from walk(e.path, sub)
            elif _match_parts(sub, want):
                yield os.path.join(prefix, *sub)

    yield from walk(root, [])


def iter_input(spec: str) -> Iterator[str]:
    """The paths of --input, streamed: a directory walked (as probres-infer walks it), a list file, a glob."""
    kind = input_kind(spec)
    if is_uri(spec):
        return iter_uri_dir(spec) if kind == "dir" else _read_uri_list(spec)
    if kind == "dir":
        return iter_image_paths([spec])
    if kind == "list":
        return read_list(spec)
    return iter_glob(spec)


def _read_uri_list(uri: str) -> Iterator[str]:
    """The paths of a list file at a URI, one a line, blank lines skipped, streamed."""
    loc = Location.of(uri)
    with loc.fs.open_input_stream(loc.path) as f:
        for raw in io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape"):
            line = raw.rstrip("\r\n")
            if line:
                yield line


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Chunk i = `counts[i]` lines of the plan file from byte `offsets[i]`; `hashes[i]` names its file."""

    offsets: array            # 'q', one per chunk
    counts: array             # 'l'
    hashes: list[str]         # 12 hex digits per chunk
    count: int                # inputs in all
    sha256: str               # of the whole plan file
    size: int                 # its bytes

    def __len__(self) -> int:
        return len(self.offsets)

    def chunk(self, i: int) -> dict:
        """Chunk i's descriptor, all an actor needs to read its paths (never the paths themselves)."""
        end = self.offsets[i + 1] if i + 1 < len(self) else self.size
        return {"chunk": i, "offset": self.offsets[i], "nbytes": end - self.offsets[i], "count": self.counts[i],
                "hash": self.hashes[i]}

    def part_name(self, i: int, fmt: str) -> str:
        return part_name(i, self.hashes[i], fmt)


def part_name(i: int, digest: str, fmt: str) -> str:
    """Chunk i's file name: part-IIIIII-HASH.EXT (`digest`: the hash of its lines)."""
    return f"{PART_PREFIX}{i:06d}-{digest}{EXTENSIONS[fmt]}"


def write_plan(paths: Iterator[str], out: Location) -> int:
    """Stream `paths` into OUT_DIR/_inputs.txt (written whole or not at all); returns how many."""
    n = 0
    with out.write(PLAN) as f:
        for p in paths:
            line = os.fsencode(p)
            if b"\n" in line or b"\r" in line:     # one path a line: such a name cannot be planned
                raise InputError(f"--input: the path {p!r} holds a line break; rename it")
            f.write(line + b"\n")
            n += 1
    return n


def scan_plan(out: Location, chunk_size: int) -> Plan:
    """One pass over OUT_DIR's plan file: chunk offsets, counts and hashes, and the file's sha256."""
    offsets, counts, hashes = array("q"), array("l"), []
    whole, h, pos, n, total = hashlib.sha256(), None, 0, 0, 0
    with out.open_read(PLAN) as raw, io.BufferedReader(raw) as f:
        for line in f:
            if n == 0:
                offsets.append(pos)
                h = hashlib.blake2b(digest_size=6)
            h.update(line)
            whole.update(line)
            pos += len(line)
            n += 1
            total += 1
            if n == chunk_size:
                counts.append(n)
                hashes.append(h.hexdigest())
                n = 0
    if n:
        counts.append(n)
        hashes.append(h.hexdigest())
    return Plan(offsets, counts, hashes, total, whole.hexdigest(), pos)


def read_chunk(out: Location, offset: int, nbytes: int, count: int, digest: str) -> list[str]:
    """Chunk paths from OUT_DIR's plan file; ValueError when they no longer hash to `digest` (a changed plan)."""
    data = out.read_range(PLAN, offset, nbytes)
    lines = data.splitlines(keepends=True)
    if len(lines) != count or hashlib.blake2b(data, digest_size=6).hexdigest() != digest:
        raise ValueError(f"{out.shown(PLAN)}: the chunk at byte {offset} changed since the job was planned")
    return [os.fsdecode(line.rstrip(b"\n")) for line in lines]


# ---------------------------------------------------------------------------------------------- the job

def _is_temp(name: str) -> bool:
    """A temp file a write leaves until its rename (runtime.fileio, Location.write)."""
    return name.startswith(".") and name.endswith(".tmp")


def _ours(name: str) -> bool:
    return name in (PLAN, MANIFEST, SUCCESS) or name.startswith(PART_PREFIX) or _is_temp(name)


def check_out_dir(out: Location, manifest: dict, resume: bool) -> dict | None:
    """Refuse (InputError) an output directory that holds files of another job, or any files without
    --resume. Returns the manifest already there (--resume of the same job), else None."""
    shown = out.name or out.path
    if out.kind() == "file":
        raise InputError(f"--output {shown}: is a file; give a directory")
    names = out.names()
    if not names:
        return None
    if not resume:
        raise InputError(f"--output {shown}: is not empty; give a new directory, or --resume to finish "
                         f"the job that wrote it")
    foreign = sorted(n for n in names if not _ours(n))
    if foreign:
        raise InputError(f"--output {shown}: holds files probres-batch did not write ({foreign[0]}, ...); "
                         f"refusing to mix them with this job's")
    if MANIFEST not in names:
        if any(n.startswith(PART_PREFIX) for n in names):
            raise InputError(f"--output {shown}: has part files but no {MANIFEST}; not a job to resume")
        return None                        # killed while planning: start again
    try:
        with out.open_read(MANIFEST) as f:
            old = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--output {shown}: cannot read {MANIFEST} ({e})") from None
    diff = [k for k in MANIFEST_KEYS if old.get(k) != manifest.get(k)]
    if diff:
        k = diff[0]
        raise InputError(f"--output {shown} holds another job's files: {k} was {old.get(k)!r}, now "
                         f"{manifest.get(k)!r}; give a new directory")
    return old


def discard(out: Location, remove_dir: bool) -> None:
    """Undo a job just planned: its plan and manifest, and the directory (`remove_dir`: it was created)."""
    for name in (MANIFEST, PLAN):
        out.remove(name)
    if remove_dir and out.fs is None and not out.names():
        os.rmdir(out.path)


def write_manifest(out: Location, manifest: dict, name: str = MANIFEST) -> None:
    with out.write(name, text=True) as f:
        f.write(json.dumps(manifest, indent=1) + "\n")


def count_records(out: Location, name: str, fmt: str) -> int:
    """Records in one part file: Parquet's footer row count, or JSONL lines."""
    with out.open_read(name) as f:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(f).metadata.num_rows
        return sum(1 for _ in io.BufferedReader(f) if fmt == "jsonl")


def finish(out: Location, plan: Plan, fmt: str) -> int:
    """Check every chunk's file holds its inputs' count, remove stray temp files, write _SUCCESS.

    Returns the record count; InputError naming the first missing or short file."""
    files = []
    names = set(out.names())
    for i in range(len(plan)):
        name = plan.part_name(i, fmt)
        if name not in names:
            raise InputError(f"{out.shown(name)}: missing after the run; run again with --resume")
        n = count_records(out, name, fmt)
        if n != plan.counts[i]:
            raise InputError(f"{out.shown(name)}: {n} records for {plan.counts[i]} inputs; delete it and run "
                             f"again with --resume")
        files.append({"file": name, "records": n})
    for name in names:                     # a killed worker's temp file (its chunk was redone)
        if _is_temp(name):
            out.remove(name)
    total = sum(f["records"] for f in files)
    write_manifest(out, {"records": total, "files": files}, SUCCESS)
    return total
