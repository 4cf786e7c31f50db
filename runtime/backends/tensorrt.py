"""TensorRT backend: a serialized plan + its sidecar manifest, run with cuda-python's runtime API.

    python -m runtime.infer --model model.plan --images DIR --output preds.jsonl   # opens this backend

Order of work, each step failing with one clear line (BackendError -> exit 2):
  1. read model.plan.json and check it against this TensorRT version, GPU and platform
     (runtime.trt_manifest) BEFORE TensorRT sees the plan: a mismatched plan otherwise dies in an
     opaque "Serialization assertion ... Version tag does not match" (NVIDIA/TensorRT #2072);
  2. check the plan's sha256 against the manifest (a sidecar from another build is a mismatch too);
  3. deserialize (a version-compatible plan needs Runtime.engine_host_code_allowed, as Polygraphy
     and trtexec set it), one execution context, the I/O tensors by name and their dtypes;
  4. allocate once, at the profile's max batch: two device input buffers (slots), one device
     output, two pinned host output slots; a copy stream, a compute stream, two events per slot.
Per batch (`submit`; N > max batch is split into chunks, each its own slot):
    copy stream:    H2D input -> slot's device input, zero the pad rows up to the profile's min batch,
                    record `copied[slot]`
    compute stream: wait `copied[slot]`, set_input_shape, set_tensor_address(input, slot),
                    execute_async_v3, D2H output -> slot's pinned output, record `done[slot]`
so the H2D of batch k+1 overlaps the compute of batch k; `wait()` synchronizes `done[slot]` only.
A batch that is a view of a buffer from `allocate_inputs` (pinned, cudaMallocHost) is copied to the
device straight from it; any other array goes through a pinned staging buffer first. A slot is
reused only after its previous batch was collected, so at most two batches are in flight.
Every cudart call returns (error, *values); each error is checked (cuda_check).
NOTE: this has run against strict doubles of TensorRT 10.3 / 10.13.3 / 11.1 and of cuda-python
(tests/test_trt_*.py), and its cudart calls against the real cuda-python without a GPU; never
against a real engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
from typing import Any

import numpy as np

from runtime.backends.base import Backend, BackendError, Pending
from runtime.trt_manifest import (ManifestError, ManifestMismatch, TrtManifest, check_compatible, read_manifest,
                                  this_platform)

TRT_MISSING = ("TensorRT is not installed here (the `tensorrt` Python package); install it from NVIDIA's index "
               "(pip install tensorrt) or use JetPack's, or run the .onnx with ONNX Runtime instead")
CUDA_MISSING = ("cuda-python is not installed: pip install 'probres[gpu-cu12]' (CUDA 12 drivers, JetPack 6) or "
                "'probres[gpu-cu13]' (CUDA 13 drivers, 580+); the TensorRT backend needs it")
OLD_DRIVER = ("the NVIDIA driver (CUDA {driver}) is older than cuda-python {cp} needs (cudaErrorInsufficientDriver): "
              "install the cuda-python of the driver's CUDA major, pip install 'cuda-python>={major}.0,<{next}' "
              "(the gpu-cu{major} extra)")
SLOTS = 2                      # batches in flight: transfer of k+1 overlaps compute of k


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


def check_plan(manifest: TrtManifest, plan: bytes, plan_path: str, trt_version: str, gpu_name: str, cc: str,
               platform_here: tuple[str, str] | None = None) -> None:
    """BackendError unless the manifest fits this TensorRT + GPU + platform and describes exactly these bytes."""
    try:
        check_compatible(manifest, trt_version, gpu_name, cc, platform_here)
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


def error_name(cudart: Any, err: Any) -> str:
    """'cudaErrorNoDevice' for a cudaError_t (cudaGetErrorName returns (err, bytes))."""
    try:
        name = cudart.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python call's (error, *values); BackendError naming `what` on any error.

    Returns None, the single value, or a tuple of values.
    """
    result = result if isinstance(result, tuple) else (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA {what} failed: {error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def import_cudart() -> Any:
    """cuda-python's runtime module; BackendError saying what to install."""
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6 (NVIDIA samples, 10.16 / 11.1)
    except ImportError:
        try:
            from cuda import cudart                   # older cuda-python
        except ImportError:
            raise BackendError(CUDA_MISSING) from None
    return cudart


def import_cuda() -> tuple[Any, Any]:
    """(tensorrt, cudart) or BackendError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(TRT_MISSING) from None
    return trt, import_cudart()


def cuda_python_version() -> str:
    """The installed cuda-python bindings' version ("12.9.0"), or "" when it does not say."""
    for mod in ("cuda.bindings", "cuda"):
        try:
            v = getattr(importlib.import_module(mod), "__version__", "")
        except ImportError:
            continue
        if v:
            return str(v)
    return ""


def driver_cuda_version(cudart: Any) -> str:
    """The driver's CUDA version, "12.6" (cudaDriverGetVersion: 1000*major + 10*minor; 0 = no driver)."""
    v = cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def gpu_identity(cudart: Any) -> tuple[str, str]:
    """(name, "major.minor") of the current CUDA device; BackendError when there is none.

    cudaErrorInsufficientDriver (cuda-python 13 on a CUDA 12 driver, e.g. JetPack 6) gets its own message.
    """
    result = cudart.cudaGetDevice()
    if result[0] == cudart.cudaError_t.cudaErrorInsufficientDriver:
        driver = driver_cuda_version(cudart)
        if driver == "none":
            raise BackendError("CUDA cudaGetDevice failed: cudaErrorInsufficientDriver with no NVIDIA driver loaded "
                               "(cudaDriverGetVersion gives 0): is there a GPU and a driver?")
        want = int(driver.split(".")[0])
        raise BackendError(OLD_DRIVER.format(driver=driver, cp=cuda_python_version() or "?", major=want, next=want + 1))
    dev = cuda_check(cudart, result, "cudaGetDevice (is there a GPU and a driver?)")
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    name = prop.name                                  # bytes, NUL-padded (char[256]) in cuda-python
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0")[0].decode(errors="replace")
    return str(name), f"{prop.major}.{prop.minor}"


def tensor_nptype(trt: Any, engine: Any, name: str, where: str) -> np.dtype:
    """numpy dtype of an engine tensor; BackendError for types numpy lacks (BF16, FP8, FP4: trt.nptype raises)."""
    dt = engine.get_tensor_dtype(name)
    try:
        return np.dtype(trt.nptype(dt))
    except TypeError:
        raise BackendError(f"{where}: engine tensor {name!r} is {dt}, which has no numpy type; "
                           f"export with float32 or float16 I/O") from None


class _Chunk:
    """One enqueued chunk: its slot and row count; `collect` syncs its event and copies its rows out."""

    def __init__(self, backend: "TensorRTBackend", slot: int, n: int) -> None:
        self.backend, self.slot, self.n, self.probs = backend, slot, n, None

    def collect(self) -> np.ndarray:
        if self.probs is None:
            be = self.backend
            cuda_check(be._cudart, be._cudart.cudaEventSynchronize(be._done[self.slot]), "cudaEventSynchronize")
            self.probs = np.array(be._h_out[self.slot][:self.n], dtype=np.float32)   # a copy: the slot is reused
            if be._slot_owner[self.slot] is self:
                be._slot_owner[self.slot] = None
        return self.probs


class _TrtPending(Pending):
    def __init__(self, chunks: list[_Chunk]) -> None:
        self._chunks = chunks

    def wait(self) -> np.ndarray:
        parts = [c.collect() for c in self._chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TensorRTBackend(Backend):
    """One engine, one execution context, a copy and a compute stream, buffers sized for the profile's max batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._allocs: list[tuple[str, int]] = []   # ("host"|"device", ptr), freed in reverse
        self._handles: list[tuple[str, Any]] = []  # ("stream"|"event", handle), destroyed in reverse
        self._h_out: list[np.ndarray] = []
        trt, cudart = import_cuda()
        self._trt, self._cudart = trt, cudart
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            raise BackendError(str(e)) from None
        gpu_name, cc = gpu_identity(cudart)
        with open(path, "rb") as f:
            plan = f.read()
        check_plan(manifest, plan, self.path, trt.__version__, gpu_name, cc, this_platform())

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if manifest.version_compatible:
            # The plan embeds its lean runtime; IRuntime runs that host code only when allowed
            # (setEngineHostCodeAllowed, "Version Compatibility", TensorRT 10.x docs; Polygraphy and trtexec set it).
            self._runtime.engine_host_code_allowed = True
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
        self._in_dtype = tensor_nptype(trt, self._engine, self._in, self.path)
        self._out_dtype = tensor_nptype(trt, self._engine, self._out, self.path)
        self.input_dtype = self._in_dtype          # FP16-input engines get FP16 batches: no host cast
        self.contract, self.precision = manifest.contract, manifest.precision
        self.val_metrics = manifest.val_metrics or None
        self.name = f"tensorrt {trt.__version__} on {gpu_name}"
        try:
            self._allocate(manifest)
        except BaseException:
            self.close()          # free what was allocated before the failing call
            raise

    # ------------------------------------------------------------------------------------ resources

    def _malloc(self, kind: str, nbytes: int) -> int:
        cudart = self._cudart
        fn = "cudaMallocHost" if kind == "host" else "cudaMalloc"
        ptr = int(cuda_check(cudart, getattr(cudart, fn)(nbytes), f"{fn}({nbytes} bytes)"))
        self._allocs.append((kind, ptr))
        return ptr

    def _handle(self, kind: str) -> Any:
        cudart = self._cudart
        if kind == "stream":
            h = cuda_check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        else:
            h = cuda_check(cudart, cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreate")
        self._handles.append((kind, h))
        return h

    def _allocate(self, manifest: TrtManifest) -> None:
        """Device inputs per slot, one device output, pinned host outputs per slot, two streams, events."""
        in_shape, out_shape = io_shapes(manifest)
        self._row_bytes = buffer_nbytes(in_shape[1:], self._in_dtype)     # one (3, S, S) image
        self._copy_stream, self._compute_stream = self._handle("stream"), self._handle("stream")
        self._d_in = [self._malloc("device", buffer_nbytes(in_shape, self._in_dtype)) for _ in range(SLOTS)]
        self._d_out = self._malloc("device", buffer_nbytes(out_shape, self._out_dtype))
        self._h_out = [host_view(self._malloc("host", buffer_nbytes(out_shape, self._out_dtype)), out_shape,
                                 self._out_dtype) for _ in range(SLOTS)]
        self._staging: list[np.ndarray | None] = [None] * SLOTS          # pinned, made on first foreign batch
        self._copied = [self._handle("event") for _ in range(SLOTS)]
        self._done = [self._handle("event") for _ in range(SLOTS)]
        self._slot_owner: list[_Chunk | None] = [None] * SLOTS
        self._next_slot = 0
        if not self._context.set_tensor_address(self._out, self._d_out):
            raise BackendError(f"{self.path}: set_tensor_address({self._out!r}) failed")

    def _alloc_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Pinned host memory (cudaMallocHost) so the H2D copy straight from it is truly asynchronous."""
        return host_view(self._malloc("host", buffer_nbytes(shape, dtype)), shape, dtype)

    # ------------------------------------------------------------------------------------ inference

    def _submit(self, batch: np.ndarray) -> Pending:
        return _TrtPending([self._enqueue(batch[a:b]) for a, b in split_batches(batch.shape[0], self.max_batch)])

    def _enqueue(self, chunk: np.ndarray) -> _Chunk:
        """Queue one chunk (n <= max batch) on the next slot; returns its _Chunk."""
        cudart, ctx = self._cudart, self._context
        slot = self._next_slot
        self._next_slot = (slot + 1) % SLOTS
        if self._slot_owner[slot] is not None:
            self._slot_owner[slot].collect()      # a third batch in flight: finish the one using this slot
        n, c = chunk.shape[0], self.contract.labels.num_classes
        run = run_batch_size(n, self.min_batch)
        if self.owns(chunk) and chunk.flags.c_contiguous:
            src = chunk.ctypes.data                # pinned buffer from allocate_inputs: H2D straight from it
        else:
            if self._staging[slot] is None:
                self._staging[slot] = self._alloc_host((self.max_batch,) + chunk.shape[1:], self._in_dtype)
            self._staging[slot][:n] = chunk        # safe: this slot's previous H2D finished (collected above)
            src = self._staging[slot].ctypes.data
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cp, cs = self._copy_stream, self._compute_stream
        cuda_check(cudart, cudart.cudaMemcpyAsync(self._d_in[slot], src, n * self._row_bytes, h2d, cp),
                   "cudaMemcpyAsync host->device")
        if run > n:                                # rows up to the profile's min batch: zeros, results dropped
            cuda_check(cudart, cudart.cudaMemsetAsync(self._d_in[slot] + n * self._row_bytes, 0,
                                                      (run - n) * self._row_bytes, cp), "cudaMemsetAsync")
        cuda_check(cudart, cudart.cudaEventRecord(self._copied[slot], cp), "cudaEventRecord")
        cuda_check(cudart, cudart.cudaStreamWaitEvent(cs, self._copied[slot], 0), "cudaStreamWaitEvent")
        if not ctx.set_input_shape(self._in, (run,) + tuple(chunk.shape[1:])):
            raise BackendError(f"{self.path}: set_input_shape({self._in!r}, batch {run}) rejected by the profile")
        out_shape = tuple(ctx.get_tensor_shape(self._out))
        if out_shape != (run, c):
            raise BackendError(f"{self.path}: engine output shape {out_shape}, expected ({run}, {c})")
        if not ctx.set_tensor_address(self._in, self._d_in[slot]):
            raise BackendError(f"{self.path}: set_tensor_address({self._in!r}) failed")
        if not ctx.execute_async_v3(int(cs)):
            raise BackendError(f"{self.path}: execute_async_v3 failed (see the TensorRT log above)")
        cuda_check(cudart, cudart.cudaMemcpyAsync(self._h_out[slot].ctypes.data, self._d_out,
                                                  buffer_nbytes((n, c), self._out_dtype), d2h, cs),
                   "cudaMemcpyAsync device->host")
        cuda_check(cudart, cudart.cudaEventRecord(self._done[slot], cs), "cudaEventRecord")
        item = self._slot_owner[slot] = _Chunk(self, slot, n)
        return item

    # ------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Sync, then free buffers, events, streams, context and engine (reverse order of creation); idempotent."""
        cudart = getattr(self, "_cudart", None)
        self._h_out, self._staging, self._owned_inputs = [], [], []   # views over pinned memory must not outlive it
        if cudart is not None:
            for kind, h in self._handles:
                if kind == "stream":
                    cudart.cudaStreamSynchronize(h)
            for kind, ptr in reversed(self._allocs):
                cuda_check(cudart, cudart.cudaFreeHost(ptr) if kind == "host" else cudart.cudaFree(ptr),
                           "cudaFreeHost" if kind == "host" else "cudaFree")
            self._allocs = []
            for kind, h in reversed(self._handles):
                destroy = cudart.cudaStreamDestroy if kind == "stream" else cudart.cudaEventDestroy
                cuda_check(cudart, destroy(h), f"cuda{kind.capitalize()}Destroy")
            self._handles = []
        self._context = self._engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
