"""Export a checkpoint to ONNX (sigmoid included, symbolic batch), verified against PyTorch.

    python -m export.onnx --checkpoint runs/x/best.pt --output model.onnx [--fp16 [--fp32-input]] [--opset 18]
        [--max-batch 64] [--exporter auto|dynamo|torchscript] [--verify-images DIR] [--slim]

Graph: input "images" float32 (N, 3, S, S), output "probs" float32 (N, C), N symbolic (runtime.contract's
INPUT_NAME and OUTPUT_NAME; export.graph reads and checks them).
metadata_props carry the model contract (labels + preprocessing), the checkpoint's sha256,
arch, PyTorch val metrics and the precision (runtime/onnx_meta.py reads them), so the .onnx
alone is enough to serve the model.

Every graph is checked before it is written: onnx.checker, a symbolic dim 0 on input and
output (tracing specializes a size-1 dimension, pytorch #157621, so we trace at batch 2),
and ONNX Runtime CPU vs PyTorch at batch 1 and 7 on preprocessed images (export/verify.py):
max |Δprob| <= 1e-4 (FP32) and <= 5e-3 (--fp16: OUT_fp16.onnx, FP32 head, float32 output and
FP16 input, verified on the float16-rounded batch; --fp32-input keeps a float32 input, and
without --fp16 is refused). Each file written is followed by its accuracy gate, the
probres-eval command naming the checkpoint it came from.
A graph that fails is not written; exit code 1. Usage errors exit 2.

Exporter: "auto" (default) uses torch.onnx's dynamo exporter (the default and maintained one
since torch 2.9) and falls back to the deprecated TorchScript exporter only if dynamo fails
to export or to verify (there are reports of wrong dynamo numerics for torchvision ResNets:
pytorch #169178, #166797). Both verify here for resnet18/resnet101 with torch 2.14.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import onnx

from export.graph import GraphError, check_image_graph, graph_facts
from export.verify import FP16_TOL, FP32_TOL, compare, ort_session, torch_probs, verification_images
from runtime.fileio import atomic_write_bytes, sha256_file
from runtime.contract import INPUT_NAME, OUTPUT_NAME
from runtime.onnx_meta import KEY_ARCH, KEY_CONTRACT, KEY_EXPORTER, KEY_METRICS, KEY_PRECISION, KEY_SHA

TRACE_BATCH = 2       # >= 2: a traced size-1 dim can be baked into the graph as a constant
MIN_OPSET = 17        # LayerNorm-era opsets; TensorRT 10's parser covers 9..22
EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportError(RuntimeError):
    """Export produced an unusable graph."""


def export_graph(model: Any, example: Any, exporter: str, opset: int, max_batch: int) -> onnx.ModelProto:
    """torch.onnx export of `model` (WithSigmoid, eval) traced on `example` (B>=2, 3, S, S) -> ModelProto."""
    import torch

    if exporter == "dynamo":
        # dynamo: dynamic dims in dynamic_shapes, one per forward() argument in order (torch.export.Dim).
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, optimize=True,
                                        dynamic_shapes=({0: batch},), verbose=False)
        return program.model_proto
    if exporter == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript exporter
            torch.onnx.export(model, (example,), buf, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())
    raise ValueError(f"unknown exporter {exporter!r}")


class _quiet_stdout:
    """Silence the dynamo exporter's progress lines ("[torch.onnx] Run decomposition... ✅")."""

    def __enter__(self) -> None:
        import contextlib

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def check_io(model: onnx.ModelProto, size: int, num_classes: int) -> None:
    """ExportError unless the graph is images float32 [N,3,S,S] -> probs float32 [N,C] with N symbolic."""
    try:
        check_image_graph(graph_facts(model, "exported graph"), "exported graph", size, num_classes,
                          exact_names=True, input_dtypes=("float32",))
    except GraphError as e:
        raise ExportError(str(e)) from None


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the graph's metadata_props with `props`."""
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)


def probres_metadata(ckpt: Any, ckpt_sha256: str, exporter: str, precision: str) -> dict[str, str]:
    """The metadata_props that runtime/onnx_meta.py reads."""
    props = {KEY_CONTRACT: ckpt.contract.to_json(), KEY_SHA: ckpt_sha256, KEY_ARCH: ckpt.arch,
             KEY_PRECISION: precision, KEY_EXPORTER: exporter}
    if ckpt.val_metrics:
        props[KEY_METRICS] = json.dumps(ckpt.val_metrics, sort_keys=True, default=_jsonable)
    return props


def export_verified(model: Any, x: Any, ref: Any, ckpt: Any, sha: str, exporter: str, opset: int,
                    max_batch: int) -> tuple[onnx.ModelProto, Any]:
    """Export with one exporter, check it, verify it; returns (model, VerifyResult). Raises on failure."""
    import torch

    t0 = time.time()
    proto = export_graph(model, torch.from_numpy(x[:TRACE_BATCH]), exporter, opset, max_batch)
    proto.producer_name, proto.doc_string = "probres export.onnx", f"{ckpt.arch} via torch.onnx ({exporter})"
    set_metadata(proto, probres_metadata(ckpt, sha, exporter, "fp32"))
    check_io(proto, ckpt.contract.preprocess.size, ckpt.contract.labels.num_classes)
    onnx.checker.check_model(proto, full_check=True)
    result = compare(ort_session(proto.SerializeToString()), x, ref, f"{exporter} fp32", FP32_TOL)
    print(f"exported with {exporter} in {time.time() - t0:.1f}s; {result.line()}")
    return proto, result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt")
    ap.add_argument("--output", required=True, help="model.onnx (FP16 graph: OUTPUT stem + _fp16.onnx)")
    ap.add_argument("--fp16", action="store_true", help="also write and verify the FP16 graph (FP16 input)")
    ap.add_argument("--fp32-input", action="store_true",
                    help="with --fp16: keep the FP16 graph's input float32 (default: float16, half the bytes moved)")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--max-batch", type=int, default=64, help="upper bound of the symbolic batch (dynamo)")
    ap.add_argument("--exporter", choices=EXPORTERS, default="auto")
    ap.add_argument("--verify-images", default=None, help="directory of images for the numerical check")
    ap.add_argument("--slim", action="store_true", help="simplify with onnxslim when installed (re-verified)")
    return ap.parse_args(argv)


def usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if out.suffix != ".onnx":
        return usage_error(f"--output {out}: must end in .onnx")
    if not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        return usage_error(f"--opset {args.opset}: must be in {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    if args.max_batch < TRACE_BATCH:
        return usage_error(f"--max-batch {args.max_batch}: must be >= {TRACE_BATCH}")
    if args.fp32_input and not args.fp16:
        return usage_error("--fp32-input applies to the FP16 graph only; add --fp16 (or drop --fp32-input)")
    if not Path(args.checkpoint).is_file():          # before importing torch: a typo fails fast
        return usage_error(f"--checkpoint {args.checkpoint}: no such checkpoint file")
    from export.fp16 import fp16_path
    from runtime.outputs import OutputError, check_outputs
    from runtime.pipeline import is_image_name
    try:                                             # never write over what is read; writable before the work
        check_outputs([("--output", out), ("--output (FP16)", fp16_path(out) if args.fp16 else None)],
                      [("--checkpoint", args.checkpoint), ("--verify-images", args.verify_images)],
                      reads=is_image_name)
    except OutputError as e:
        return usage_error(str(e))
    from train.checkpoint import CheckpointError, load_checkpoint
    from train.model import WithSigmoid

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        return usage_error(str(e))
    try:
        x, where = verification_images(ckpt.contract.preprocess, ckpt.config, args.verify_images)
    except (FileNotFoundError, ValueError) as e:   # ImageDecodeError is a ValueError naming the file
        return usage_error(str(e))
    sha = sha256_file(args.checkpoint)
    model = WithSigmoid(ckpt.build()).eval()
    ref = torch_probs(model, x)
    print(f"{ckpt.arch} @{ckpt.contract.preprocess.size}, {ckpt.contract.labels.num_classes} labels; "
          f"verifying on {where}")

    order = ["dynamo", "torchscript"] if args.exporter == "auto" else [args.exporter]
    proto = result = None
    for exporter in order:
        try:
            proto, result = export_verified(model, x, ref, ckpt, sha, exporter, args.opset, args.max_batch)
        except Exception as e:   # ExportError, VerifyError, onnx ValidationError, exporter crashes
            print(f"{exporter} exporter failed: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}",
                  file=sys.stderr)
            proto = result = None
            continue
        if result.passed:
            break
        print(f"{exporter} exporter: graph does not match PyTorch (max |dprob| {result.worst:.2e} > {FP32_TOL:.0e})",
              file=sys.stderr)
    if result is None or not result.passed:
        hint = " (try --exporter torchscript)" if args.exporter == "dynamo" else ""
        print(f"error: no exporter produced a graph matching PyTorch within {FP32_TOL:.0e}; nothing written{hint}",
              file=sys.stderr)
        return 1
    if result.spread < 0.5:
        print(f"note: only {result.spread:.0%} of PyTorch's probabilities lie in [0.01, 0.99]; saturated outputs "
              f"make this comparison weak (untrained weights?)")

    if args.slim:
        proto = maybe_slim(proto, x, ref)
    atomic_write_bytes(out, proto.SerializeToString())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, batch dim "
          f"{graph_facts(proto).batch_dim!r})")

    if args.fp16:
        from export.fp16 import convert_fp16, fp16_path, fp16_weight_fraction

        try:
            p16 = convert_fp16(proto, fp16_input=not args.fp32_input)
            onnx.checker.check_model(p16, full_check=True)
            r16 = compare(ort_session(p16.SerializeToString()), x, ref, "fp16", FP16_TOL)
        except Exception as e:   # Fp16Error, ValidationError, VerifyError
            print(f"error: FP16 conversion failed: {str(e).splitlines()[0][:300]}; {fp16_path(out)} not written",
                  file=sys.stderr)
            return 1
        print(r16.line())
        if not r16.passed:
            print(f"error: the FP16 graph differs from PyTorch by {r16.worst:.2e} > {FP16_TOL:.0e}; "
                  f"{fp16_path(out)} not written", file=sys.stderr)
            return 1
        atomic_write_bytes(fp16_path(out), p16.SerializeToString())
        print(f"wrote {fp16_path(out)} ({fp16_path(out).stat().st_size / 1e6:.1f} MB, "
              f"{fp16_weight_fraction(p16):.2%} of weights FP16, {'float32' if args.fp32_input else 'float16'} input, "
              f"float32 output, FP32 head)")
    for path in [out] + ([fp16_path(out)] if args.fp16 else []):
        print(f"its accuracy gate: {eval_hint(path, args.checkpoint, ckpt.config)}")
    return 0


def eval_hint(onnx_path: Path, checkpoint: str, config: Any) -> str:
    """The probres-eval command gating `onnx_path` against the checkpoint it came from, on the
    training config's COCO root when that is on this machine (else the placeholder COCO_ROOT)."""
    import shlex

    root = config.get("coco_root") if isinstance(config, dict) else None
    coco = root if isinstance(root, str) and (Path(root) / "annotations").is_dir() else "COCO_ROOT"
    return " ".join(["probres-eval", "--engine", shlex.quote(str(onnx_path)), "--coco-root", shlex.quote(coco),
                     "--reference", shlex.quote(str(checkpoint))])


def maybe_slim(proto: onnx.ModelProto, x: Any, ref: Any) -> onnx.ModelProto:
    """onnxslim's graph simplification, kept only if it still verifies; skipped when not installed."""
    try:
        import onnxslim
    except ImportError:
        print("--slim skipped: onnxslim is not installed (pip install onnxslim)")
        return proto
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        slim = onnxslim.slim(proto)
        set_metadata(slim, props)
        onnx.checker.check_model(slim, full_check=True)
        r = compare(ort_session(slim.SerializeToString()), x, ref, "slim fp32", FP32_TOL)
    except Exception as e:
        print(f"--slim skipped: onnxslim failed ({str(e).splitlines()[0][:200]})")
        return proto
    print(r.line())
    if not r.passed:
        print("--slim skipped: the slimmed graph does not verify; keeping the unslimmed one")
        return proto
    print(f"slimmed: {len(proto.graph.node)} -> {len(slim.graph.node)} nodes")
    return slim


if __name__ == "__main__":
    sys.exit(main())
