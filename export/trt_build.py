"""The TensorRT-free half of the engine builder: argument checks, version dispatch, profile shapes,
timing-cache policy, engine precision check. Tested without TensorRT.

    python -m export.tensorrt --onnx model_fp16.onnx --output model.plan --fp16   # uses these

Version dispatch (NVIDIA, "Migrating from TensorRT 10.x to 11.x", the 10.12 release notes, and the
header value NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1 on 10.0 .. 10.16):
  TensorRT < 10         unsupported (the name-based I/O API this project uses is 10+)
  10.x, FP16/INT8 ONNX  "strong": create_network(1 << STRONGLY_TYPED) (flags word 2): the graph's dtypes
                        are the precision, so the FP32 head of the FP16 graph stays FP32
  10.0 .. 10.11, FP32 ONNX + --fp16
                        "weak": the only weakly typed build; BuilderFlag.FP16 lets TensorRT choose FP16
  10.12 .. 10.x, FP32 ONNX + --fp16
                        refused: weak typing is deprecated there; --fp16 needs the FP16 graph
  10.x, FP32 ONNX       "strong" FP32 reference (TF32 off)
  11.x and later        "strong" always: BuilderFlag.FP16 is gone and the STRONGLY_TYPED flag is not
                        in the 11.x headers (still a Python name), so create_network(0)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from export.graph import GraphFacts

MAX_BATCH_LIMIT = 4096
WEAK_TYPING_DEPRECATED = (10, 12)   # weak typing deprecated (10.12 release notes), gone in 11.0
FP16_ONNX_HINT = ("make it with python -m export.onnx --checkpoint best.pt --output model.onnx --fp16 "
                  "(writes model_fp16.onnx, verified against PyTorch), or python -m export.fp16 model.onnx")


class UsageError(ValueError):
    """Bad arguments or inputs: one line, exit code 2."""


class EnginePrecisionError(RuntimeError):
    """An engine was built, but not in the precision that was asked for."""


# ---------------------------------------------------------------- versions and build mode

def parse_version(version: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); UsageError for anything else."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+(\.\d+)*", version.strip()):
        raise UsageError(f"cannot parse TensorRT version {version!r}")
    return tuple(int(x) for x in version.strip().split("."))


@dataclass(frozen=True)
class BuildPlan:
    """How to build, decided from the TensorRT version, the ONNX precision and --fp16."""

    mode: str                # "strong" | "weak"
    network_flags: str       # "strongly_typed" (10.x strong: set the flag) | "none" (weak, and 11+: 0)
    fp16_flag: bool          # set BuilderFlag.FP16 (weak mode only)
    disable_tf32: bool       # clear BuilderFlag.TF32: FP32 reference engines compare with ONNX Runtime
    precision: str           # what the engine will be: "fp16" | "fp32" | "int8"


def build_plan(trt_version: str, onnx_precision: str, fp16: bool, onnx_name: str = "the ONNX") -> BuildPlan:
    """Decide the build from the TensorRT version, the ONNX graph's precision ("fp16"|"fp32"|"int8") and --fp16.

    Raises UsageError for combinations that would silently build the wrong thing: --fp16 on an FP32
    graph where weak typing is deprecated or gone (that yields an FP32 engine: roboflow/rf-detr #1453),
    an FP16 graph without --fp16, and --fp16 on an INT8 Q/DQ graph (its precision is in the graph).
    """
    v = parse_version(trt_version)
    if v[0] < 10:
        raise UsageError(f"TensorRT {trt_version} is too old: TensorRT 10.x or 11.x is needed")
    if onnx_precision not in ("fp16", "fp32", "int8"):
        raise ValueError(f"onnx_precision must be fp16, fp32 or int8, got {onnx_precision!r}")
    weak_ok = v[0] == 10 and v[:2] < WEAK_TYPING_DEPRECATED
    if onnx_precision == "fp16" and not fp16:
        raise UsageError(f"{onnx_name} is an FP16 graph: add --fp16 (or pass the FP32 model.onnx for an FP32 engine)")
    if onnx_precision == "int8" and fp16:
        raise UsageError(f"{onnx_name} is an INT8 Q/DQ graph: its precision comes from the graph, drop --fp16")
    if fp16 and onnx_precision == "fp32" and not weak_ok:
        raise UsageError(
            f"TensorRT {trt_version} builds strongly typed networks, so precision comes from the ONNX dtypes and "
            f"{onnx_name} is FP32: --fp16 needs the FP16 graph; {FP16_ONNX_HINT}")
    weak = fp16 and onnx_precision == "fp32"        # only 10.0 .. 10.11 get here
    return BuildPlan(
        mode="weak" if weak else "strong",
        network_flags="strongly_typed" if not weak and v[0] == 10 else "none",
        fp16_flag=weak,
        disable_tf32=onnx_precision == "fp32" and not fp16,
        precision="fp16" if fp16 else onnx_precision,
    )


# ---------------------------------------------------------------- arguments

def check_profile(min_batch: int, opt_batch: int, max_batch: int, onnx_batch: int | str | None = None) -> None:
    """UsageError unless 1 <= min <= opt <= max <= MAX_BATCH_LIMIT and the ONNX batch dim allows it.

    onnx_batch: the ONNX input's dim 0: a name (symbolic: any profile), an int (fixed: min = opt = max
    = that int), or None (unknown).
    """
    for flag, v in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{flag} {v}: must be a positive integer")
    if not min_batch <= opt_batch <= max_batch:
        raise UsageError(f"batch profile must satisfy --min-batch <= --opt-batch <= --max-batch, "
                         f"got {min_batch} / {opt_batch} / {max_batch}")
    if max_batch > MAX_BATCH_LIMIT:
        raise UsageError(f"--max-batch {max_batch}: at most {MAX_BATCH_LIMIT}")
    if isinstance(onnx_batch, int) and onnx_batch > 0 and not (min_batch == opt_batch == max_batch == onnx_batch):
        raise UsageError(f"the ONNX input has a fixed batch of {onnx_batch}: re-export it (python -m export.onnx "
                         f"gives a symbolic batch) or use --min-batch = --opt-batch = --max-batch = {onnx_batch}")


def profile_shapes(min_batch: int, opt_batch: int, max_batch: int, size: int,
                   channels: int = 3) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) NCHW shapes for IOptimizationProfile.set_shape on the image input."""
    check_profile(min_batch, opt_batch, max_batch)
    return tuple((b, channels, size, size) for b in (min_batch, opt_batch, max_batch))  # type: ignore[return-value]


def workspace_bytes(gib: float) -> int:
    """--workspace-gib -> bytes for set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)."""
    if not (0 < gib <= 1024):
        raise UsageError(f"--workspace-gib {gib}: must be in (0, 1024]")
    return int(gib * (1 << 30))


def check_output_path(output: str | Path) -> Path:
    p = Path(output)
    if p.suffix not in (".plan", ".engine", ".trt"):
        raise UsageError(f"--output {p}: use a .plan (or .engine/.trt) file name")
    if p.is_dir():
        raise UsageError(f"--output {p}: is a directory")
    return p


# ---------------------------------------------------------------- ONNX facts (onnx package, no TensorRT)

def onnx_facts(path: str | Path) -> GraphFacts:
    """The graph's single input/output, batch dim, precision and weight volume (export.graph); UsageError naming
    the file unless its input is [N, 3, S, S]."""
    from export.graph import GraphError, check_image_graph, read_graph     # the onnx package, only when reading

    try:
        facts = read_graph(path)
        check_image_graph(facts, str(path), symbolic_batch=False)
    except GraphError as e:
        raise UsageError(f"--onnx {e}") from None
    return facts


# ---------------------------------------------------------------- timing cache

def timing_cache_key(trt_version: str, gpu_name: str, compute_capability: str, hardware_compatible: bool = False,
                     platform: tuple[str, str] = ("", "")) -> dict[str, Any]:
    """What invalidates a timing cache: the TensorRT version, the GPU, the hardware-compatible tactic set and
    the platform. Not cuda-python's version (its CUDA runtime is linked statically and TensorRT does not use
    it) nor the driver's: a cuda-python upgrade leaves a cache valid. TensorRT itself still checks the cache
    when it loads it (set_timing_cache with ignore_mismatch=False, as Polygraphy does)."""
    return {"tensorrt_version": trt_version, "gpu_name": gpu_name, "compute_capability": compute_capability,
            "hardware_compatible": bool(hardware_compatible), "os": platform[0], "arch": platform[1]}


def cache_key_path(cache_path: str | Path) -> Path:
    p = Path(cache_path)
    return p.with_name(p.name + ".key.json")


def load_timing_cache(cache_path: str | Path | None, key: dict[str, Any]) -> tuple[bytes, str]:
    """The cache bytes to start from (b"" = empty) and a sentence for the log.

    A cache is used only when its sidecar key (CACHE.key.json) equals `key`. A cache without a key, or
    with another key, is refused (UsageError), never silently reused and never overwritten: timings from
    another GPU or TensorRT version pick wrong tactics (Polygraphy passes ignore_mismatch=False too).
    """
    if cache_path is None:
        return b"", "no timing cache (pass --timing-cache PATH to speed up rebuilds)"
    p, kp = Path(cache_path), cache_key_path(cache_path)
    if not p.exists():
        return b"", f"timing cache {p}: new, will be created"
    if not p.is_file():
        raise UsageError(f"--timing-cache {p}: not a file")
    try:
        stored = json.loads(kp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--timing-cache {p}: no key file {kp.name} says which GPU and TensorRT made it; "
                         f"delete it or choose another path") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--timing-cache {p}: unreadable key file {kp.name} ({e}); delete both or choose another path") from None
    if stored != key:
        diff = ", ".join(f"{k} {stored.get(k)!r} -> {key.get(k)!r}" for k in sorted(set(stored) | set(key))
                         if stored.get(k) != key.get(k))
        raise UsageError(f"--timing-cache {p} was made for another setup ({diff}); "
                         f"use a separate cache per GPU and TensorRT version, or delete it")
    return p.read_bytes(), f"timing cache {p}: loaded ({p.stat().st_size} bytes, key matches)"


def save_timing_cache(cache_path: str | Path, data: bytes, key: dict[str, Any]) -> None:
    """Write the cache and its key sidecar, each atomically (key last: a cache never has a wrong key)."""
    atomic_write_bytes(cache_path, data)
    atomic_write_text(cache_key_path(cache_path), json.dumps(key, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- engine precision check

COMPUTE_LAYER = re.compile(r"conv|gemm|matrixmultiply|fullyconnected|myelin|kgen", re.I)
# Myelin / kgen layers are fused subgraphs that keep their casts inside: their I/O can show FP32 in
# a valid FP16 engine, so they count as "unknown" unless a tensor of theirs shows a lower precision.
FUSED_LAYER = re.compile(r"myelin|kgen", re.I)
# Keys that have held a tensor's dtype across NVIDIA's inspector JSON: "Format/Datatype" (10.x),
# "Datatype" + "Format" (11.x, the split field as NVIDIA's 11.1 tools name it), "DataType" (case varies).
DTYPE_KEYS = ("format/datatype", "datatype", "format", "dtype")
LOWER_FIRST = ("int8", "fp16", "bf16", "fp32")      # a layer counts as the lowest precision it shows


def _dtype_of(text: str) -> str | None:
    """'Channel major FP16 format ...' / 'Half' / 'Row major linear FP32' / 'Float' -> 'fp16' | 'fp32' | other | None."""
    t = text.lower()
    if re.search(r"\b(fp16|half|float16)\b", t):
        return "fp16"
    if re.search(r"\b(bf16|bfloat16)\b", t):
        return "bf16"
    if re.search(r"\b(int8|fp8|int4|fp4)\b", t):
        return "int8"
    if re.search(r"\b(fp32|float|float32)\b", t):
        return "fp32"
    return None


def _tensor_texts(tensor: Any) -> list[str]:
    if not isinstance(tensor, dict):
        return []
    return [str(v) for k, v in tensor.items() if str(k).lower() in DTYPE_KEYS]


def layer_precisions(inspector_json: str | dict[str, Any]) -> dict[str, int]:
    """Count compute layers (conv/gemm/fused) by the lowest dtype their tensors or weights show, from
    IEngineInspector JSON.

    Schema: {"Layers": [{"Name", "LayerType", "Inputs": [{...}], "Outputs": [...], "Weights": {"Type"}}]}.
    A tensor's dtype is read from any key in DTYPE_KEYS, case-insensitively (10.x "Format/Datatype";
    11.x "Datatype" and "Format"; NVIDIA, "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x").
    With dynamic shapes the inspector prints "N/A due to dynamic shapes" unless an execution context
    with input shapes is attached, which export.tensorrt does. Returns counts for "fp16", "fp32",
    "bf16", "int8", "unknown" (no readable dtype, or a fused layer showing only FP32) and "layers".
    """
    data = json.loads(inspector_json) if isinstance(inspector_json, str) else inspector_json
    counts = {"fp16": 0, "fp32": 0, "bf16": 0, "int8": 0, "unknown": 0, "layers": 0}
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        if not isinstance(layer, dict):        # ProfilingVerbosity.LAYER_NAMES_ONLY: plain names
            continue
        kind = f"{layer.get('LayerType', '')} {layer.get('ParameterType', '')}"
        if not COMPUTE_LAYER.search(kind):
            continue
        counts["layers"] += 1
        texts = [t for tensor in list(layer.get("Outputs", [])) + list(layer.get("Inputs", []))
                 for t in _tensor_texts(tensor)]
        if isinstance(layer.get("Weights"), dict):
            texts.append(str(layer["Weights"].get("Type", "")))
        found = {d for d in map(_dtype_of, texts) if d}
        best = next((d for d in LOWER_FIRST if d in found), "unknown")
        if FUSED_LAYER.search(kind) and best == "fp32":
            best = "unknown"
        counts[best] += 1
    return counts


# Size fallback: the plan's size against the FP32 weight volume (FP16 halves it: rf-detr #1454; INT8 quarters it).
SIZE_LIMIT = {"fp16": 0.75, "int8": 0.5}
# Below this weight volume a plan's own overhead (kernels, metadata) can outweigh the weights: size says nothing.
SIZE_FALLBACK_MIN_BYTES = 16 << 20


def check_engine_precision(want: str, counts: dict[str, int] | None, plan_bytes: int, fp32_weight_bytes: int,
                           version_compatible: bool = False) -> str:
    """Fail loudly when the engine is not what was asked for; returns a one-line summary.

    want "fp16" / "int8": at least half the conv/gemm layers of known dtype must be that precision by the
    inspector. want "fp32": none may be lower. Without inspector dtypes, fall back on the plan's size
    (SIZE_LIMIT), except for version-compatible plans (they embed the lean runtime) and models under
    SIZE_FALLBACK_MIN_BYTES of weights (plan overhead dominates): their size says nothing about the
    weights, so those pass with an "unverified" summary.
    """
    layers = (counts or {}).get("layers", 0)
    known = layers - (counts or {}).get("unknown", 0) if counts else 0
    size = f"plan {plan_bytes / 1e6:.1f} MB vs FP32 weights {fp32_weight_bytes / 1e6:.1f} MB"
    if counts and known > 0:
        low = counts["fp16"] + counts["int8"] + counts["bf16"]
        summary = (f"{counts['fp16']}/{layers} conv/gemm layers FP16, {counts['int8']} INT8, {counts['fp32']} FP32, "
                   f"{counts['unknown']} unknown ({size})")
        if want in ("fp16", "int8") and counts[want] < 0.5 * known:
            raise EnginePrecisionError(f"asked for {want.upper()} but the engine is mostly not {want.upper()}: {summary}")
        if want == "fp32" and low > 0:
            raise EnginePrecisionError(f"asked for FP32 but the engine has lower-precision layers: {summary}")
        return summary
    if version_compatible:
        return f"precision unverified: no per-layer dtypes and a version-compatible plan embeds its runtime ({size})"
    if fp32_weight_bytes < SIZE_FALLBACK_MIN_BYTES:
        return f"precision unverified: no per-layer dtypes and too few weights for the size to tell ({size})"
    ratio = plan_bytes / max(fp32_weight_bytes, 1)
    if want in SIZE_LIMIT and ratio >= SIZE_LIMIT[want]:
        raise EnginePrecisionError(f"asked for {want.upper()} but the engine is too large for it ({size}, "
                                   f"{ratio:.2f}x); it is most likely an FP32 engine")
    return f"no per-layer dtypes from the inspector; {size} ({ratio:.2f}x)"
