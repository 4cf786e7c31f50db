"""OpenVINO backend (CPU): reads the exported .onnx directly, FP32, FP16 or INT8 Q/DQ.

    probres-infer --engine model_int8.onnx --backend openvino --threads 2 images/

No IR conversion step: OpenVINO's ONNX frontend reads the same file ONNX Runtime and
TensorRT take, so one artifact serves all three. Compiled for latency (PERFORMANCE_HINT
LATENCY) with INFERENCE_NUM_THREADS from --threads; the inference precision hint is f32 so
that non-quantized layers compute as ONNX Runtime does (OpenVINO would pick bf16 on CPUs
with AMX/AVX512-BF16); Q/DQ-quantized layers still run in INT8. Measured on 2-core VMs
(ResNet-101 @448, batch 1): f32 slower than ONNX Runtime FP32, the NNCF INT8 graph 1.66x
faster on Zen 3/AVX2 (deploy-facts) and 2.4x on Zen 5/AVX-512 VNNI (benchmarks/RESULTS.md,
"INT8 on the CPU"), which is why open_backend picks OpenVINO automatically for INT8 files only.

Two infer requests: a caller may hold two submitted batches (submit k+1, then wait k);
inputs are shared, not copied (share_inputs), so a buffer is reused only after its wait().
The model contract comes from the file's metadata_props (runtime.onnx_meta). No torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Pending
from runtime.contract import OUTPUT_NAME
from runtime.onnx_meta import OnnxMetaError, read_onnx_meta

NUM_REQUESTS = 2       # the interface's overlap depth: two batches in flight


def available() -> bool:
    """True when the openvino package can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoBackend(Backend):
    """One compiled OpenVINO model on the CPU plugin, with NUM_REQUESTS infer requests."""

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None) -> None:
        if device == "cuda":
            raise BackendError(f"{path}: the OpenVINO backend runs on the CPU; use --backend onnxruntime or a "
                               f"TensorRT plan for --device cuda")
        try:
            import openvino as ov
        except ImportError:
            raise BackendError(f"{path}: openvino is not installed; install the `openvino` extra "
                               f"(pip install -e '.[openvino]')") from None
        self.path = str(path)
        try:
            meta = read_onnx_meta(self.path)
        except OnnxMetaError as e:
            raise BackendError(str(e)) from None
        self.contract, self.precision = meta.contract, meta.precision or "fp32"
        self.val_metrics = meta.val_metrics if isinstance(meta.val_metrics, dict) and meta.val_metrics else None
        core = ov.Core()
        config: dict[str, Any] = {
            ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
            ov.properties.hint.inference_precision: ov.Type.f32,
            ov.properties.inference_num_threads: int(threads) if threads else 0,   # 0 = OpenVINO's choice
        }
        try:
            model = core.read_model(self.path)
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as e:   # RuntimeError / GeneralFailure from the frontend or the plugin
            text = str(e).strip()
            raise BackendError(f"{path}: OpenVINO cannot load it ({(text.splitlines() or ['?'])[0][:300]})") from None
        inputs, outputs = self._compiled.inputs, self._compiled.outputs
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected one input tensor, found {len(inputs)}")
        self.input_dtype = np.dtype(np.float16 if inputs[0].get_element_type() == ov.Type.f16 else np.float32)
        names = [o.get_any_name() for o in outputs]
        self._output = names.index(OUTPUT_NAME) if OUTPUT_NAME in names else 0
        self._requests = [self._compiled.create_infer_request() for _ in range(NUM_REQUESTS)]
        self._next = 0
        self.threads = int(self._compiled.get_property(ov.properties.inference_num_threads))
        self.name = "openvino[CPU]"

    def _submit(self, batch: np.ndarray) -> Pending:
        req = self._requests[self._next]
        self._next = (self._next + 1) % NUM_REQUESTS
        # share_inputs: OpenVINO reads the caller's buffer in place (kept alive by _OvPending).
        req.start_async({0: batch}, share_inputs=True)
        return _OvPending(req, self._output, batch)

    def describe(self) -> str:
        return f"{self.name} {self.precision} {self.path} ({self.threads} threads, latency hint)"

    def close(self) -> None:
        self._requests, self._compiled = [], None


class _OvPending(Pending):
    """wait(): block on the infer request, copy its output out (the request's tensor is reused)."""

    def __init__(self, req: Any, output: int, batch: np.ndarray) -> None:
        self._req, self._out, self._batch = req, output, batch

    def wait(self) -> np.ndarray:
        self._req.wait()
        self._batch = None
        return np.array(self._req.get_output_tensor(self._out).data, dtype=np.float32, copy=True)
