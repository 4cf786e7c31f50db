"""A strict double of cuda-python's runtime module (`cuda.bindings.runtime`), over host memory.

    python -m pytest -q tests/test_trt_cuda_python.py    # checks SIGNATURES against the real module

At least as strict as the real bindings where the TensorRT backend uses them:
  - each function takes exactly the parameters cuda-python 12.x/13.x declares (SIGNATURES, compared
    with inspect.signature of the installed module by tests/test_trt_cuda_python.py);
  - each returns a tuple whose first item is a cudaError_t (also for calls with no value);
  - streams and events are opaque objects (int() gives the handle), as cudaStream_t/cudaEvent_t;
  - "device" memory is host memory the double tracks: a copy touching memory outside a live
    allocation, or of the wrong kind for its direction, fails with cudaErrorInvalidValue;
  - work is ASYNCHRONOUS in the worst case: cudaMemcpyAsync / cudaMemsetAsync / execute_async_v3
    only queue; a stream runs its queue when it is synchronized, when an event recorded on it is
    synchronized or waited for by another stream. Code that reads a result before syncing, or
    rewrites a buffer a queued copy still reads, gets wrong numbers.
"""

from __future__ import annotations

import ctypes
import enum
import inspect
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

# Parameter names of the real functions (cuda-python 12.6 .. 13.x, inspect.signature).
SIGNATURES = {
    "cudaGetDeviceCount": (), "cudaGetDevice": (), "cudaGetDeviceProperties": ("device",),
    "cudaDriverGetVersion": (), "cudaRuntimeGetVersion": (), "cudaGetErrorName": ("error",),
    "cudaMalloc": ("size",), "cudaMallocHost": ("size",), "cudaFree": ("devPtr",), "cudaFreeHost": ("ptr",),
    "cudaMemcpyAsync": ("dst", "src", "count", "kind", "stream"), "cudaMemsetAsync": ("devPtr", "value", "count", "stream"),
    "cudaStreamCreateWithFlags": ("flags",), "cudaStreamDestroy": ("stream",), "cudaStreamSynchronize": ("stream",),
    "cudaStreamWaitEvent": ("stream", "event", "flags"), "cudaEventCreateWithFlags": ("flags",),
    "cudaEventRecord": ("event", "stream"), "cudaEventSynchronize": ("event",), "cudaEventDestroy": ("event",),
}


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class Handle:
    """cudaStream_t / cudaEvent_t stand-in: opaque, int() gives the handle."""

    __slots__ = ("kind", "h")

    def __init__(self, kind: str, h: int) -> None:
        self.kind, self.h = kind, h

    def __int__(self) -> int:
        return self.h

    __index__ = __int__

    def getPtr(self) -> int:
        return self.h


class Stream:
    def __init__(self) -> None:
        self.queue: list[tuple[str, Callable[[], None]]] = []


class FakeCudart:
    """The module object: attributes named as in cuda.bindings.runtime."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaEventDisableTiming = 2
    cudaStreamNonBlocking = 1

    def __init__(self, devices: int = 1, driver: int = 12060, name: bytes = b"NVIDIA Fake Orin", cc: tuple = (8, 7),
                 fail_malloc_after: int | None = None, error: cudaError_t | None = None) -> None:
        self.devices, self.driver, self.cc, self.name = devices, driver, cc, name
        self.error = error                 # every call fails with this (no driver, old driver, ...)
        self.fail_malloc_after = fail_malloc_after
        self.mem: dict[int, tuple[str, ctypes.Array]] = {}
        self.streams: dict[int, Stream] = {}
        self.events: dict[int, tuple[Stream, int] | None] = {}    # event -> (stream, queue length at record)
        self.log: list[tuple] = []
        self._next = 0x1000
        self.mallocs = 0
        for fn, params in SIGNATURES.items():
            impl = getattr(self, "_" + fn)
            setattr(self, fn, self._checked(fn, params, impl))

    def _checked(self, fn: str, params: tuple, impl: Callable) -> Callable:
        sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params])

        def call(*args: Any, **kwargs: Any) -> tuple:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{fn}(): {e}") from None
            if self.error is not None and fn not in ("cudaGetErrorName", "cudaRuntimeGetVersion",
                                                                "cudaDriverGetVersion"):
                return (self.error,) + ((None,) if fn not in _NO_VALUE else ())
            out = impl(*bound.args)
            return out if isinstance(out, tuple) else (out,)
        return call

    # ---------------------------------------------------------------- device and versions
    def _cudaGetDeviceCount(self):
        return cudaError_t.cudaSuccess, self.devices

    def _cudaGetDevice(self):
        return (cudaError_t.cudaSuccess, 0) if self.devices else (cudaError_t.cudaErrorNoDevice, None)

    def _cudaGetDeviceProperties(self, device):
        if not isinstance(device, int) or not 0 <= device < self.devices:
            return cudaError_t.cudaErrorInvalidValue, None
        # name: bytes padded with NULs (cudaDeviceProp.name is char[256] in cuda-python)
        return cudaError_t.cudaSuccess, SimpleNamespace(name=self.name + b"\0" * (256 - len(self.name)),
                                                        major=self.cc[0], minor=self.cc[1])

    def _cudaDriverGetVersion(self):
        return cudaError_t.cudaSuccess, self.driver

    def _cudaRuntimeGetVersion(self):
        return cudaError_t.cudaSuccess, 13000

    def _cudaGetErrorName(self, error):
        if not isinstance(error, cudaError_t):
            raise TypeError(f"Argument 'error' is not instance of type (expected <class 'cudaError_t'>, found {type(error)})")
        return cudaError_t.cudaSuccess, error.name.encode()

    # ---------------------------------------------------------------- memory
    def _alloc(self, kind: str, size: int):
        if not isinstance(size, int) or size <= 0:
            return cudaError_t.cudaErrorInvalidValue, None
        self.mallocs += 1
        if self.fail_malloc_after is not None and self.mallocs > self.fail_malloc_after:
            return cudaError_t.cudaErrorMemoryAllocation, None
        buf = (ctypes.c_uint8 * size)()
        ptr = ctypes.addressof(buf)
        self.mem[ptr] = (kind, buf)
        return cudaError_t.cudaSuccess, ptr

    def _cudaMalloc(self, size):
        return self._alloc("device", size)

    def _cudaMallocHost(self, size):
        return self._alloc("host", size)

    def _free(self, kind: str, ptr: Any):
        if self.mem.get(int(ptr), ("",))[0] != kind:
            return cudaError_t.cudaErrorInvalidValue
        self._drain_all()                      # cudaFree synchronizes the device
        del self.mem[int(ptr)]
        return cudaError_t.cudaSuccess

    def _cudaFree(self, devPtr):
        return self._free("device", devPtr)

    def _cudaFreeHost(self, ptr):
        return self._free("host", ptr)

    def inside(self, ptr: int, n: int, kind: str) -> bool:
        """[ptr, ptr + n) lies in one live allocation of `kind`."""
        return any(k == kind and base <= ptr and ptr + n <= base + len(buf) for base, (k, buf) in self.mem.items())

    def view(self, ptr: int, shape: tuple, dtype: Any) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert self.inside(ptr, n, "device"), "engine I/O address is not device memory"
        return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), dtype=np.uint8).view(dtype).reshape(shape)

    # ---------------------------------------------------------------- streams, events, async work
    def _handle(self, kind: str) -> Handle:
        self._next += 16
        return Handle(kind, self._next)

    def _stream(self, s: Any) -> Stream | None:
        return self.streams.get(int(s)) if isinstance(s, Handle) or isinstance(s, int) else None

    def _cudaStreamCreateWithFlags(self, flags):
        h = self._handle("stream")
        self.streams[int(h)] = Stream()
        return cudaError_t.cudaSuccess, h

    def _cudaStreamDestroy(self, stream):
        st = self._stream(stream)
        if st is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        self._drain(st)
        del self.streams[int(stream)]
        return cudaError_t.cudaSuccess

    def enqueue(self, stream: Any, fn: Callable[[], None], what: str) -> None:
        st = self._stream(stream)
        assert st is not None, f"{what} on an unknown stream {stream!r}"
        st.queue.append((what, fn))

    def _drain(self, st: Stream, upto: int | None = None) -> None:
        n = len(st.queue) if upto is None else upto
        for _ in range(n):
            what, fn = st.queue.pop(0)
            fn()
            self.log.append(("ran", what))
        # events recorded on this stream now point at fewer pending items
        for e, rec in self.events.items():
            if rec is not None and rec[0] is st:
                self.events[e] = (st, max(0, rec[1] - n))

    def _drain_all(self) -> None:
        for st in list(self.streams.values()):
            self._drain(st)

    def _cudaStreamSynchronize(self, stream):
        st = self._stream(stream)
        if st is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        self._drain(st)
        self.log.append(("sync stream",))
        return cudaError_t.cudaSuccess

    def _cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if not isinstance(kind, cudaMemcpyKind):
            raise TypeError(f"Argument 'kind' is not instance of type cudaMemcpyKind, found {type(kind)}")
        h2d = kind == cudaMemcpyKind.cudaMemcpyHostToDevice
        dst, src = int(dst), int(src)
        if not (self.inside(src, count, "host" if h2d else "device") and self.inside(dst, count, "device" if h2d else "host")):
            return cudaError_t.cudaErrorInvalidValue
        if self._stream(stream) is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, count), "H2D" if h2d else "D2H")
        self.log.append(("memcpy", "H2D" if h2d else "D2H", count, int(stream), src, dst))
        return cudaError_t.cudaSuccess

    def _cudaMemsetAsync(self, devPtr, value, count, stream):
        ptr = int(devPtr)
        if not self.inside(ptr, count, "device") or self._stream(stream) is None:
            return cudaError_t.cudaErrorInvalidValue
        self.enqueue(stream, lambda: ctypes.memset(ptr, value, count), "memset")
        self.log.append(("memset", count, int(stream)))
        return cudaError_t.cudaSuccess

    def _cudaEventCreateWithFlags(self, flags):
        h = self._handle("event")
        self.events[int(h)] = None
        return cudaError_t.cudaSuccess, h

    def _cudaEventDestroy(self, event):
        if not isinstance(event, Handle) or self.events.pop(int(event), 0) == 0:
            return cudaError_t.cudaErrorInvalidResourceHandle
        return cudaError_t.cudaSuccess

    def _cudaEventRecord(self, event, stream):
        st = self._stream(stream)
        if not isinstance(event, Handle) or int(event) not in self.events or st is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        self.events[int(event)] = (st, len(st.queue))
        return cudaError_t.cudaSuccess

    def _complete(self, event: Handle) -> None:
        rec = self.events[int(event)]
        if rec is not None:
            self._drain(rec[0], rec[1])

    def _cudaEventSynchronize(self, event):
        if not isinstance(event, Handle) or int(event) not in self.events:
            return cudaError_t.cudaErrorInvalidResourceHandle
        self._complete(event)
        return cudaError_t.cudaSuccess

    def _cudaStreamWaitEvent(self, stream, event, flags):
        # Worst case that is still correct: the waited-for work runs now, before anything queued after.
        if self._stream(stream) is None or not isinstance(event, Handle) or int(event) not in self.events:
            return cudaError_t.cudaErrorInvalidResourceHandle
        st, target = self._stream(stream), self.events[int(event)]
        if target is not None and target[0] is not st:
            self.enqueue(stream, lambda ev=event, rec=target: self._drain(rec[0], min(rec[1], len(rec[0].queue))),
                         "wait event")
        return cudaError_t.cudaSuccess


_NO_VALUE = {"cudaFree", "cudaFreeHost", "cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamDestroy",
             "cudaStreamSynchronize", "cudaStreamWaitEvent", "cudaEventRecord", "cudaEventSynchronize",
             "cudaEventDestroy"}


def install(monkeypatch: Any, cudart: FakeCudart) -> FakeCudart:
    """Make `from cuda.bindings import runtime` give `cudart` for the test's duration."""
    import sys
    import types

    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    bindings.__version__ = "12.9.0"
    for name, m in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, m)
    return cudart
