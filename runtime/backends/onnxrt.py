"""ONNX Runtime backend: TensorRT EP, then CUDA EP, then CPU, whichever this onnxruntime build has.

    probres-infer --engine model_fp16.onnx [--provider tensorrt|cuda|cpu] photos/

The graph follows export's convention: input "images" float32 or float16 (N, 3, S, S; float16
for an FP16 export: the pipeline then writes FP16, half the bytes), output "probs" float32
(N, C), symbolic batch. On a GPU provider the batch goes through IO binding: the input is bound
in place from the host buffer the pipeline wrote (no numpy -> OrtValue copy), the output is
bound on the device and copied back once per batch. The contract (labels + preprocessing) comes from the
model's metadata_props ("probres.contract"), so the file alone says how to feed it.
CUDA EP comes after TensorRT EP so that nodes TensorRT cannot take fall back to CUDA, and
CPU is always last (ONNX Runtime docs, execution providers). Option `provider` names one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError
from runtime.contract import OUTPUT_NAME
from runtime.onnx_meta import OnnxMetaError, metadata_props, read_onnx_meta

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = PREFERRED_PROVIDERS[:2]
PROVIDER_NAMES = {"tensorrt": PREFERRED_PROVIDERS[0], "cuda": PREFERRED_PROVIDERS[1], "cpu": PREFERRED_PROVIDERS[2]}


def choose_providers(available: list[str], device: str, provider: str | None = None) -> list[str]:
    """The providers to ask for, in preference order, limited to `available`.

    device "cpu": CPU only; "auto": every available one of TensorRT, CUDA, CPU; "cuda": like
    auto, but BackendError when neither GPU provider is available. provider ("tensorrt", "cuda",
    "cpu"): that one first (with CUDA, then CPU behind TensorRT for the nodes it cannot take).
    """
    if provider is not None:
        if provider not in PROVIDER_NAMES:
            raise BackendError(f"--provider must be one of {', '.join(PROVIDER_NAMES)}, got {provider!r}")
        want = PROVIDER_NAMES[provider]
        if want not in available:
            raise BackendError(f"--provider {provider}: this onnxruntime build has no {want} "
                               f"(it has {', '.join(available)})")
        if device == "cpu" and provider != "cpu":
            raise BackendError(f"--provider {provider} runs on a GPU; it contradicts --device cpu")
        return [p for p in PREFERRED_PROVIDERS[PREFERRED_PROVIDERS.index(want):] if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    if device == "cuda" and not any(p in chosen for p in GPU_PROVIDERS):
        raise BackendError(f"--device cuda: this onnxruntime build has no GPU provider (it has {', '.join(available)}); "
                           f"install the `gpu` extra (onnxruntime-gpu, never together with onnxruntime)")
    return chosen or ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """One InferenceSession over an exported probres ONNX file."""

    options = ("provider",)

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None,
                 provider: str | None = None, trt_cache_dir: str | os.PathLike[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(f"{path}: onnxruntime is not installed; install the `cpu` or `gpu` extra "
                               f"(pip install -e '.[cpu]')") from None
        self.path = str(path)
        providers = choose_providers(ort.get_available_providers(), device, provider)
        opts = ort.SessionOptions()
        # intra-op 0 = one thread per physical core (ONNX Runtime's default); one op at a time.
        opts.intra_op_num_threads = int(threads) if threads else 0
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3    # errors only: provider fallback warnings are not the user's problem
        meta_precision = "fp32"
        if "TensorrtExecutionProvider" in providers:   # TensorRT EP's FP16 switch follows the graph's precision
            try:
                meta_precision = metadata_props(self.path).get("probres.precision", "fp32")
            except OnnxMetaError:
                pass                                    # the session below reports the error
        provider_args: list[Any] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                cache = Path(trt_cache_dir) if trt_cache_dir else Path.home() / ".cache" / "probres" / "ort_trt"
                provider_args.append((p, {
                    "trt_fp16_enable": meta_precision == "fp16",   # an FP32 model stays FP32 (parity)
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                }))
            else:
                provider_args.append(p)
        try:
            self._sess = ort.InferenceSession(self.path, sess_options=opts, providers=provider_args)
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile...: one line, no traceback
            raise BackendError(f"{path}: not a loadable ONNX model ({_first_line(e)})") from None
        try:
            meta = read_onnx_meta(self.path, session=self._sess)
        except OnnxMetaError as e:
            raise BackendError(str(e)) from None
        self.contract, self.precision = meta.contract, meta.precision or "fp32"
        self.val_metrics = meta.val_metrics if isinstance(meta.val_metrics, dict) and meta.val_metrics else None
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected one input tensor, found {len(inputs)}")
        self._input = inputs[0].name
        self.input_dtype = np.dtype(np.float16 if inputs[0].type == "tensor(float16)" else np.float32)
        names = [o.name for o in outputs]
        self._output = OUTPUT_NAME if OUTPUT_NAME in names else names[0]
        used = self._sess.get_providers()
        self.name = f"onnxruntime[{used[0]}]"
        self.providers = used
        self._io = self._sess.io_binding() if used[0] in GPU_PROVIDERS else None
        self._out_device = "cuda"                        # where IO binding leaves "probs" before the copy back

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self._io is None:                             # CPU: run() reads the numpy buffer in place
            (probs,) = self._sess.run([self._output], {self._input: batch})   # batch is already input_dtype
            return np.asarray(probs, dtype=np.float32)
        # GPU: bind the host buffer in place (ORT copies it to the device once, inside the run),
        # the output on the device, one copy back. Prepared on this CPU-only machine, not run here.
        io = self._io
        io.bind_input(self._input, "cpu", 0, self.input_dtype.type, list(batch.shape), batch.ctypes.data)
        io.bind_output(self._output, self._out_device, 0)
        self._sess.run_with_iobinding(io)
        (probs,) = io.copy_outputs_to_cpu()
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        return np.asarray(probs, dtype=np.float32)

    def close(self) -> None:
        self._sess = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:300]
