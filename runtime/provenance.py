"""Which model and which decision rule made a results file: the provenance header probres-infer writes first.

    probres-infer --engine model.onnx photos/ --output results.jsonl && head -1 results.jsonl

The first line of every output (a file or stdout, every format) names the model by its file
name and sha256 (a TensorRT plan's .json sidecar too: it carries the contract) and the decision
rule: "threshold" ("contract", a number T, or null for --top-k alone, as in each record) and
"top_k" (K, "all" or null). One line per file, not per record: files stay small, and a record
stays exactly what runtime.report writes for one image.
  jsonl        {"probres": {"model": "model.onnx", "sha256": "...", "threshold": "contract", "top_k": null}}
  csv, table   # probres: {"model": "model.onnx", "sha256": "...", "threshold": "contract", "top_k": null}
--resume compares the file's header with this run's (same_run) and refuses another model or
another rule: one file never mixes two. Readers skip the header: `records` here, or
`tail -n +2`, `pandas.read_csv(f, skiprows=1)`, `jq 'select(.image)'`. See docs/outputs.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from runtime.fileio import sha256_file

KEY = "probres"
JSONL_START = b'{"probres": '          # how the JSONL header line begins (json.dumps of {KEY: ...})
TEXT_PREFIX = "# probres: "             # the csv and table header line's prefix
COMPARED = ("sha256", "sidecar_sha256", "threshold", "top_k")   # what --resume requires equal (not the name)

_hashes: dict[tuple[str, int, int], str] = {}      # (real path, size, mtime_ns) -> sha256: once per run


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a model file, hashed once per process (a multi-GB plan takes seconds)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def decision(threshold: str | float | None, top_k: int | str | None) -> dict:
    """The decision rule as the command line gives it: probres-infer's --threshold and --top-k."""
    if threshold is None and top_k is None:
        threshold = "contract"                   # the default: the contract's per-label thresholds
    return {"threshold": threshold, "top_k": top_k}


def header(model: str | os.PathLike[str], threshold: str | float | None, top_k: int | str | None) -> dict:
    """The provenance of a run of `model` with this decision rule (OSError if the model cannot be read)."""
    p = Path(model)
    info = {"model": os.fsencode(p.name).decode("utf-8", "backslashreplace"), "sha256": file_sha256(p)}
    sidecar = p.with_name(p.name + ".json")
    if p.suffix in (".plan", ".engine", ".trt") and sidecar.is_file():
        info["sidecar_sha256"] = file_sha256(sidecar)
    return {KEY: {**info, **decision(threshold, top_k)}}


def header_line(head: dict, fmt: str) -> str:
    """The first line of an output in format `fmt` (jsonl, csv, table), newline included."""
    text = json.dumps(head if fmt == "jsonl" else head[KEY])
    return text + "\n" if fmt == "jsonl" else f"{TEXT_PREFIX}{text}\n"


def parse_header(line: str | bytes) -> dict | None:
    """The {KEY: {...}} of a header line in any format, or None if `line` is not one."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    try:
        if line.startswith(TEXT_PREFIX):
            return {KEY: json.loads(line[len(TEXT_PREFIX):])}
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get(KEY), dict) else None


def describe(head: dict) -> str:
    h = head[KEY]
    sha = str(h.get("sha256"))[:12]
    show = lambda v: "none" if v is None else v          # noqa: E731  (JSON null, as the user would say it)
    return f"{h.get('model')} (sha256 {sha}...), threshold {show(h.get('threshold'))}, top-k {show(h.get('top_k'))}"


def same_run(old: dict, new: dict) -> bool:
    """Do two headers name the same model bytes and the same decision rule?"""
    return all(old[KEY].get(k) == new[KEY].get(k) for k in COMPARED)


def records(lines: Iterable[str]) -> Iterator[dict]:
    """The JSONL records of a probres-infer output, its header (and blank lines) skipped."""
    for line in lines:
        if line.strip():
            obj = json.loads(line)
            if KEY not in obj:
                yield obj
