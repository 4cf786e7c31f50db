"""PyTorch backend: a training checkpoint (best.pt), FP32 reference or FP16 channels_last, eager, CUDA graph or compiled.

    probres-infer --engine runs/x/best.pt --precision fp16 --cuda-graph photos/

Needs torch and torchvision (the training extra); they are imported in the constructor, and the
checkpoint is read by runtime.checkpoint (weights_only), so the runtime never imports `train`.
Options (open_backend(..., **options), the CLIs' flags):
  precision  "fp32" (default; true FP32: TF32 off, the reference exports are checked against) or
             "fp16" (half weights and FP16 input buffers, channels_last: tensor-core layout)
  cuda_graph replay the eager kernels from one CUDA graph per batch shape (CUDA only): one
             launch instead of ~350 Python-side launches, which bound eager batch-1 latency
  compile    torch.compile (Inductor, freezing: BatchNorm folded; opt-in, it compiles for minutes)
On CUDA the input buffers are pinned host tensors, each with its own device copy: the H2D copy
of batch k+1 runs on a copy stream while batch k computes on the compute stream (one event per
buffer), probabilities come back into pinned memory, and wait() is the one sync.
The network outputs logits; one sigmoid per label turns them into probabilities, as the export does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Pending

PRECISIONS = ("fp32", "fp16")


class _CudaPending(Pending):
    """Probabilities on their way into pinned host memory; wait() syncs on the batch's event."""

    def __init__(self, done: Any, out: Any) -> None:
        self._done, self._out = done, out

    def wait(self) -> np.ndarray:
        self._done.synchronize()
        return self._out.numpy().copy()           # the pinned output slot is reused by the next batch


class TorchBackend(Backend):
    """The checkpoint's network in eval mode on the CPU or a CUDA device."""

    options = ("precision", "cuda_graph", "compile")

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None,
                 precision: str = "fp32", cuda_graph: bool = False, compile: bool = False) -> None:
        try:
            import torch
            import torchvision  # noqa: F401  (runtime.checkpoint builds the network with it)
        except ImportError as e:
            raise BackendError(f"{path}: a .pt checkpoint needs torch and torchvision (pip install -e '.[train]'): {e}") from None
        from runtime.checkpoint import CheckpointError, load_network

        self.path = str(path)
        if precision not in PRECISIONS:
            raise BackendError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: this torch build sees no CUDA device")
        if cuda_graph and device != "cuda":
            raise BackendError("--cuda-graph: CUDA graphs need a GPU (--device cuda)")
        if cuda_graph and compile:
            raise BackendError("--cuda-graph and --compile: torch.compile records its own CUDA graphs; give one")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, self.contract, metrics = load_network(path)
        except CheckpointError as e:
            raise BackendError(str(e)) from None
        self._torch, self._device = torch, torch.device(device)
        fp16 = precision == "fp16"
        self._format = torch.channels_last if fp16 else torch.contiguous_format
        if device == "cuda":
            torch.backends.cudnn.benchmark = True        # fixed shapes: let cuDNN pick its kernels
            if not fp16:                                 # the reference is true FP32, not TF32 convolutions
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        model = model.to(self._device).eval()
        if fp16:
            model = model.half().to(memory_format=torch.channels_last)
        if compile:
            import torch._inductor.config as inductor_config
            if hasattr(inductor_config, "freezing"):     # weights become constants: BatchNorm folds into convs
                inductor_config.freezing = True
            # dynamic=True: one compile for every batch size; "reduce-overhead" adds CUDA graphs on a GPU.
            model = torch.compile(model, mode="reduce-overhead" if device == "cuda" else None, dynamic=True)
        self._model = model
        self.precision = precision
        self.input_dtype = np.dtype(np.float16 if fp16 else np.float32)
        self.val_metrics = metrics or None
        self.name = f"pytorch[{device}{', cuda graph' if cuda_graph else ''}{', compiled' if compile else ''}]"
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] | None = {} if cuda_graph else None
        self._slots: list[dict[str, Any]] = []          # per owned buffer: pinned host, device copy, pinned out
        if device == "cuda":
            self._copy_stream, self._compute_stream = torch.cuda.Stream(), torch.cuda.Stream()
            self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graph else None

    # ------------------------------------------------------------------------------------ buffers

    def _alloc_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Pinned host tensors on CUDA (truly asynchronous H2D), each with its own device copy."""
        if self._device.type != "cuda":
            return super()._alloc_host(shape, dtype)
        torch = self._torch
        tdt = torch.float16 if dtype == np.float16 else torch.float32
        host = torch.empty(shape, dtype=tdt, pin_memory=True)
        c = self.contract.labels.num_classes
        self._slots.append({"host": host, "dev": torch.empty(shape, dtype=tdt, device=self._device),
                            "out": torch.empty((shape[0], c), dtype=torch.float32, pin_memory=True)})
        return host.numpy()

    def _slot(self, batch: np.ndarray) -> tuple[dict[str, Any], int] | None:
        """(the slot whose pinned buffer holds `batch`, its first row) or None for a foreign array."""
        for slot in self._slots:
            base = slot["host"].numpy()
            if np.shares_memory(batch, base):
                off, rem = divmod(batch.ctypes.data - base.ctypes.data, base[0].nbytes)
                if rem == 0 and batch.flags.c_contiguous and off + batch.shape[0] <= base.shape[0]:
                    return slot, off
        return None

    # ------------------------------------------------------------------------------------ inference

    def _forward(self, x: Any) -> Any:
        """(N, 3, S, S) on the device -> float32 (N, C) probabilities on the device."""
        x = x.contiguous(memory_format=self._format)
        if self._graphs is not None:
            g, xs, ys = self._graph(tuple(x.shape), x.dtype)
            xs.copy_(x)
            g.replay()
            return ys
        return self._torch.sigmoid(self._model(x).float())

    def _graph(self, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any, Any]:
        """One CUDA graph per batch shape: static input, captured forward, static output."""
        if shape not in self._graphs:
            torch = self._torch
            xs = torch.zeros(shape, dtype=dtype, device=self._device).contiguous(memory_format=self._format)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                # warm-up outside capture: cuDNN picks its kernels
                for _ in range(3):
                    torch.sigmoid(self._model(xs).float())
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._graph_pool):
                ys = torch.sigmoid(self._model(xs).float())
            self._graphs[shape] = (g, xs, ys)
        return self._graphs[shape]

    def _submit(self, batch: np.ndarray) -> Pending:
        torch = self._torch
        found = self._slot(batch) if self._device.type == "cuda" else None
        if found is None:                                # CPU, or an array that is not ours: synchronous
            with torch.inference_mode():
                probs = self._forward(torch.from_numpy(batch).to(self._device))
                return Pending(probs.cpu().numpy().astype(np.float32, copy=False))
        slot, off = found
        n = batch.shape[0]
        dev, out = slot["dev"][:n], slot["out"][:n]
        with torch.inference_mode():
            with torch.cuda.stream(self._copy_stream):   # H2D of this batch overlaps the previous one's compute
                dev.copy_(slot["host"][off:off + n], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            self._compute_stream.wait_event(copied)
            with torch.cuda.stream(self._compute_stream):
                out.copy_(self._forward(dev), non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._compute_stream)
        return _CudaPending(done, out)

    def close(self) -> None:
        self._model, self._graphs, self._slots = None, None, []
