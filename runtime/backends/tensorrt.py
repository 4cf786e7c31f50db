"""TensorRT backend: a serialized plan + its sidecar manifest, run with cuda-python's runtime API.

    python -c "from runtime.backends.tensorrt import TensorRTBackend as B; print(B('model.plan').describe())"

Order of work, each step failing with one clear line (BackendError -> exit 2):
  1. read model.plan.json and check it against this TensorRT version and GPU (runtime.trt_manifest)
     BEFORE TensorRT sees the plan: a mismatched plan otherwise dies in an opaque
     "Serialization assertion ... Version tag does not match" (NVIDIA/TensorRT #2072);
  2. check the plan's sha256 against the manifest (a sidecar from another build is a mismatch too);
  3. deserialize, create one execution context, look up the I/O tensors by name;
  4. allocate once, at the profile's max batch: pinned host input/output (cudaMallocHost, so
     the async copies really are async) and device input/output (cudaMalloc); one stream.
Per batch: split into chunks <= max batch; for each chunk copy into the pinned input,
set_input_shape, H2D copy, execute_async_v3, D2H copy, one stream synchronize.
Every cudart call returns (error, *values); each error is checked.

The TensorRT-free parts (batch splitting, buffer sizing, the manifest check, host views over
raw pointers, the cudart error check) are plain functions, tested without a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError
from runtime.trt_manifest import ManifestError, ManifestMismatch, TrtManifest, check_compatible, read_manifest

TRT_MISSING = ("TensorRT is not installed here (the `tensorrt` Python package); install it from NVIDIA's index "
               "(pip install tensorrt) or use JetPack's, or run the .onnx with ONNX Runtime instead")
CUDA_MISSING = "cuda-python is not installed (pip install cuda-python, the `gpu` extra); the TensorRT backend needs it"


def split_batches(n: int, max_batch: int) -> list[tuple[int, int]]:
    """[start, stop) chunks covering range(n), each at most max_batch long, in order."""
    if n < 0 or max_batch < 1:
        raise ValueError(f"need n >= 0 and max_batch >= 1, got {n}, {max_batch}")
    return [(a, min(a + max_batch, n)) for a in range(0, n, max_batch)]


def run_batch_size(n: int, min_batch: int) -> int:
    """The batch actually run for a chunk of n images: padded up to the profile's min batch."""
    return max(n, min_batch)


def buffer_nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of a dense tensor of `shape` and numpy `dtype`."""
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"shape {shape} has a dynamic (-1) dimension; use the profile's max shape")
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def io_shapes(manifest: TrtManifest) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """((max_batch, 3, S, S), (max_batch, C)): the shapes the buffers are allocated for."""
    s, c = manifest.image_size, manifest.contract.labels.num_classes
    return (manifest.max_batch, 3, s, s), (manifest.max_batch, c)


def check_plan(manifest: TrtManifest, plan: bytes, plan_path: str, trt_version: str, gpu_name: str, cc: str) -> None:
    """BackendError unless the manifest fits this TensorRT + GPU and describes exactly these plan bytes."""
    try:
        check_compatible(manifest, trt_version, gpu_name, cc)
    except (ManifestMismatch, ManifestError) as e:
        raise BackendError(f"{plan_path}: {e}") from None
    digest = hashlib.sha256(plan).hexdigest()
    if digest != manifest.plan_sha256:
        raise BackendError(f"{plan_path}: the plan's sha256 ({digest[:12]}...) is not the one its manifest records "
                           f"({manifest.plan_sha256[:12]}...): the sidecar belongs to another build")


def host_view(ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy array over `nbytes(shape, dtype)` bytes of host memory at address `ptr` (no copy)."""
    nbytes = buffer_nbytes(shape, dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
    return np.frombuffer(raw, dtype=np.uint8).view(np.dtype(dtype)).reshape(shape)


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python call's (error, *values); BackendError naming `what` on any error.

    Returns None, the single value, or a tuple of values.
    """
    result = result if isinstance(result, tuple) else (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise BackendError(f"CUDA {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def import_cuda() -> tuple[Any, Any]:
    """(tensorrt, cudart) or BackendError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(TRT_MISSING) from None
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart                   # older cuda-python
        except ImportError:
            raise BackendError(CUDA_MISSING) from None
    return trt, cudart


def gpu_identity(cudart: Any) -> tuple[str, str]:
    """(name, "major.minor") of the current CUDA device; BackendError when there is none."""
    dev = cuda_check(cudart, cudart.cudaGetDevice(), "cudaGetDevice (is there a GPU and a driver?)")
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0")[0].decode(errors="replace")
    return str(name), f"{prop.major}.{prop.minor}"


class TensorRTBackend(Backend):
    """One engine, one execution context, one stream, buffers sized for the profile's max batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._allocs: list[tuple[str, int]] = []   # ("host"|"device", ptr), freed in reverse
        self._stream = None
        trt, cudart = import_cuda()
        self._trt, self._cudart = trt, cudart
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            raise BackendError(str(e)) from None
        gpu_name, cc = gpu_identity(cudart)
        with open(path, "rb") as f:
            plan = f.read()
        check_plan(manifest, plan, self.path, trt.__version__, gpu_name, cc)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        del plan
        if self._engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the plan (see its log above)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{path}: could not create an execution context (out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        for want in (manifest.input_name, manifest.output_name):
            if want not in names:
                raise BackendError(f"{path}: the engine has no tensor {want!r} (it has {names})")
        self._in, self._out = manifest.input_name, manifest.output_name
        pmin, _, pmax = self._engine.get_tensor_profile_shape(self._in, 0)
        self.min_batch, self.max_batch = int(pmin[0]), int(pmax[0])
        if (self.min_batch, self.max_batch) != (manifest.min_batch, manifest.max_batch):
            raise BackendError(f"{path}: engine profile batch {self.min_batch}..{self.max_batch} differs from the "
                               f"manifest's {manifest.min_batch}..{manifest.max_batch}")
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._out)))
        self.input_dtype = self._in_dtype
        self.contract, self.precision = manifest.contract, manifest.precision
        self.name = f"tensorrt {trt.__version__} on {gpu_name}"
        try:
            self._allocate(manifest)
        except BaseException:
            self.close()          # free what was allocated before the failing call
            raise

    def _allocate(self, manifest: TrtManifest) -> None:
        """Pinned host + device buffers at max batch, one stream; addresses bound to the context once."""
        cudart = self._cudart
        in_shape, out_shape = io_shapes(manifest)
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        bufs = {}
        for key, shape, dtype in (("in", in_shape, self._in_dtype), ("out", out_shape, self._out_dtype)):
            nbytes = buffer_nbytes(shape, dtype)
            host = cuda_check(cudart, cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes)")
            self._allocs.append(("host", host))
            dev = cuda_check(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)")
            self._allocs.append(("device", dev))
            bufs[key] = (host_view(host, shape, dtype), int(dev))
        (self._h_in, self._d_in), (self._h_out, self._d_out) = bufs["in"], bufs["out"]
        for name, ptr in ((self._in, self._d_in), (self._out, self._d_out)):
            if not self._context.set_tensor_address(name, ptr):
                raise BackendError(f"{self.path}: set_tensor_address({name!r}) failed")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        cudart, ctx = self._cudart, self._context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        c = self.contract.labels.num_classes
        out = np.empty((batch.shape[0], c), dtype=np.float32)
        for a, b in split_batches(batch.shape[0], self.max_batch):
            n = b - a
            run = run_batch_size(n, self.min_batch)
            self._h_in[:n] = batch[a:b]          # casts to the engine's input dtype if it is not float32
            if run > n:
                self._h_in[n:run] = 0
            if not ctx.set_input_shape(self._in, (run,) + tuple(batch.shape[1:])):
                raise BackendError(f"{self.path}: set_input_shape({self._in!r}, batch {run}) rejected by the profile")
            out_shape = tuple(ctx.get_tensor_shape(self._out))
            if out_shape != (run, c):
                raise BackendError(f"{self.path}: engine output shape {out_shape}, expected ({run}, {c})")
            in_bytes = buffer_nbytes((run,) + self._h_in.shape[1:], self._in_dtype)
            out_bytes = buffer_nbytes((run, c), self._out_dtype)
            cuda_check(cudart, cudart.cudaMemcpyAsync(self._d_in, self._h_in.ctypes.data, in_bytes, h2d, self._stream),
                       "cudaMemcpyAsync host->device")
            if not ctx.execute_async_v3(int(self._stream)):
                raise BackendError(f"{self.path}: execute_async_v3 failed (see the TensorRT log above)")
            cuda_check(cudart, cudart.cudaMemcpyAsync(self._h_out.ctypes.data, self._d_out, out_bytes, d2h, self._stream),
                       "cudaMemcpyAsync device->host")
            cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            out[a:b] = self._h_out[:n]
        return out

    def close(self) -> None:
        """Free buffers, stream, context and engine (in reverse order of creation); idempotent."""
        cudart = getattr(self, "_cudart", None)
        self._h_in = self._h_out = None            # views over pinned memory must not outlive it
        if cudart is not None:
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for kind, ptr in reversed(self._allocs):
                cuda_check(cudart, cudart.cudaFreeHost(ptr) if kind == "host" else cudart.cudaFree(ptr),
                           "cudaFreeHost" if kind == "host" else "cudaFree")
            self._allocs = []
            if self._stream is not None:
                cuda_check(cudart, cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
                self._stream = None
        self._context = self._engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
