"""Write a Triton Inference Server model repository for an exported model (ONNX or TensorRT plan).

    python -m export.triton --engine model.plan|model.onnx --out model_repository/ [--max-batch 16]
        [--instances 1] [--preprocess-instances 2] [--max-queue-delay-us 2000] [--kind auto|gpu|cpu]
    docker run --gpus all -p 8000:8000 -v $PWD/model_repository:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \
        tritonserver --model-repository /models       # pip install opencv-python-headless in it first

Layout (Triton's model repository; config.pbtxt is the model-config protobuf in text form):
  probres_model/       platform "tensorrt_plan" (1/model.plan) or "onnxruntime_onnx" (1/model.onnx);
                       input/output names, dtypes and dims from the engine, max_batch_size from the
                       plan's profile (ONNX: --max-batch), dynamic_batching, instance_group, and
                       labels.txt for Triton's classification extension (class_count in a request)
  probres_preprocess/  Python backend (1/model.py = export/triton_model.py, plus a copy of the
                       `runtime` package): image bytes -> the input tensor, the project's preprocessing
  probres/             ensemble: image bytes -> probres_preprocess -> probres_model -> probs
Every config carries the model contract (parameter "probres.contract"); probres_model's also
the sha256 of the model file and of the checkpoint it came from ("probres.model_sha256",
"probres.checkpoint_sha256"; runtime.provenance). A plan loads only on a
Triton built with the TensorRT version that built it (see its .json sidecar). The output
directory must not exist or be empty: nothing is written over what is there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from export.trt_build import UsageError
from runtime.contract import INPUT_NAME, OUTPUT_NAME, ModelContract
from runtime.fileio import atomic_write_text
from runtime.serve_model import MAX_REQUEST_BYTES

MODEL, PREPROCESS, ENSEMBLE = "probres_model", "probres_preprocess", "probres"
LABELS_FILE = "labels.txt"
RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


@dataclass(frozen=True)
class EngineFacts:
    """What the repository needs to know about the model file."""

    platform: str          # "tensorrt_plan" | "onnxruntime_onnx"
    filename: str          # "model.plan" | "model.onnx"
    input_name: str
    output_name: str
    input_dtype: str       # "float32" | "float16"
    max_batch: int | None  # the plan's profile max; None for ONNX (symbolic batch)
    contract: ModelContract
    provenance: dict[str, str] = field(default_factory=dict)   # sha256 of the model file and of its checkpoint


def engine_facts(path: Path) -> EngineFacts:
    """Read names, dtypes, batch limit and contract from the ONNX graph or the plan's sidecar."""
    if not path.is_file():
        raise UsageError(f"--engine {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".plan", ".engine"):
        from runtime.trt_manifest import ManifestError, read_manifest
        try:
            m = read_manifest(path)
        except ManifestError as e:
            raise UsageError(f"--engine {e}") from None
        # The plan's input dtype is its ONNX's (float16 from export.onnx --fp16), recorded in the manifest.
        return EngineFacts("tensorrt_plan", "model.plan", m.input_name, m.output_name, m.input_dtype, m.max_batch,
                           m.contract)
    if suffix != ".onnx":
        raise UsageError(f"--engine {path}: expected a .plan, .engine or .onnx file")
    from export.graph import GraphError, check_image_graph, read_graph
    from runtime.onnx_meta import OnnxMetaError, parse_meta
    try:
        f = read_graph(path)
        contract = parse_meta(f.metadata, str(path)).contract
        check_image_graph(f, str(path), contract.preprocess.size, contract.labels.num_classes)
    except (GraphError, OnnxMetaError) as e:
        raise UsageError(f"--engine {e}") from None
    return EngineFacts("onnxruntime_onnx", "model.onnx", f.input_name, f.output_name, f.input_dtype, None, contract)


# ------------------------------------------------------------------------------------ config.pbtxt

def quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(name: str, dtype: str, dims: list[int], labels: bool = False) -> str:
    extra = f' label_filename: "{LABELS_FILE}"' if labels else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}'


def _params(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {quote(k)} value {{ string_value: {quote(v)} }} }}\n" for k, v in params.items())


def model_config(f: EngineFacts, max_batch: int, instances: int, kind: str, delay_us: int) -> str:
    s, c = f.contract.preprocess.size, f.contract.labels.num_classes
    return (f'name: "{MODEL}"\nplatform: "{f.platform}"\nmax_batch_size: {max_batch}\n'
            f"input [\n{_tensor(f.input_name, TRITON_TYPES[f.input_dtype], [3, s, s])}\n]\n"
            f"output [\n{_tensor(f.output_name, 'TYPE_FP32', [c], labels=True)}\n]\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
            f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
            + _params({"probres.contract": f.contract.to_json(), **f.provenance}))


def preprocess_config(f: EngineFacts, max_batch: int, instances: int, delay_us: int, max_bytes: int) -> str:
    s = f.contract.preprocess.size
    return (f'name: "{PREPROCESS}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"input [\n{_tensor('image', 'TYPE_STRING', [1])}\n]\n"
            f"output [\n{_tensor(INPUT_NAME, TRITON_TYPES[f.input_dtype], [3, s, s])}\n]\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
            f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
            + _params({"probres.contract": f.contract.to_json(), "probres.max_request_bytes": str(max_bytes)}))


def ensemble_config(f: EngineFacts, max_batch: int) -> str:
    c = f.contract.labels.num_classes
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            f"input [\n{_tensor('image', 'TYPE_STRING', [1])}\n]\n"
            f"output [\n{_tensor(OUTPUT_NAME, 'TYPE_FP32', [c], labels=True)}\n]\n"
            "ensemble_scheduling {\n  step [\n"
            f'    {{ model_name: "{PREPROCESS}" model_version: -1\n'
            '      input_map { key: "image" value: "image" }\n'
            f'      output_map {{ key: "{INPUT_NAME}" value: "preprocessed" }} }},\n'
            f'    {{ model_name: "{MODEL}" model_version: -1\n'
            f'      input_map {{ key: "{f.input_name}" value: "preprocessed" }}\n'
            f'      output_map {{ key: "{f.output_name}" value: "{OUTPUT_NAME}" }} }}\n'
            "  ]\n}\n" + _params({"probres.contract": f.contract.to_json()}))


# ------------------------------------------------------------------------------------ repository

def _copy_runtime(dst: Path) -> None:
    """The runtime package's Python files (and the built C kernel, used where the Python matches)."""
    for src in RUNTIME_DIR.rglob("*"):
        rel = src.relative_to(RUNTIME_DIR)
        if "__pycache__" in rel.parts or "_cext" in rel.parts or not src.is_file():
            continue
        if src.suffix == ".py" or src.name.startswith("_fastnorm"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def write_repository(engine: Path, out: Path, max_batch: int | None = None, instances: int = 1,
                     preprocess_instances: int = 2, kind: str = "auto", delay_us: int = 2000,
                     max_bytes: int = MAX_REQUEST_BYTES) -> EngineFacts:
    """Write the three models under `out` (built in a temp directory beside it, then renamed)."""
    from runtime.provenance import lineage

    f = engine_facts(engine)
    made = lineage(engine)
    f = replace(f, provenance={"probres.model_sha256": made.sha256,
                               "probres.checkpoint_sha256": made.checkpoint_sha256 or ""})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory; choose a new one")
    if max_batch is None:
        max_batch = f.max_batch or 16
    if f.max_batch is not None and max_batch > f.max_batch:
        raise UsageError(f"--max-batch {max_batch}: the plan's profile takes at most {f.max_batch}")
    kind = {"auto": "KIND_GPU" if f.platform == "tensorrt_plan" else "KIND_CPU", "gpu": "KIND_GPU",
            "cpu": "KIND_CPU"}[kind]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        labels = "".join(n + "\n" for n in f.contract.labels.names)
        for name in (MODEL, PREPROCESS, ENSEMBLE):
            (tmp / name / "1").mkdir(parents=True)
        shutil.copyfile(engine, tmp / MODEL / "1" / f.filename)
        atomic_write_text(tmp / MODEL / "config.pbtxt", model_config(f, max_batch, instances, kind, delay_us))
        atomic_write_text(tmp / MODEL / LABELS_FILE, labels)
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), tmp / PREPROCESS / "1" / "model.py")
        _copy_runtime(tmp / PREPROCESS / "1" / "runtime")
        atomic_write_text(tmp / PREPROCESS / "config.pbtxt",
                          preprocess_config(f, max_batch, preprocess_instances, delay_us, max_bytes))
        atomic_write_text(tmp / ENSEMBLE / "config.pbtxt", ensemble_config(f, max_batch))
        atomic_write_text(tmp / ENSEMBLE / LABELS_FILE, labels)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)          # mkdtemp makes 0700; a server user must read it
        if out.exists():
            out.rmdir()                          # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, type=Path, help="model.plan (with its .json sidecar) or model.onnx")
    ap.add_argument("--out", required=True, type=Path, help="the model repository directory (new or empty)")
    ap.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the plan's profile max, ONNX 16)")
    ap.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    ap.add_argument("--preprocess-instances", type=int, default=2,
                    help="Python-backend preprocessing instances: separate processes, the usual bottleneck")
    ap.add_argument("--kind", choices=("auto", "gpu", "cpu"), default="auto",
                    help="instance kind of the model (auto: GPU for a plan, CPU for ONNX)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, help="largest encoded image accepted")
    args = ap.parse_args(argv)
    try:
        for flag in ("max_batch", "instances", "preprocess_instances", "max_request_bytes"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
        if args.max_queue_delay_us < 0:
            raise UsageError("--max-queue-delay-us must be >= 0")
        f = write_repository(args.engine, args.out, args.max_batch, args.instances, args.preprocess_instances,
                             args.kind, args.max_queue_delay_us, args.max_request_bytes)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {ENSEMBLE} (ensemble, image bytes in), {PREPROCESS} (Python backend), "
          f"{MODEL} ({f.platform})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
