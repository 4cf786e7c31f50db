"""Provenance: which model and decision made a results file, and which checkpoint a model came from.

    probres-infer --engine model.onnx photos/ --output results.jsonl && head -1 results.jsonl
    python -c "from runtime.provenance import lineage; print(lineage('model_int8.onnx'))"

## The header of a results file

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

## A model's lineage (probres-eval's reference check)

Every export records the sha256 of what it was made from: export.onnx (FP32 and FP16) stores
the checkpoint's (metadata_props probres.checkpoint_sha256), export.int8 keeps it and adds the
FP32 ONNX's (probres.source_onnx_sha256), export.tensorrt's manifest records the ONNX's and the
checkpoint's, and export.triton puts both into the model's config. So a model's lineage is its
own sha256 plus every ancestor's, and two files are the same model when one is an ancestor of
the other or both came from one checkpoint. No torch here: a checkpoint is only hashed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------- lineage

CHECKPOINT_SUFFIXES = (".pt", ".pth")
PLAN_SUFFIXES = (".plan", ".engine")


class ProvenanceError(ValueError):
    """The file's metadata cannot be read; the message names it."""


@dataclass(frozen=True)
class Lineage:
    """A model file, its own sha256 and the sha256 of each file it was made from."""

    path: str
    kind: str                           # "checkpoint" | "onnx" | "plan"
    sha256: str                         # the file itself
    checkpoint_sha256: str | None       # the checkpoint it came from (its own sha256 for a checkpoint); None: not recorded
    sources: tuple[str, ...] = ()       # every ancestor's sha256 (checkpoint, FP32 ONNX, ...)

    def short(self) -> str:
        """'best.pt (sha256 1a2b3c4d5e6f)' for messages."""
        return f"{self.path} (sha256 {self.sha256[:12]})"


def lineage(path: str | os.PathLike[str]) -> Lineage:
    """The Lineage of a checkpoint, an .onnx file or a TensorRT plan (from its manifest)."""
    p = Path(path)
    suffix = p.suffix.lower()
    own = file_sha256(p)
    if suffix in PLAN_SUFFIXES:
        from runtime.trt_manifest import ManifestError, read_manifest
        try:
            m = read_manifest(p)
        except ManifestError as e:
            raise ProvenanceError(str(e)) from None
        ckpt = m.checkpoint_sha256 or None
        return Lineage(str(p), "plan", own, ckpt, tuple(s for s in (ckpt, m.onnx_sha256) if s))
    if suffix == ".onnx":
        from runtime.onnx_meta import KEY_SHA, KEY_SOURCE_ONNX, OnnxMetaError, metadata_props
        try:
            props = metadata_props(p)
        except OnnxMetaError as e:
            raise ProvenanceError(str(e)) from None
        ckpt = props.get(KEY_SHA) or None
        return Lineage(str(p), "onnx", own, ckpt, tuple(s for s in (ckpt, props.get(KEY_SOURCE_ONNX)) if s))
    return Lineage(str(p), "checkpoint", own, own, ())


def relation(model: Lineage, reference: Lineage) -> str:
    """How `reference` relates to `model`: "itself", "source" (one was made from the other, or both
    from one checkpoint), "unknown" (the model records no source) or "different"."""
    if model.sha256 == reference.sha256:
        return "itself"
    if reference.sha256 in model.sources or model.sha256 in reference.sources:
        return "source"
    if model.checkpoint_sha256 is None or reference.checkpoint_sha256 is None:
        return "unknown"
    return "source" if model.checkpoint_sha256 == reference.checkpoint_sha256 else "different"


def check_reference(engine_path: str, ref_path: str, ref_flag: str, allow_different: bool) -> str:
    """"source" when `ref_path` is what `engine_path` was exported from (or another export of it),
    "different model" when it is not and `allow_different` says compare anyway; else ProvenanceError
    (one line naming `ref_flag`): an exported file as --reference, the model itself, another model."""
    if ref_flag == "--reference" and Path(ref_path).suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ProvenanceError(f"--reference {ref_path}: takes the PyTorch checkpoint (.pt); give an exported model "
                              f"as --reference-engine")
    try:
        same_file = Path(engine_path).resolve() == Path(ref_path).resolve()
        mine, theirs = lineage(engine_path), lineage(ref_path)
    except OSError as e:
        raise ProvenanceError(f"{e.filename}: cannot read it ({e.strerror or e})") from None
    rel = "itself" if same_file else relation(mine, theirs)
    if rel == "itself":
        raise ProvenanceError(f"{ref_flag} {ref_path}: is the model under test itself (sha256 {mine.sha256[:12]}); "
                              f"compare it with the checkpoint it was exported from")
    if rel == "source":
        return rel
    why = (f"{engine_path} records no source checkpoint (exported before provenance was recorded; re-export it)"
           if rel == "unknown" else
           f"{engine_path} was exported from the checkpoint with sha256 {mine.checkpoint_sha256[:12]}, "
           f"{ref_path} is (or comes from) {theirs.checkpoint_sha256[:12]}")
    if not allow_different:
        raise ProvenanceError(f"{ref_flag} {ref_path}: not the model {engine_path} came from: {why}; give the "
                              f"checkpoint it was exported from, or --allow-different-model to compare two models")
    return "different model"
