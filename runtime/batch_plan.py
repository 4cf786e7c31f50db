"""probres-batch's bookkeeping, without Ray: the input plan, the job manifest, chunk files and _SUCCESS.

    python -c "from runtime.batch_plan import scan_plan; print(scan_plan('out/_inputs.txt', 256).count)"

Exactly once comes from here, not from Ray. The inputs (a directory walked in sorted order as
probres-infer walks it, a list file, or a glob expanded in sorted order) are streamed once into
OUT_DIR/_inputs.txt, then cut into chunks of K consecutive lines: chunk i is lines iK..iK+K-1.
The driver keeps a byte offset and a hash per chunk, never the paths (8 + 8 bytes per K inputs).
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
import json
import os
from array import array
from dataclasses import dataclass
from typing import Iterator

from runtime.fileio import atomic_open, atomic_write_text
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
    """'dir', 'list' or 'glob' for --input; InputError when it is none of them."""
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
    if kind == "dir":
        return iter_image_paths([spec])
    if kind == "list":
        return read_list(spec)
    return iter_glob(spec)


# ---------------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Chunk i = `counts[i]` lines of the plan file from byte `offsets[i]`; `hashes[i]` names its file."""

    path: str
    chunk_size: int
    offsets: array            # 'q', one per chunk
    counts: array             # 'l'
    hashes: list[str]         # 12 hex digits per chunk
    count: int                # inputs in all
    sha256: str               # of the whole plan file

    def __len__(self) -> int:
        return len(self.offsets)

    def part_name(self, i: int, fmt: str) -> str:
        return f"{PART_PREFIX}{i:06d}-{self.hashes[i]}{EXTENSIONS[fmt]}"


def write_plan(paths: Iterator[str], out_dir: str) -> int:
    """Stream `paths` into OUT_DIR/_inputs.txt (temp then rename); returns how many."""
    n = 0
    with atomic_open(os.path.join(out_dir, PLAN), "wb") as f:
        for p in paths:
            line = os.fsencode(p)
            if b"\n" in line or b"\r" in line:     # one path a line: such a name cannot be planned
                raise InputError(f"--input: the path {p!r} holds a line break; rename it")
            f.write(line + b"\n")
            n += 1
    return n


def scan_plan(path: str, chunk_size: int) -> Plan:
    """One pass over a plan file: chunk offsets, counts and hashes, and the file's sha256."""
    offsets, counts, hashes = array("q"), array("l"), []
    whole, h, pos, n, total = hashlib.sha256(), None, 0, 0, 0
    with open(path, "rb") as f:
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
    return Plan(path, chunk_size, offsets, counts, hashes, total, whole.hexdigest())


def read_chunk(plan_path: str, offset: int, count: int, digest: str) -> list[str]:
    """Chunk paths from the plan file; ValueError when they no longer hash to `digest` (a changed plan)."""
    h = hashlib.blake2b(digest_size=6)
    out = []
    with open(plan_path, "rb") as f:
        f.seek(offset)
        for _ in range(count):
            line = f.readline()
            h.update(line)
            out.append(os.fsdecode(line.rstrip(b"\n")))
    if h.hexdigest() != digest:
        raise ValueError(f"{plan_path}: the chunk at byte {offset} changed since the job was planned")
    return out


# ---------------------------------------------------------------------------------------------- the job

def _ours(name: str) -> bool:
    return name in (PLAN, MANIFEST, SUCCESS) or name.startswith(PART_PREFIX) or (
        name.startswith(".") and name.endswith(".tmp"))


def check_out_dir(out_dir: str, manifest: dict, resume: bool) -> dict | None:
    """Refuse (InputError) an output directory that holds files of another job, or any files without
    --resume. Returns the manifest already there (--resume of the same job), else None."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--output {out_dir}: is a file; give a directory")
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if not names:
        return None
    if not resume:
        raise InputError(f"--output {out_dir}: is not empty; give a new directory, or --resume to finish "
                         f"the job that wrote it")
    foreign = sorted(n for n in names if not _ours(n))
    if foreign:
        raise InputError(f"--output {out_dir}: holds files probres-batch did not write ({foreign[0]}, ...); "
                         f"refusing to mix them with this job's")
    if MANIFEST not in names:
        if any(n.startswith(PART_PREFIX) for n in names):
            raise InputError(f"--output {out_dir}: has part files but no {MANIFEST}; not a job to resume")
        return None                        # killed while planning: start again
    try:
        old = json.loads(open(os.path.join(out_dir, MANIFEST), encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise InputError(f"--output {out_dir}: cannot read {MANIFEST} ({e})") from None
    diff = [k for k in MANIFEST_KEYS if old.get(k) != manifest.get(k)]
    if diff:
        k = diff[0]
        raise InputError(f"--output {out_dir} holds another job's files: {k} was {old.get(k)!r}, now "
                         f"{manifest.get(k)!r}; give a new directory")
    return old


def write_manifest(out_dir: str, manifest: dict) -> None:
    atomic_write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def count_records(path: str, fmt: str) -> int:
    """Records in one part file: Parquet's footer row count, or JSONL lines."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def finish(out_dir: str, plan: Plan, fmt: str) -> int:
    """Check every chunk's file holds its inputs' count, remove stray temp files, write _SUCCESS.

    Returns the record count; InputError naming the first missing or short file."""
    files = []
    for i in range(len(plan)):
        name = plan.part_name(i, fmt)
        p = os.path.join(out_dir, name)
        if not os.path.isfile(p):
            raise InputError(f"{p}: missing after the run; run again with --resume")
        n = count_records(p, fmt)
        if n != plan.counts[i]:
            raise InputError(f"{p}: {n} records for {plan.counts[i]} inputs; delete it and run again with --resume")
        files.append({"file": name, "records": n})
    for name in os.listdir(out_dir):       # a killed worker's temp file (its chunk was redone)
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass
    total = sum(f["records"] for f in files)
    atomic_write_text(os.path.join(out_dir, SUCCESS),
                      json.dumps({"records": total, "files": files}, indent=1) + "\n")
    return total
