"""The one reader of an exported ONNX graph's facts: tensor names, dtypes, dims, precision, weight volume, metadata.

    python -m export.graph model.onnx

export.onnx (check_io), export.trt_build (onnx_facts, for TensorRT) and export.triton (engine_facts)
read a graph through `read_graph` / `graph_facts` and check it with `check_image_graph`; a TensorRT
plan's facts come from its sidecar manifest instead (runtime.trt_manifest). Needs the `onnx`
package (the export extra): the runtime reads only the metadata, through runtime.onnx_meta.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Sequence

import onnx

from runtime.contract import INPUT_NAME, OUTPUT_NAME

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class GraphError(ValueError):
    """The graph is unreadable or not probres's shape; the message names the file (callers prefix their flag)."""


@dataclass(frozen=True)
class GraphFacts:
    """What a graph's single input and output are, and what its weights say about its precision."""

    input_name: str
    output_name: str
    input_dtype: str                          # numpy's name: "float32", "float16", ...
    output_dtype: str
    input_dims: tuple[int | str, ...]         # a name for a symbolic dim
    output_dims: tuple[int | str, ...]
    precision: str                            # "int8" with Q/DQ nodes, "fp16" when most weights are FP16, else "fp32"
    fp32_weight_bytes: int                    # what the weights would take in FP32 (engine size reference)
    metadata: dict[str, str] = field(default_factory=dict, compare=False)   # metadata_props (runtime.onnx_meta keys)

    @property
    def batch_dim(self) -> int | str | None:
        """The input's dim 0: a name when symbolic."""
        return self.input_dims[0] if self.input_dims else None

    @property
    def image_size(self) -> int | None:
        """S of an [N, 3, S, S] input, else None."""
        d = self.input_dims
        ok = len(d) == 4 and d[1] == 3 and isinstance(d[2], int) and d[2] > 0 and d[2] == d[3]
        return int(d[2]) if ok else None


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    elem = value_info.type.tensor_type.elem_type
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem).lower()


def weight_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(initializer elements, of which FP16); dims only: external weight data need not be loaded."""
    n = n16 = 0
    for t in model.graph.initializer:
        count = prod(t.dims)                       # prod(()) == 1: a scalar
        n += count
        n16 += count if t.data_type == onnx.TensorProto.FLOAT16 else 0
    return n, n16


def graph_facts(model: onnx.ModelProto, name: str = "model") -> GraphFacts:
    """The facts of an in-memory graph; GraphError (naming `name`) unless it has one input and one output."""
    inits = {i.name for i in model.graph.initializer}
    ins = [v for v in model.graph.input if v.name not in inits]    # old exporters list weights as inputs too
    outs = list(model.graph.output)
    if len(ins) != 1 or len(outs) != 1:
        raise GraphError(f"{name}: graph I/O are {[v.name for v in ins]} -> {[v.name for v in outs]}, "
                         f"expected one input and one output (['{INPUT_NAME}'] -> ['{OUTPUT_NAME}'])")
    n, n16 = weight_counts(model)
    qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)
    precision = "int8" if qdq else ("fp16" if n and n16 / n >= 0.5 else "fp32")
    return GraphFacts(ins[0].name, outs[0].name, _dtype(ins[0]), _dtype(outs[0]), _dims(ins[0]), _dims(outs[0]),
                      precision, 4 * n, {p.key: p.value for p in model.metadata_props})


def read_graph(path: str | Path) -> GraphFacts:
    """graph_facts of an .onnx file (weights kept apart are not loaded); GraphError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise GraphError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
    return graph_facts(model, str(path))


def check_image_graph(f: GraphFacts, name: str = "model", size: int | None = None, num_classes: int | None = None,
                      symbolic_batch: bool = True, exact_names: bool = False,
                      input_dtypes: Sequence[str] = ("float32", "float16")) -> None:
    """GraphError unless `f` takes images [N, 3, S, S] (and, given num_classes, gives float32 [N, C]).

    size: S when known (None: any square S); symbolic_batch: N must be a name (a traced batch baked in
    as a number breaks every other batch size); exact_names: the tensors must be called INPUT_NAME and
    OUTPUT_NAME (what export.onnx writes).
    """
    if exact_names and (f.input_name, f.output_name) != (INPUT_NAME, OUTPUT_NAME):
        raise GraphError(f"{name}: graph I/O are ['{f.input_name}'] -> ['{f.output_name}'], "
                         f"expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']")
    tensors = [(f.input_name, f.input_dtype, f.input_dims, input_dtypes)]
    if num_classes is not None:
        tensors.append((f.output_name, f.output_dtype, f.output_dims, ("float32",)))
    for tensor, dtype, dims, dtypes in tensors:
        if dtype not in dtypes:
            raise GraphError(f"{name}: {tensor} is {dtype}, expected {' or '.join(dtypes)}")
        if symbolic_batch and (not dims or not isinstance(dims[0], str)):
            raise GraphError(f"{name}: {tensor} has a fixed batch dimension {list(dims)}; dim 0 must be symbolic")
    if f.image_size is None or (size is not None and f.image_size != size):
        raise GraphError(f"{name}: {f.input_name} has shape {list(f.input_dims)}, "
                         f"expected [N, 3, {size or 'S'}, {size or 'S'}]")
    if num_classes is not None and list(f.output_dims[1:]) != [num_classes]:
        raise GraphError(f"{name}: {f.output_name} has shape {list(f.output_dims)}, expected [N, {num_classes}]")


def main(argv: list[str] | None = None) -> int:
    """Print an .onnx file's facts, one per line."""
    paths = sys.argv[1:] if argv is None else argv
    if len(paths) != 1:
        print("usage: python -m export.graph model.onnx", file=sys.stderr)
        return 2
    try:
        f = read_graph(paths[0])
    except GraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in ("input_name", "input_dtype", "input_dims", "output_name", "output_dtype", "output_dims",
                "precision", "fp32_weight_bytes"):
        print(f"{key}: {getattr(f, key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
