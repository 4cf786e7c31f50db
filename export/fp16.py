"""FP16 conversion of the exported graph: FP16 input (or float32), float32 output, an FP32 classifier head.

    python -m export.fp16 model.onnx model_fp16.onnx [--fp32-input]

Why an FP16 *graph* (not only an FP16 engine flag): TensorRT 11 removed BuilderFlag.FP16 and
weak typing; networks are strongly typed and take their precision from the ONNX dtypes
(NVIDIA, "TensorRT 10.x to 11.x Python API migration"). The same graph runs in ONNX Runtime
(CPU or CUDA) with FP16 numerics, which is how its accuracy is checked without a GPU.

onnxconverter-common's convert_float_to_float16 with keep_io_types=True inserts Casts after
the float32 input and before the float32 output. The head (Gemm on the pooled 2048-vector,
then Sigmoid) stays FP32: its cost is negligible, and FP16 probabilities near 1.0 are
spaced about 5e-4 apart, which would add ties to the ranking that mAP is computed from.

FP16 input (the default, fp16_input=True): the converter's Cast after the float32 input is
removed and "images" becomes float16, so the runtime's pipeline writes FP16 (its C kernel
rounds the same float32 value once) and half the bytes cross the host and the PCIe bus. The
graph computed in FP16 from that Cast on anyway, so the numbers are the same; probres-eval on
the toy set measured both (benchmarks/RESULTS.md, "FP16 input").
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx

from export.graph import weight_counts

# Ops kept in FP32: the converter's own default block list (ops without FP16 kernels) plus the head.
HEAD_OPS = ("Gemm", "MatMul", "Sigmoid")


class Fp16Error(RuntimeError):
    """The FP16 conversion produced an unusable graph."""


def convert_fp16(model: onnx.ModelProto, fp16_input: bool = True) -> onnx.ModelProto:
    """FP32 graph -> FP16 graph with FP16 (or float32) input, float32 output and an FP32 head; metadata kept.

    Sets metadata "probres.precision" to "fp16". Raises Fp16Error when the result is not
    mostly FP16 (a silent no-op conversion) or its I/O types are not the ones asked for.
    """
    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(HEAD_OPS))
    model = copy.deepcopy(model)   # the converter edits its argument in place
    # The dynamo exporter lists initializers in value_info too; the converter would then mark the
    # head's (blocked, FP32) weights FP16 in value_info and Cast them. They need no value_info.
    inits = {i.name for i in model.graph.initializer}
    keep = [v for v in model.graph.value_info if v.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    # The converter names its Casts and their tensors after the node ("<node>_input_cast_0"): unnamed
    # nodes would collide and corrupt the graph, so give every node a unique name first.
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    float_outputs = {o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings():
        # "the float32 number 1.5e-08 will be truncated to 1e-07": tiny weights clamp to FP16's
        # usable range (min_positive_val); expected for trained and untrained nets alike.
        warnings.filterwarnings("ignore", message=r"the float32 number", category=UserWarning)
        out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    restore_fp32_outputs(out, float_outputs)
    if fp16_input:
        make_inputs_fp16(out)
    _set_meta(out, "probres.precision", "fp16")
    check_fp16(out, fp16_input)
    return out


def make_inputs_fp16(model: onnx.ModelProto) -> None:
    """Retype each float32 graph input that feeds only Cast(to=FLOAT16) nodes as float16 and drop those Casts."""
    nodes = list(model.graph.node)
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        users = [n for n in nodes if inp.name in n.input]
        casts = [n for n in users if n.op_type == "Cast"
                 and next((a.i for a in n.attribute if a.name == "to"), None) == onnx.TensorProto.FLOAT16]
        if not users or len(casts) != len(users):
            raise Fp16Error(f"FP16 graph: input {inp.name} is not only cast to FP16; cannot make it an FP16 input")
        for cast in casts:
            for n in nodes:                               # readers of the Cast's output read the input itself
                for k, name in enumerate(n.input):
                    if name == cast.output[0]:
                        n.input[k] = inp.name
            model.graph.node.remove(cast)
        inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16


def restore_fp32_outputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Undo the converter's FP16 cast on graph outputs produced by a blocked (FP32) node.

    onnxconverter-common 1.16: when a blocked node (our Sigmoid) writes a graph output,
    insert_cast16_after_node appends Cast(to=FLOAT16) and retypes the output FLOAT16, and
    keep_io_types then skips it (it only handles FLOAT outputs). So "probs" would come out
    FP16. Rewire: the blocked node writes the output itself, in FP32; drop the Cast.
    """
    nodes = list(model.graph.node)
    for out in model.graph.output:
        if out.name not in names or out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        cast = next((n for n in nodes if out.name in n.output), None)
        to = next((a.i for a in cast.attribute if a.name == "to"), None) if cast is not None else None
        src = cast.input[0] if cast is not None else None
        upstream = next((n for n in nodes if src in n.output), None)
        if cast is None or cast.op_type != "Cast" or to != onnx.TensorProto.FLOAT16 or upstream is None or any(
                out.name in n.input or (src in n.input and n is not cast) for n in nodes):
            raise Fp16Error(f"FP16 graph: output {out.name} is FP16 and cannot be restored to float32")
        upstream.output[list(upstream.output).index(src)] = out.name
        model.graph.node.remove(cast)
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        keep = [v for v in model.graph.value_info if v.name != src]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def fp16_weight_fraction(model: onnx.ModelProto) -> float:
    """Fraction of initializer elements stored as FP16 (0..1)."""
    n, n16 = weight_counts(model)
    return n16 / max(n, 1)


def check_fp16(model: onnx.ModelProto, fp16_input: bool = True) -> None:
    """Fp16Error unless the input is float16 (fp16_input) or float32, outputs float32, >= 90% of the weights FP16."""
    want_in = onnx.TensorProto.FLOAT16 if fp16_input else onnx.TensorProto.FLOAT
    for v, want in [(i, want_in) for i in model.graph.input] + [(o, onnx.TensorProto.FLOAT) for o in model.graph.output]:
        if v.type.tensor_type.elem_type != want:
            raise Fp16Error(f"FP16 graph: {v.name} is not {onnx.TensorProto.DataType.Name(want).lower()}")
    frac = fp16_weight_fraction(model)
    if frac < 0.9:
        raise Fp16Error(f"FP16 graph: only {frac:.1%} of the weights are FP16; the conversion did not take")


def fp16_path(output: str | Path) -> Path:
    """model.onnx -> model_fp16.onnx (beside it)."""
    p = Path(output)
    return p.with_name(p.stem + "_fp16.onnx")


def main(argv: list[str] | None = None) -> int:
    """python -m export.fp16 IN.onnx [OUT.onnx] [--fp32-input]: convert and write atomically (no PyTorch check)."""
    from runtime.fileio import atomic_write_bytes

    args = list(sys.argv[1:] if argv is None else argv)
    fp16_input = "--fp32-input" not in args
    args = [a for a in args if a != "--fp32-input"]
    if not 1 <= len(args) <= 2 or args[0].startswith("-"):
        print("usage: python -m export.fp16 IN.onnx [OUT.onnx] [--fp32-input]  (default OUT: IN_fp16.onnx)",
              file=sys.stderr)
        return 2
    src = Path(args[0])
    dst = Path(args[1]) if len(args) == 2 else fp16_path(src)
    if not src.is_file():
        print(f"error: {src}: no such ONNX file", file=sys.stderr)
        return 2
    if dst.resolve() == src.resolve():
        print(f"error: {dst}: would overwrite the input ONNX file; choose another output", file=sys.stderr)
        return 2
    try:
        model = convert_fp16(onnx.load(str(src)), fp16_input)
        onnx.checker.check_model(model)
    except Exception as e:
        print(f"error: {src}: FP16 conversion failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    atomic_write_bytes(dst, model.SerializeToString())
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB, {fp16_weight_fraction(model):.2%} of weights FP16); "
          f"verify it with python -m export.onnx --fp16, which compares it with PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
