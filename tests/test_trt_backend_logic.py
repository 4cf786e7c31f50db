"""The TensorRT backend's TensorRT-free logic, tested without a GPU.

    .venv/bin/python -m pytest -q tests/test_trt_backend_logic.py

Plain functions (batch splitting, buffer sizing, the manifest/sha check, host views, the
cudart error check) are tested directly. The backend class is then driven end to end with a
FAKE tensorrt module and a FAKE cudart (device memory simulated in host memory), which checks
the order of work (manifest before deserializing), the chunking at the profile's max batch,
the padding to its min batch, the copy sizes, one synchronize per chunk and that every
allocation is freed. None of this runs TensorRT or CUDA: the real path is only exercised by
the GPU test at the end, skipped here.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.backends import BackendError, open_backend
from runtime.backends import tensorrt as trtmod
from runtime.backends.tensorrt import (buffer_nbytes, check_plan, cuda_check, host_view, io_shapes, run_batch_size,
                                       split_batches)
from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.trt_manifest import TrtManifest, write_manifest

S, C = 16, 5
CONTRACT = ModelContract(LabelSet.from_categories([(1, "a"), (3, "b"), (6, "c"), (13, "d"), (18, "e")]),
                         PreprocessSpec(size=S))


def make_manifest(plan: bytes, **kw) -> TrtManifest:
    args = dict(tensorrt_version="10.13.3.9", gpu_name="Fake GPU", compute_capability="8.7", cuda_version="12.9",
                precision="fp16", input_name="images", output_name="probs", min_batch=1, opt_batch=4, max_batch=4,
                image_size=S, onnx_sha256="0" * 64, plan_sha256=hashlib.sha256(plan).hexdigest(), contract=CONTRACT)
    args.update(kw)
    return TrtManifest(**args)


# ------------------------------------------------------------------------------------ plain functions

@pytest.mark.parametrize("n,m", [(0, 4), (1, 4), (4, 4), (5, 4), (10, 4), (9, 3), (7, 1)])
def test_split_batches_cover_in_order(n, m):
    chunks = split_batches(n, m)
    assert [i for a, b in chunks for i in range(a, b)] == list(range(n))
    assert all(0 < b - a <= m for a, b in chunks)
    assert len(chunks) == -(-n // m)


def test_split_batches_rejects_bad_args():
    with pytest.raises(ValueError):
        split_batches(3, 0)


def test_run_batch_size_pads_to_profile_min():
    assert [run_batch_size(n, 2) for n in (1, 2, 3)] == [2, 2, 3]


def test_buffer_nbytes_and_io_shapes():
    assert buffer_nbytes((8, 3, 448, 448), np.float32) == 8 * 3 * 448 * 448 * 4
    assert buffer_nbytes((8, 80), np.float16) == 8 * 80 * 2
    with pytest.raises(ValueError):
        buffer_nbytes((-1, 3, 448, 448), np.float32)
    m = make_manifest(b"x", max_batch=6, opt_batch=4)
    assert io_shapes(m) == ((6, 3, S, S), (6, C))


def test_check_plan_accepts_match_and_names_each_mismatch():
    plan = b"plan bytes"
    m = make_manifest(plan)
    check_plan(m, plan, "m.plan", "10.13.3.9", "Fake GPU", "8.7")
    with pytest.raises(BackendError, match=r"m.plan: .*TensorRT 10.13.3.9.*TensorRT 10.12.0.36"):
        check_plan(m, plan, "m.plan", "10.12.0.36", "Fake GPU", "8.7")
    with pytest.raises(BackendError, match=r"compute capability 8.7.*compute capability 9.0"):
        check_plan(m, plan, "m.plan", "10.13.3.9", "NVIDIA H100", "9.0")
    with pytest.raises(BackendError, match="sha256"):
        check_plan(m, b"another plan", "m.plan", "10.13.3.9", "Fake GPU", "8.7")


def test_host_view_aliases_the_memory():
    raw = (ctypes.c_uint8 * (2 * 3 * 2))()
    v = host_view(ctypes.addressof(raw), (2, 3), np.float16)
    v[:] = np.arange(6, dtype=np.float16).reshape(2, 3)
    assert np.frombuffer(bytes(raw), dtype=np.float16).tolist() == [0, 1, 2, 3, 4, 5]
    assert v.ctypes.data == ctypes.addressof(raw)


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


def test_cuda_check_unpacks_and_raises():
    fake = SimpleNamespace(cudaError_t=Err, cudaGetErrorName=lambda e: (Err.cudaSuccess, e.name.encode()))
    assert cuda_check(fake, (Err.cudaSuccess,), "x") is None
    assert cuda_check(fake, (Err.cudaSuccess, 7), "x") == 7
    assert cuda_check(fake, (Err.cudaSuccess, 7, 8), "x") == (7, 8)
    with pytest.raises(BackendError, match=r"CUDA cudaMalloc\(64 bytes\) failed: cudaErrorMemoryAllocation"):
        cuda_check(fake, (Err.cudaErrorMemoryAllocation, 0), "cudaMalloc(64 bytes)")


# ------------------------------------------------------------------------------------ fakes

class FakeCudart:
    """cudart's calling convention ((err, *values)) over host memory standing in for the GPU."""

    cudaError_t = Err
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self, fail_malloc_after: int | None = None, no_device: bool = False):
        self.mem: dict[int, tuple[str, ctypes.Array]] = {}
        self.copies: list[tuple[int, int]] = []     # (kind, nbytes)
        self.syncs = 0
        self.mallocs = 0
        self.fail_malloc_after, self.no_device = fail_malloc_after, no_device
        self.streams = 0

    def _alloc(self, kind, n):
        buf = (ctypes.c_uint8 * n)()
        self.mem[ctypes.addressof(buf)] = (kind, buf)
        return ctypes.addressof(buf)

    def _inside(self, ptr, n, kind):
        return any(k == kind and base <= ptr and ptr + n <= base + len(buf) for base, (k, buf) in self.mem.items())

    def cudaGetErrorName(self, e):
        return Err.cudaSuccess, e.name.encode()

    def cudaGetDevice(self):
        return (Err.cudaErrorNoDevice, 0) if self.no_device else (Err.cudaSuccess, 0)

    def cudaGetDeviceProperties(self, dev):
        return Err.cudaSuccess, SimpleNamespace(name=b"Fake GPU\0\0\0", major=8, minor=7)

    def cudaStreamCreate(self):
        self.streams += 1
        return Err.cudaSuccess, 4242

    def cudaStreamDestroy(self, s):
        self.streams -= 1
        return (Err.cudaSuccess,)

    def cudaMallocHost(self, n):
        return Err.cudaSuccess, self._alloc("host", n)

    def cudaMalloc(self, n):
        self.mallocs += 1
        if self.fail_malloc_after is not None and self.mallocs > self.fail_malloc_after:
            return Err.cudaErrorMemoryAllocation, 0
        return Err.cudaSuccess, self._alloc("device", n)

    def cudaFreeHost(self, p):
        return (Err.cudaSuccess,) if self.mem.pop(p, ("",))[0] == "host" else (Err.cudaErrorMemoryAllocation,)

    def cudaFree(self, p):
        return (Err.cudaSuccess,) if self.mem.pop(p, ("",))[0] == "device" else (Err.cudaErrorMemoryAllocation,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        h2d = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert stream == 4242
        assert self._inside(src, n, "host" if h2d else "device") and self._inside(dst, n, "device" if h2d else "host")
        ctypes.memmove(dst, src, n)
        self.copies.append((kind, n))
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        self.syncs += 1
        return (Err.cudaSuccess,)


def reference_probs(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: (N, 3, S, S) -> (N, C) sigmoid(channel mean + 0.1 k)."""
    m = x.reshape(len(x), 3, -1).mean(axis=2)                      # (N, 3)
    logits = m[:, [k % 3 for k in range(C)]] + 0.1 * np.arange(C)   # (N, C)
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.addr, self.shape, self.runs = engine, {}, None, []

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if not lo[0] <= shape[0] <= hi[0]:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], C) if name == "probs" else self.shape

    def execute_async_v3(self, stream):
        assert stream == 4242
        n = self.shape[0]
        x = host_view(self.addr["images"], self.shape, np.float32)
        host_view(self.addr["probs"], (n, C), np.float32)[:] = reference_probs(x)
        self.runs.append(n)
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, min_b, max_b):
        self.profile = ((min_b, 3, S, S), (max_b, 3, S, S), (max_b, 3, S, S))
        self.context = FakeContext(self)

    def get_tensor_name(self, i):
        return ("images", "probs")[i]

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_profile_shape(self, name, profile):
        return self.profile

    def create_execution_context(self):
        return self.context


def fake_trt(min_b=1, max_b=4):
    state = SimpleNamespace(deserialized=0, engine=FakeEngine(min_b, max_b))

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            state.deserialized += 1
            return state.engine

    mod = SimpleNamespace(__version__="10.13.3.9", Runtime=Runtime, nptype=lambda t: t)
    mod.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return mod, state


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(b"not really a plan")
    return path


def load(monkeypatch, plan, cudart, trt, **manifest_kw):
    write_manifest(plan, make_manifest(plan.read_bytes(), **manifest_kw))
    monkeypatch.setattr(trtmod, "import_cuda", lambda: (trt, cudart))
    return trtmod.TensorRTBackend(plan)


# ------------------------------------------------------------------------------------ backend on fakes

def test_fake_engine_chunks_copies_and_frees(monkeypatch, plan):
    cudart, (trt, state) = FakeCudart(), fake_trt(1, 4)
    be = load(monkeypatch, plan, cudart, trt)
    assert be.max_batch == 4 and be.contract == CONTRACT and be.precision == "fp16"
    x = np.random.default_rng(0).normal(size=(10, 3, S, S)).astype(np.float32)
    out = be.infer(x)
    np.testing.assert_allclose(out, reference_probs(x), rtol=0, atol=1e-6)
    assert state.engine.context.runs == [4, 4, 2]
    assert cudart.syncs == 3
    img = 3 * S * S * 4
    assert cudart.copies == [(1, 4 * img), (2, 4 * C * 4), (1, 4 * img), (2, 4 * C * 4), (1, 2 * img), (2, 2 * C * 4)]
    be.close()
    be.close()
    assert cudart.mem == {} and cudart.streams == 0


def test_fake_engine_pads_to_min_batch(monkeypatch, plan):
    cudart, (trt, state) = FakeCudart(), fake_trt(2, 4)
    be = load(monkeypatch, plan, cudart, trt, min_batch=2, opt_batch=4)
    x = np.random.default_rng(1).normal(size=(5, 3, S, S)).astype(np.float32)
    np.testing.assert_allclose(be.infer(x), reference_probs(x), atol=1e-6)
    assert state.engine.context.runs == [4, 2]
    be.close()


def test_manifest_mismatch_refused_before_deserializing(monkeypatch, plan):
    cudart, (trt, state) = FakeCudart(), fake_trt()
    with pytest.raises(BackendError, match=r"model.plan: engine built by TensorRT 10.12.0.36, this is TensorRT 10.13.3.9"):
        load(monkeypatch, plan, cudart, trt, tensorrt_version="10.12.0.36")
    assert state.deserialized == 0 and cudart.mem == {}


def test_missing_manifest_and_no_gpu(monkeypatch, plan):
    monkeypatch.setattr(trtmod, "import_cuda", lambda: (fake_trt()[0], FakeCudart()))
    with pytest.raises(BackendError, match="no TensorRT manifest"):
        trtmod.TensorRTBackend(plan)
    with pytest.raises(BackendError, match="cudaGetDevice.*cudaErrorNoDevice"):
        load(monkeypatch, plan, FakeCudart(no_device=True), fake_trt()[0])


def test_failed_allocation_frees_the_rest(monkeypatch, plan):
    cudart = FakeCudart(fail_malloc_after=1)
    with pytest.raises(BackendError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        load(monkeypatch, plan, cudart, fake_trt()[0])
    assert cudart.mem == {} and cudart.streams == 0


def test_plan_without_tensorrt_is_a_clear_error(plan):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; this checks the message on machines without it")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        open_backend(plan)
    with pytest.raises(BackendError, match="GPU only"):
        open_backend(plan, device="cpu")


# ------------------------------------------------------------------------------------ the real thing

def _have_gpu_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
        trtmod.import_cuda()
        trtmod.gpu_identity(trtmod.import_cuda()[1])
    except (ImportError, BackendError) as e:
        return f"needs tensorrt + cuda-python + a CUDA GPU ({e})"
    return None


@pytest.mark.skipif(_have_gpu_tensorrt() is not None, reason=str(_have_gpu_tensorrt()))
def test_real_tensorrt_matches_onnxruntime(tmp_path):
    """On a GPU machine: build a tiny FP32 engine, run it through the backend, compare with ORT CPU."""
    import onnx
    import tensorrt as trt
    from onnx import TensorProto, helper

    from runtime.backends.onnxrt import OnnxRuntimeBackend

    # (N,3,S,S) -> GAP -> (N,3) -> MatMul W (3,C) -> sigmoid -> probs (N,C)
    w = np.random.default_rng(0).normal(size=(3, C)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["l"]), helper.make_node("Sigmoid", ["l"], ["probs"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, S, S])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", C])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="probres.contract", value=CONTRACT.to_json())
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(m, onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, S, S), (4, 3, S, S), (4, 3, S, S))
    config.add_optimization_profile(profile)
    plan = bytes(builder.build_serialized_network(network, config))
    plan_path = tmp_path / "tiny.plan"
    plan_path.write_bytes(plan)
    name, cc = trtmod.gpu_identity(trtmod.import_cuda()[1])
    write_manifest(plan_path, make_manifest(plan, tensorrt_version=trt.__version__, gpu_name=name,
                                            compute_capability=cc, precision="fp32"))
    x = np.random.default_rng(2).normal(size=(9, 3, S, S)).astype(np.float32)
    with trtmod.TensorRTBackend(plan_path) as be:
        got = be.infer(x)
    want = OnnxRuntimeBackend(onnx_path, device="cpu").infer(x)
    np.testing.assert_allclose(got, want, atol=1e-3)
