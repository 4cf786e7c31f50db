"""Post-training INT8 quantization of an exported FP32 graph into one Q/DQ ONNX file.

    python -m export.int8 --onnx model.onnx --calib-images data/coco/train2014 [--num 512] \
        --output model_int8.onnx [--quantize-head] [--verify-images DIR]

The same file runs on ONNX Runtime CPU (the accuracy reference for INT8 here), on OpenVINO
(runtime/backends/openvino.py) and in TensorRT as a strongly typed network: TensorRT 11 has
only explicit quantization (Q/DQ nodes in the ONNX; NVIDIA's 10.x-to-11.x migration guide).

Quantizer: NNCF's ONNX backend (nncf.quantize on the ModelProto). Why this one:
  * it keeps metadata_props and emits standard QuantizeLinear/DequantizeLinear pairs
    (weights folded to int8 initializers + DequantizeLinear), which ONNX Runtime, OpenVINO
    and TensorRT's ONNX parser all read;
  * min/max ranges plus its fast bias correction keep mAP within the 0.005 gate on the toy and
    on the real-photo set (benchmarks/RESULTS.md, "INT8 on the CPU");
  * it needs neither torch nor a GPU (NVIDIA Model Optimizer's ONNX PTQ targets TensorRT and
    calibrates through ONNX Runtime too, but pulls in a much larger stack; ONNX Runtime's own
    quantize_static has no bias correction, and an earlier measurement on another machine found
    its static INT8 slower than its own FP32).
  NNCF picks UINT8 for activations it sees are non-negative (after ReLU), and TensorRT's
  parser rejects UINT8 Q/DQ (onnx/onnx-tensorrt #884; TensorRT is symmetric-only, zero
  point 0). So to_signed() rewrites those as INT8 over the same range, and check_qdq()
  refuses any graph with a non-INT8 or non-zero zero point before it is written.

Scheme: symmetric INT8 weights per output channel, activations per tensor (NNCF's
PERFORMANCE preset), both signed. The classifier head (Gemm on the pooled 2048-vector, then
Sigmoid) stays FP32 unless --quantize-head: 2048x80 MACs against ResNet-101's ~31 G, and its
output is what mAP ranks. Measured (benchmarks/RESULTS.md, "INT8 on the CPU"), quantizing it too did not
measurably change mAP either way (toy: 92.76 vs 92.77 ONNX Runtime, 92.75 vs 92.75 OpenVINO;
photos: 69.60 vs 69.43, 69.07 vs 69.11): FP32 is kept because it costs nothing, not for mAP. Calibration images go through the runtime's own preprocessing (the contract's
spec, runtime.preprocess), and must not be the evaluation split: a directory named val2014
is refused. metadata_props travel from the FP32 file (its probres.checkpoint_sha256 included),
with probres.precision = "int8", probres.source_onnx_sha256 = the FP32 file's sha256 (so
probres-eval knows both the checkpoint and the ONNX file this one came from) and
probres.int8_calibration = JSON describing the calibration set and quantizer. The printed
accuracy gate names the FP32 file as its reference (the file quantized here).

Exit 2: usage errors (one line naming the flag or file); exit 1: quantization failed
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.graph import QDQ_OPS
from runtime.contract import INPUT_NAME, OUTPUT_NAME
from runtime.onnx_meta import KEY_INT8_CALIBRATION, KEY_PRECISION, KEY_SOURCE_ONNX, OnnxMetaError, parse_meta

HEAD_OP_TYPES = ("Gemm", "MatMul")     # the classifier head, kept FP32 by default
EVAL_SPLITS = ("val2014", "val2017", "test2014", "test2015", "test2017")
DEFAULT_NUM = 512                      # ModelOpt's README asks >= 500 images for CNNs (deploy-facts)


class Int8Error(RuntimeError):
    """The quantized graph is unusable (or not loadable by one of the target runtimes)."""


def calibration_paths(directory: Path, num: int) -> list[Path]:
    """The first `num` images of `directory` by name (the same sorted order every run)."""
    from export.verify import list_images

    return list_images(directory, num)


def quantize_int8(model: onnx.ModelProto, images: list[Any], quantize_head: bool = False) -> onnx.ModelProto:
    """FP32 probres graph + calibration images (paths or encoded bytes) -> Q/DQ INT8 graph.

    Each image is preprocessed with the contract stored in the model, one at a time as
    (1, 3, S, S) float32, so the batch dimension stays symbolic. Raises Int8Error when the
    result fails check_qdq.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from runtime.preprocess import preprocess_one

    props = {p.key: p.value for p in model.metadata_props}
    spec = parse_meta(props).contract.preprocess
    input_name = model.graph.input[0].name

    def transform(src: Any) -> dict[str, np.ndarray]:
        return {input_name: preprocess_one(src, spec, name=str(src) if isinstance(src, Path) else None)[None]}

    ignored = None if quantize_head else nncf.IgnoredScope(types=list(HEAD_OP_TYPES), validate=False)
    # Activation ranges: plain min/max over the calibration set. NNCF's default for activations
    # (per-sample means of min and max) clipped enough to cost 0.0056-0.0062 mAP on the real-photo
    # set, over the 0.005 gate; MINMAX kept it (+0.0006). Ultralytics also moved to MinMax (PR #20345).
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    quantized = nncf.quantize(model, nncf.Dataset(images, transform), preset=nncf.QuantizationPreset.PERFORMANCE,
                              subset_size=len(images), fast_bias_correction=True, ignored_scope=ignored,
                              advanced_parameters=advanced)
    to_signed(quantized)
    # NNCF keeps metadata_props; set them again anyway so the contract cannot go missing.
    del quantized.metadata_props[:]
    for k, v in props.items():
        quantized.metadata_props.add(key=k, value=v)
    check_qdq(quantized)
    return quantized


def to_signed(model: onnx.ModelProto) -> int:
    """Rewrite NNCF's UINT8 activation quantizers as INT8 ones covering the same range; returns how many.

    NNCF (3.4) makes an activation quantizer unsigned when its calibrated range is non-negative
    (after ReLU), and its hardware configs do not allow forcing signed activations
    (signedness_to_force=True conflicts with every target). TensorRT accepts only signed INT8
    with zero point 0. A UINT8 quantizer with zero point 0 and scale s covers [0, 255 s]; the
    INT8 one with scale 255 s / 127 covers [-255 s, 255 s] (clip at 127 levels): the same range
    at TensorRT's own resolution for non-negative tensors. No library does this rewrite.
    """
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in QDQ_OPS and len(n.input) >= 3]

    def unsigned(n: onnx.NodeProto) -> bool:
        zp = inits.get(n.input[2])
        return zp is not None and zp.data_type == onnx.TensorProto.UINT8

    shared = {n.input[1] for n in qdq if unsigned(n)} & {n.input[1] for n in qdq if not unsigned(n)}
    if shared:
        raise Int8Error(f"INT8 graph: scale {sorted(shared)[0]} is shared by UINT8 and INT8 quantizers")
    done: set[str] = set()
    for node in qdq:
        if not unsigned(node):
            continue
        zp = inits[node.input[2]]
        if node.op_type == "QuantizeLinear":       # its output's recorded type follows the zero point
            for vi in model.graph.value_info:
                if vi.name == node.output[0]:
                    vi.type.tensor_type.elem_type = onnx.TensorProto.INT8
        zero = onnx.numpy_helper.to_array(zp)
        if np.any(zero != 0):
            raise Int8Error(f"INT8 graph: {node.op_type} {node.name} is asymmetric (UINT8 zero point != 0)")
        if node.input[1] not in done:
            scale = inits[node.input[1]]
            scale.CopyFrom(onnx.numpy_helper.from_array(
                (onnx.numpy_helper.to_array(scale) * (255.0 / 127.0)).astype(np.float32), scale.name))
            done.add(node.input[1])
        if zp.name not in done:
            zp.CopyFrom(onnx.numpy_helper.from_array(zero.astype(np.int8), zp.name))
            done.add(zp.name)
    return len(done) // 2


def check_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Int8Error unless the graph is a TensorRT-loadable Q/DQ graph; returns node counts.

    Rules: float32 graph I/O; at least one QuantizeLinear and one DequantizeLinear; every
    Q/DQ zero point present, INT8 and all zero (TensorRT is symmetric-only and rejects UINT8).
    """
    for v in list(model.graph.input) + list(model.graph.output):
        if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise Int8Error(f"INT8 graph: {v.name} is not float32")
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
              for n in model.graph.node if n.op_type == "Constant"}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for node in model.graph.node:
        if node.op_type not in counts:
            continue
        counts[node.op_type] += 1
        if len(node.input) < 3 or not node.input[2]:
            raise Int8Error(f"INT8 graph: {node.op_type} {node.name} has no zero point (it would default to UINT8)")
        zp = inits.get(node.input[2]) or consts.get(node.input[2])
        if zp is None:
            raise Int8Error(f"INT8 graph: {node.op_type} {node.name}: zero point {node.input[2]} is not a constant")
        if zp.data_type != onnx.TensorProto.INT8:
            raise Int8Error(f"INT8 graph: {node.op_type} {node.name} has a "
                            f"{onnx.TensorProto.DataType.Name(zp.data_type)} zero point; TensorRT needs INT8")
        if np.any(onnx.numpy_helper.to_array(zp) != 0):
            raise Int8Error(f"INT8 graph: {node.op_type} {node.name} is asymmetric (zero point != 0)")
    if not counts["QuantizeLinear"] or not counts["DequantizeLinear"]:
        raise Int8Error(f"INT8 graph: no Q/DQ pairs ({counts}); the quantization did not take")
    return counts


def head_is_fp32(model: onnx.ModelProto) -> bool:
    """True when no head op (Gemm/MatMul) reads a DequantizeLinear output directly."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return not any(i in dq for n in model.graph.node if n.op_type in HEAD_OP_TYPES for i in n.input)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m export.int8", description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True, help="the FP32 model.onnx from python -m export.onnx")
    ap.add_argument("--calib-images", required=True, metavar="DIR",
                    help="calibration images (COCO train2014 in a COCO run; never the evaluation split)")
    ap.add_argument("--num", type=int, default=DEFAULT_NUM, help=f"calibration images used (default {DEFAULT_NUM})")
    ap.add_argument("--output", required=True, help="model_int8.onnx")
    ap.add_argument("--quantize-head", action="store_true", help="quantize the classifier head too (default FP32)")
    ap.add_argument("--verify-images", default=None, metavar="DIR",
                    help="images for the FP32-vs-INT8 probability report (default: the first calibration images)")
    return ap.parse_args(argv)


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (NNCF's start with a newline)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _error(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, out, calib = Path(args.onnx), Path(args.output), Path(args.calib_images)
    if out.suffix != ".onnx":
        return _error(f"--output {out}: must end in .onnx")
    if not src.is_file():
        return _error(f"--onnx {src}: no such ONNX file")
    if out.resolve() == src.resolve():
        return _error(f"--output {out}: would overwrite the input --onnx; choose another file")
    if args.num < 1:
        return _error(f"--num {args.num}: must be >= 1")
    if not calib.is_dir():
        return _error(f"--calib-images {calib}: no such directory")
    if calib.resolve().name in EVAL_SPLITS:
        return _error(f"--calib-images {calib}: is an evaluation split; calibrate on training images (train2014)")
    paths = calibration_paths(calib, args.num)
    if not paths:
        return _error(f"--calib-images {calib}: no image files")
    if args.verify_images is not None:
        from export.verify import list_images

        if not Path(args.verify_images).is_dir():
            return _error(f"--verify-images {args.verify_images}: no such directory")
        if not list_images(Path(args.verify_images), 1):
            return _error(f"--verify-images {args.verify_images}: no image files")
    try:
        model = onnx.load(str(src))
        meta = parse_meta({p.key: p.value for p in model.metadata_props}, str(src))
    except OnnxMetaError as e:
        return _error(str(e))
    except Exception as e:
        return _error(f"--onnx {src}: not a readable ONNX model ({_first_line(e)})")
    if (meta.precision or "fp32") != "fp32":
        return _error(f"--onnx {src}: is a {meta.precision} graph; quantize the FP32 export")

    import logging

    import nncf

    nncf.set_log_level(logging.WARNING)      # its INFO lines list every node it skips
    print(f"calibrating on {len(paths)} images from {calib} (nncf {nncf.__version__}, ONNX backend)")
    try:
        q = quantize_int8(model, paths, quantize_head=args.quantize_head)
        onnx.checker.check_model(q)
    except Exception as e:     # Int8Error, ImageDecodeError (names the file), NNCF failures
        return _error(f"{src}: INT8 quantization failed: {_first_line(e)}; nothing written", 1)
    counts = check_qdq(q)
    calibration = {"images": len(paths), "source": str(calib), "order": "first by file name",
                   "preprocess": "runtime.preprocess with the model's contract",
                   "quantizer": f"nncf {nncf.__version__} ONNX PTQ (activation ranges MINMAX, fast bias correction, "
                                 f"PERFORMANCE preset)",
                   "weights": "int8 symmetric per channel", "activations": "int8 symmetric per tensor (signed)",
                   "head": "int8" if args.quantize_head else "fp32"}
    for p in q.metadata_props:
        if p.key == KEY_PRECISION:
            p.value = "int8"
    q.metadata_props.add(key=KEY_INT8_CALIBRATION, value=json.dumps(calibration, sort_keys=True))
    from runtime.fileio import atomic_write_bytes, sha256_file

    q.metadata_props.add(key=KEY_SOURCE_ONNX, value=sha256_file(src))
    report = fp32_vs_int8(model, q, meta.contract.preprocess, args.verify_images, paths)

    atomic_write_bytes(out, q.SerializeToString())
    print(f"{report}\nwrote {out} ({out.stat().st_size / 1e6:.1f} MB, {counts['QuantizeLinear']} Q / "
          f"{counts['DequantizeLinear']} DQ nodes, head {calibration['head']}); its accuracy gate is "
          f"{eval_hint(out, src, calib)}")
    return 0


def eval_hint(out: Path, src: Path, calib: Path) -> str:
    """The probres-eval command gating `out` against the FP32 file it was quantized from (INT8's
    own tolerances apply); the COCO root is the calibration directory's parent when it is one."""
    import shlex

    root = calib.parent
    coco = str(root) if (root / "annotations").is_dir() else "COCO_ROOT"
    return " ".join(["probres-eval", "--engine", shlex.quote(str(out)), "--coco-root", shlex.quote(coco),
                     "--reference-engine", shlex.quote(str(src))])


def fp32_vs_int8(fp32: onnx.ModelProto, int8: onnx.ModelProto, spec: Any, verify_dir: str | None,
                 calib: list[Path], n: int = 8) -> str:
    """One line: max/mean |dprob| of the INT8 graph against the FP32 one in ONNX Runtime CPU.

    Informative only: INT8 moves probabilities by design; mAP is the gate (probres-eval).
    """
    from export.verify import list_images, ort_session
    from runtime.preprocess import preprocess

    paths = list_images(Path(verify_dir), n) if verify_dir else calib[:n]
    x = preprocess([str(p) for p in paths], spec=spec)
    (a,) = ort_session(fp32.SerializeToString()).run([OUTPUT_NAME], {INPUT_NAME: x})
    (b,) = ort_session(int8.SerializeToString()).run([OUTPUT_NAME], {INPUT_NAME: x})
    d = np.abs(a.astype(np.float64) - b)
    return f"INT8 vs FP32 (ONNX Runtime CPU, {len(paths)} images): max |dprob| {d.max():.3g}, mean {d.mean():.3g}"


if __name__ == "__main__":
    sys.exit(main())
