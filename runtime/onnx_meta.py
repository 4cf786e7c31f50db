"""Read the model contract and export metadata from an exported .onnx file (no torch, onnx optional).

    python -c "from runtime.onnx_meta import read_onnx_meta; print(read_onnx_meta('model.onnx').contract)"

export.onnx stores these metadata_props (all strings):
  probres.contract           ModelContract JSON (labels + preprocessing)
  probres.checkpoint_sha256  sha256 of the source checkpoint file
  probres.source_onnx_sha256 sha256 of the FP32 .onnx an INT8 file was quantized from (export.int8)
  probres.arch               e.g. "resnet101"
  probres.val_metrics        JSON of PyTorch's val metrics for these weights (when known)
  probres.precision          "fp32" | "fp16" | "int8" (FP16 and INT8 graphs keep float32 inputs/outputs)
  probres.int8_calibration   JSON describing an INT8 file's calibration set and quantizer (export.int8)
  probres.exporter           "dynamo" | "torchscript"
Read with the onnx package when installed, else through ONNX Runtime's
session.get_modelmeta().custom_metadata_map (the device only needs onnxruntime). A runtime
that already holds a session passes it, so nothing is loaded twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.contract import ContractError, ModelContract
from runtime.errors import ModelError

KEY_CONTRACT = "probres.contract"
KEY_SHA = "probres.checkpoint_sha256"
KEY_SOURCE_ONNX = "probres.source_onnx_sha256"
KEY_ARCH = "probres.arch"
KEY_METRICS = "probres.val_metrics"
KEY_PRECISION = "probres.precision"
KEY_EXPORTER = "probres.exporter"
KEY_INT8_CALIBRATION = "probres.int8_calibration"


class OnnxMetaError(ModelError, ValueError):
    """The file is missing, not ONNX, or carries no (valid) probres contract; the message names it."""


@dataclass(frozen=True)
class OnnxMeta:
    contract: ModelContract
    checkpoint_sha256: str | None = None
    arch: str | None = None
    val_metrics: dict[str, Any] | None = None
    precision: str | None = None
    exporter: str | None = None
    raw: dict[str, str] = field(default_factory=dict)   # every metadata_props entry


def metadata_props(path: str | Path, session: Any = None) -> dict[str, str]:
    """All metadata_props of an .onnx file as a dict (onnx package, else ONNX Runtime)."""
    path = Path(path)
    if session is not None:
        return dict(session.get_modelmeta().custom_metadata_map)
    if not path.is_file():
        raise OnnxMetaError(f"{path}: no such ONNX file")
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            # load_external_data=False: metadata is in the main file; skip loading weights kept apart.
            model = onnx.load(str(path), load_external_data=False)
            return {p.key: p.value for p in model.metadata_props}
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # only for metadata
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return dict(sess.get_modelmeta().custom_metadata_map)
    except Exception as e:
        raise OnnxMetaError(f"{path}: not a readable ONNX model ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None


def parse_meta(props: dict[str, str], name: str = "model") -> OnnxMeta:
    """OnnxMeta from a metadata_props dict; OnnxMetaError (naming `name`) without a valid contract."""
    if KEY_CONTRACT not in props:
        raise OnnxMetaError(f"{name}: no {KEY_CONTRACT} metadata; export the model with python -m export.onnx")
    try:
        contract = ModelContract.from_json(props[KEY_CONTRACT])
    except ContractError as e:
        raise OnnxMetaError(f"{name}: bad {KEY_CONTRACT} metadata ({e})") from None
    metrics = None
    if props.get(KEY_METRICS):
        try:
            metrics = json.loads(props[KEY_METRICS])
        except json.JSONDecodeError:
            raise OnnxMetaError(f"{name}: {KEY_METRICS} metadata is not JSON") from None
    return OnnxMeta(contract=contract, checkpoint_sha256=props.get(KEY_SHA), arch=props.get(KEY_ARCH),
                    val_metrics=metrics, precision=props.get(KEY_PRECISION), exporter=props.get(KEY_EXPORTER),
                    raw=dict(props))


def read_onnx_meta(path: str | Path, session: Any = None) -> OnnxMeta:
    """The contract and export metadata of `path` (pass an ONNX Runtime `session` of it to reuse it)."""
    return parse_meta(metadata_props(path, session), str(path))
