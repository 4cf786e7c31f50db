"""The TensorRT plan's sidecar manifest (`model.plan.json`): what built it, for what, and with what contract.

    python -c "from runtime.trt_manifest import read_manifest; print(read_manifest('model.plan'))"

A TensorRT plan is only loadable by the TensorRT version that built it, on the GPU
architecture it was built on (unless built version- or hardware-compatible; NVIDIA,
"Engine Compatibility", TensorRT 10.16 / 11.x docs). A mismatch otherwise fails deep inside
deserialization ("Serialization assertion ... Version tag does not match", NVIDIA/TensorRT
#2072). export.tensorrt writes this manifest beside the plan; the runtime reads it and calls
check_compatible() BEFORE handing the plan to TensorRT, so the user gets one clear sentence
instead. The plan itself stays a pure TensorRT plan (trtexec and Triton load it as is).
Standard library + runtime.contract only: this ships to the device.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from runtime.contract import ContractError, ModelContract
from runtime.errors import ModelError
from runtime.fileio import atomic_write_text

MANIFEST_FORMAT = "probres-trt-manifest/1"
PRECISIONS = ("fp16", "fp32", "int8")
REBUILD_HINT = "rebuild the engine on this device with: python -m export.tensorrt --onnx MODEL.onnx --output MODEL.plan"

# Version-compatible engines run on newer runtimes of the same major version, and across these
# major pairs only (TensorRT 11.4.1 support matrix, "Engine Portability": 8 -> 10, 10 -> 11).
CROSS_MAJOR_OK = {(8, 10), (10, 11)}
# hardware_compatible means HardwareCompatibilityLevel.AMPERE_PLUS: runs on compute capability >= 8.0.
AMPERE_PLUS_MIN_CC = (8, 0)


# Keys a manifest may lack (older manifests, written before they existed).
OPTIONAL = ("hardware_compatible", "version_compatible", "created", "cuda_driver_version", "cuda_python_version",
            "os", "arch", "val_metrics", "input_dtype", "checkpoint_sha256")


def this_platform() -> tuple[str, str]:
    """(OS, architecture) of this machine, e.g. ("Linux", "x86_64"); Windows' "AMD64" is x86_64, "arm64" aarch64."""
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    return platform.system(), arch


class ManifestError(ModelError, ValueError):
    """The manifest file is missing or malformed; the message names the file."""


class ManifestMismatch(ModelError, RuntimeError):
    """The plan was built for another TensorRT version or GPU than this one."""


@dataclass(frozen=True)
class TrtManifest:
    """Everything needed to decide whether a plan can run here, and how to feed it.

    Batch profile: inputs of shape (B, 3, image_size, image_size) with min_batch <= B <= max_batch;
    kernels were tuned for opt_batch. Output (B, num_classes) float32 probabilities.
    """

    tensorrt_version: str          # trt.__version__ of the builder, e.g. "10.13.3.9"
    gpu_name: str                  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str        # "major.minor", e.g. "9.0"
    precision: str                 # "fp16" | "fp32" | "int8" (an INT8 Q/DQ graph)
    input_name: str
    output_name: str
    min_batch: int
    opt_batch: int
    max_batch: int
    image_size: int
    onnx_sha256: str
    plan_sha256: str
    contract: ModelContract
    hardware_compatible: bool = False   # built with HardwareCompatibilityLevel.AMPERE_PLUS
    version_compatible: bool = False    # built with BuilderFlag.VERSION_COMPATIBLE
    created: str = ""                   # ISO 8601 UTC time of the build
    # What each figure really is: cuda-python links its CUDA runtime statically, so its version
    # says nothing about the CUDA TensorRT uses; the driver's CUDA version is cudaDriverGetVersion.
    cuda_driver_version: str = ""       # the driver's CUDA version at build time, e.g. "12.6"
    cuda_python_version: str = ""       # cuda-python (cuda-bindings) version of the builder, e.g. "12.9.0"
    os: str = ""                        # platform.system() of the builder, e.g. "Linux" ("" = not recorded)
    arch: str = ""                      # normalized machine, "x86_64" | "aarch64" ("" = not recorded)
    val_metrics: dict[str, Any] | None = None   # PyTorch's val metrics of these weights (from the ONNX metadata)
    input_dtype: str = "float32"        # the engine's input tensor: "float16" from export.onnx --fp16's graph
    checkpoint_sha256: str = ""         # the checkpoint the ONNX came from ("" = not recorded): probres-eval's lineage

    def __post_init__(self) -> None:
        if self.input_dtype not in ("float32", "float16"):
            raise ManifestError(f"input_dtype must be float32 or float16, got {self.input_dtype!r}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not re.fullmatch(r"\d+\.\d+", str(self.compute_capability)):
            raise ManifestError(f"compute_capability must look like '8.7', got {self.compute_capability!r}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ManifestError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.image_size != self.contract.preprocess.size:
            raise ManifestError(f"image_size {self.image_size} != contract preprocess size {self.contract.preprocess.size}")
        _parse_version(self.tensorrt_version)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "contract"}
        return {"format": MANIFEST_FORMAT, **d, "contract": self.contract.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrtManifest":
        """Parse a manifest dict; ManifestError (without a file name) when malformed."""
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"not a {MANIFEST_FORMAT} manifest")
        kinds = {"min_batch": int, "opt_batch": int, "max_batch": int, "image_size": int,
                 "hardware_compatible": bool, "version_compatible": bool, "val_metrics": (dict, type(None))}
        kw: dict[str, Any] = {}
        try:
            for f in fields(cls):
                if f.name == "contract":
                    kw["contract"] = ModelContract.from_dict(d["contract"])
                elif f.name in d:
                    v = d[f.name]
                    want = kinds.get(f.name, str)
                    if want is int and (isinstance(v, bool) or not isinstance(v, int)):
                        raise ManifestError(f"{f.name} must be an integer, got {v!r}")
                    if want is not int and not isinstance(v, want):
                        what = "a JSON object" if isinstance(want, tuple) else f"a {want.__name__}"
                        raise ManifestError(f"{f.name} must be {what}, got {v!r}")
                    kw[f.name] = v
                elif f.name not in OPTIONAL:
                    raise ManifestError(f"missing key {f.name!r}")
        except ContractError as e:
            raise ManifestError(f"bad contract ({e})") from None
        return cls(**kw)


def manifest_path(plan_path: str | Path) -> Path:
    """model.plan -> model.plan.json (the whole plan file name plus '.json')."""
    p = Path(plan_path)
    return p.with_name(p.name + ".json")


def write_manifest(plan_path: str | Path, manifest: TrtManifest) -> Path:
    """Write the sidecar of `plan_path` atomically; returns its path."""
    path = manifest_path(plan_path)
    atomic_write_text(path, manifest.to_json())
    return path


def read_manifest(plan_path: str | Path) -> TrtManifest:
    """Read the sidecar of `plan_path` (or the .json itself); ManifestError names the file."""
    p = Path(plan_path)
    path = p if p.suffix == ".json" else manifest_path(p)
    if not path.is_file():
        raise ManifestError(f"{path}: no TensorRT manifest beside the plan (build plans with python -m export.tensorrt, "
                            f"which writes it)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not a readable JSON manifest ({e})") from None
    try:
        return TrtManifest.from_dict(d)
    except (ManifestError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed manifest: {e}") from None


def _parse_version(v: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); ManifestError when it is not dotted integers."""
    if not isinstance(v, str) or not re.fullmatch(r"\d+(\.\d+)*", v.strip()):
        raise ManifestError(f"TensorRT version must look like '10.13.3.9', got {v!r}")
    return tuple(int(x) for x in v.strip().split("."))


def _parse_cc(cc: str) -> tuple[int, int]:
    if not re.fullmatch(r"\d+\.\d+", str(cc).strip()):
        raise ManifestError(f"compute capability must look like '8.7', got {cc!r}")
    major, minor = str(cc).strip().split(".")
    return int(major), int(minor)


def check_compatible(manifest: TrtManifest, trt_version: str, gpu_name: str, compute_capability: str,
                     platform_here: tuple[str, str] | None = None) -> None:
    """Raise ManifestMismatch unless a plan described by `manifest` can load on this TensorRT + GPU + platform.

    Platform (OS, CPU architecture; this machine's when None): must match whenever the manifest
    records it. No TensorRT plan is portable across them, hardware-compatible or not (an x86-64
    plan on an aarch64 Jetson passes the GPU check and then fails inside deserialization).
    TensorRT: the versions must match exactly, unless the plan is version-compatible (then this
    runtime must be the same or newer, within a major version or across 8->10 / 10->11).
    GPU: the compute capability must match, unless the plan is hardware-compatible (AMPERE_PLUS:
    any compute capability >= 8.0). The GPU name is informative only: the same architecture runs
    the plan, though TensorRT warns that tactics were timed on another device.
    """
    os_here, arch_here = platform_here or this_platform()
    if (manifest.os and manifest.os != os_here) or (manifest.arch and manifest.arch != arch_here):
        raise ManifestMismatch(
            f"engine built on {manifest.os} {manifest.arch}, this is {os_here} {arch_here}: TensorRT plans do not "
            f"move across operating systems or CPU architectures; {REBUILD_HINT}")
    built, here = _parse_version(manifest.tensorrt_version), _parse_version(trt_version)
    if manifest.version_compatible:
        same_major_newer = built[0] == here[0] and here >= built
        if not (same_major_newer or (built[0], here[0]) in CROSS_MAJOR_OK):
            raise ManifestMismatch(
                f"engine built by TensorRT {manifest.tensorrt_version} (version-compatible) cannot run on "
                f"TensorRT {trt_version}: it needs the same or a newer runtime of a compatible major version; {REBUILD_HINT}")
    elif built != here:
        raise ManifestMismatch(
            f"engine built by TensorRT {manifest.tensorrt_version}, this is TensorRT {trt_version}: plans only load "
            f"in the exact TensorRT version that built them; {REBUILD_HINT}")
    cc_built, cc_here = _parse_cc(manifest.compute_capability), _parse_cc(compute_capability)
    if manifest.hardware_compatible:
        if cc_here < AMPERE_PLUS_MIN_CC:
            raise ManifestMismatch(
                f"engine is hardware-compatible for Ampere and newer GPUs (compute capability >= 8.0), but {gpu_name} "
                f"has compute capability {compute_capability}; {REBUILD_HINT}")
    elif cc_built != cc_here:
        raise ManifestMismatch(
            f"engine built for {manifest.gpu_name} (compute capability {manifest.compute_capability}), this GPU is "
            f"{gpu_name} (compute capability {compute_capability}); {REBUILD_HINT}")

