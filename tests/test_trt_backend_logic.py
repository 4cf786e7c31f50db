"""The TensorRT backend against strict doubles of TensorRT 10.3 / 10.13.3 / 11.1 and of cuda-python.

    python -m pytest -q tests/test_trt_backend_logic.py

Plain functions (batch splitting, buffer sizing, the manifest/sha check, host views, the cudart
error check) are tested directly. Then plans built by `python -m export.tensorrt` against the
TensorRT double (tests/trt_double.py) are opened by the backend, whose "engine" computes with
ONNX Runtime on the same ONNX, over the cuda-python double (tests/cudart_double.py: device memory
in host memory, worst-case asynchronous streams and events). That checks the order of work
(manifest and platform before deserializing, host code allowed for version-compatible plans),
chunking and padding, the two-slot overlap (H2D of k+1 queued on the copy stream before the
compute of k has run), H2D straight from the backend's pinned buffers, FP16 input without a host
cast, and that everything is freed. None of this runs TensorRT or CUDA: the real path is the GPU
test at the end, skipped here, and it has never run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import hashlib
import json
import subprocess
import sys
from pathlib import Path
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
    args = dict(tensorrt_version="10.13.3.9", gpu_name="Fake GPU", compute_capability="8.7",
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
    with pytest.raises(BackendError, match=r"m.plan: engine built on Linux x86_64, this is Linux aarch64"):
        check_plan(dataclasses.replace(m, os="Linux", arch="x86_64"), plan, "m.plan", "10.13.3.9", "Fake GPU", "8.7",
                   ("Linux", "aarch64"))
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


# ------------------------------------------------------------------------------------ backend on the doubles

import cudart_double  # noqa: E402
import trt_double  # noqa: E402
from cudart_double import FakeCudart  # noqa: E402
from runtime.trt_manifest import read_manifest  # noqa: E402
from test_export_tensorrt import CONTRACT as TINY, tiny_onnx  # noqa: E402
from test_trt_export_doubles import METRICS  # noqa: E402

RELEASES = ("10.3", "10.13.3", "11.1")


def build(monkeypatch, tmp_path: Path, release: str, *argv: str, cudart: FakeCudart | None = None,
          scenario: trt_double.Scenario | None = None, **onnx_kw):
    """export.tensorrt on the doubles -> (plan path, scenario, cudart, ORT session of the ONNX)."""
    import onnxruntime as ort

    from export.tensorrt import main

    model = tiny_onnx(tmp_path / "model.onnx", val_metrics=METRICS, **onnx_kw)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sc = scenario or trt_double.Scenario()
    sc.compute = lambda x: sess.run(None, {"images": x.astype(sess.get_inputs()[0].type == "tensor(float16)"
                                                              and np.float16 or np.float32)})[0]
    trt_double.install(monkeypatch, release, sc)
    cudart = cudart_double.install(monkeypatch, cudart or FakeCudart())
    sc.device = cudart
    plan = tmp_path / "model.plan"
    assert main(["--onnx", str(model), "--output", str(plan), *argv]) == 0
    return plan, sc, cudart, sess


def ort_probs(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {"images": x})[0].astype(np.float32)


def images(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(dtype)


def freed(cudart: FakeCudart) -> bool:
    return cudart.mem == {} and cudart.streams == {} and cudart.events == {}


@pytest.mark.parametrize("release", RELEASES)
def test_backend_runs_the_exported_plan_in_chunks(monkeypatch, tmp_path, release):
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, release, "--fp16", "--opt-batch", "4", "--max-batch", "8",
                                   fp16=True)
    be = trtmod.TensorRTBackend(plan)
    assert (be.max_batch, be.min_batch, be.precision, be.contract, be.val_metrics) == (8, 1, "fp16", TINY, METRICS)
    assert be.input_dtype == np.float32                    # this FP16 graph keeps a float32 input (--fp32-input)
    x = images(19)
    np.testing.assert_allclose(be.infer(x), ort_probs(sess, x), rtol=0, atol=1e-6)
    assert [c[1] for c in sc.calls if c[0] == "execute"] == [8, 8, 3]
    be.close()
    be.close()
    assert freed(cudart)


def test_backend_pads_to_the_profile_min_batch(monkeypatch, tmp_path):
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, "10.13.3", "--min-batch", "2", "--opt-batch", "4",
                                   "--max-batch", "4")
    with trtmod.TensorRTBackend(plan) as be:
        x = images(5, seed=1)
        np.testing.assert_allclose(be.infer(x), ort_probs(sess, x), atol=1e-6)
    assert [c[1] for c in sc.calls if c[0] == "execute"] == [4, 2]
    assert ("memset", 3 * 16 * 16 * 4, ) == [e for e in cudart.log if e[0] == "memset"][0][:2]   # 1 pad row zeroed


def test_transfer_of_the_next_batch_overlaps_the_compute_of_this_one(monkeypatch, tmp_path):
    """Submit k, submit k+1, then wait k: the H2D of k+1 is queued on the copy stream while the compute
    of k has not run (the double runs work only when something synchronizes), each straight from the
    backend's pinned buffer; the results are right although the double runs everything as late as it may."""
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, "11.1", "--opt-batch", "4", "--max-batch", "4")
    be = trtmod.TensorRTBackend(plan)
    hosts_before = sum(k == "host" for k, _ in cudart.mem.values())
    bufs = be.allocate_inputs(4, 2)
    assert all(b.dtype == np.float32 and b.shape == (4, 3, 16, 16) for b in bufs)
    assert sum(k == "host" for k, _ in cudart.mem.values()) == hosts_before + 2          # pinned (cudaMallocHost)
    x0, x1 = images(4, 2), images(3, 3)
    bufs[0][:] = x0
    p0 = be.submit(bufs[0])
    bufs[1][:3] = x1
    p1 = be.submit(bufs[1][:3])
    h2d = [e for e in cudart.log if e[:2] == ("memcpy", "H2D")]
    assert [e[4] for e in h2d] == [bufs[0].ctypes.data, bufs[1].ctypes.data]              # no host copy first
    assert not any(e == ("ran", "execute") for e in cudart.log)                           # nothing has run yet
    d2h = [e for e in cudart.log if e[:2] == ("memcpy", "D2H")]
    assert h2d[0][3] == h2d[1][3] != d2h[0][3] == d2h[1][3]                               # copy stream != compute
    np.testing.assert_allclose(p0.wait(), ort_probs(sess, x0), atol=1e-6)
    np.testing.assert_allclose(p1.wait(), ort_probs(sess, x1), atol=1e-6)
    assert sum(k == "host" for k, _ in cudart.mem.values()) == hosts_before + 2          # no staging buffer made
    be.close()
    assert freed(cudart)


def test_foreign_arrays_and_three_batches_in_flight(monkeypatch, tmp_path):
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, "10.3", "--opt-batch", "4", "--max-batch", "4")
    with trtmod.TensorRTBackend(plan) as be:
        xs = [images(4, s) for s in (4, 5, 6)]
        pending = [be.submit(x) for x in xs]                # a numpy array of the caller's: staged in pinned memory
        for x in xs:
            x[:] = 0                                         # the caller's arrays may change at once
        for p, s in zip(pending, (4, 5, 6)):
            np.testing.assert_allclose(p.wait(), ort_probs(sess, images(4, s)), atol=1e-6)
    assert freed(cudart)


def test_fp16_input_engine_takes_fp16_batches_without_a_cast(monkeypatch, tmp_path):
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, "10.13.3", "--fp16", "--opt-batch", "2", "--max-batch", "2",
                                   fp16=True, half_io=True)
    with trtmod.TensorRTBackend(plan) as be:
        assert be.input_dtype == np.float16
        (buf,) = be.allocate_inputs(2, 1)
        assert buf.dtype == np.float16
        buf[:] = images(2, 7, np.float16)
        np.testing.assert_allclose(be.infer(buf), ort_probs(sess, buf), atol=1e-6)
        assert [e[2] for e in cudart.log if e[:2] == ("memcpy", "H2D")] == [2 * 3 * 16 * 16 * 2]   # FP16 bytes


@pytest.mark.parametrize("release", RELEASES)
def test_version_compatible_plan_loads_with_host_code_allowed(monkeypatch, tmp_path, release):
    plan, sc, cudart, sess = build(monkeypatch, tmp_path, release, "--fp16", "--version-compatible",
                                   "--hardware-compatible", fp16=True)
    with trtmod.TensorRTBackend(plan) as be:              # the double returns None unless engine_host_code_allowed
        x = images(3)
        np.testing.assert_allclose(be.infer(x), ort_probs(sess, x), atol=1e-6)
    assert ("deserialize refused", "engine_host_code_allowed is False") not in sc.calls


def rewrite(plan: Path, manifest_changes: dict | None = None, plan_changes: dict | None = None) -> None:
    """Edit the double's plan JSON and/or the manifest, keeping the manifest's sha256 right."""
    if plan_changes:
        data = plan.read_bytes()
        body = json.loads(data[len(trt_double.PLAN_MAGIC):])
        body.update(plan_changes)
        plan.write_bytes(trt_double.PLAN_MAGIC + json.dumps(body).encode())
    m = json.loads(plan.with_name(plan.name + ".json").read_text())
    m.update(manifest_changes or {}, plan_sha256=hashlib.sha256(plan.read_bytes()).hexdigest())
    plan.with_name(plan.name + ".json").write_text(json.dumps(m))


def test_platform_mismatch_is_refused_before_deserializing(monkeypatch, tmp_path):
    plan, sc, cudart, _ = build(monkeypatch, tmp_path, "10.3", "--hardware-compatible")
    rewrite(plan, {"arch": "aarch64" if trtmod.this_platform()[1] != "aarch64" else "x86_64"})
    n = len(sc.calls)
    with pytest.raises(BackendError, match="model.plan: engine built on Linux .*TensorRT plans do not move"):
        trtmod.TensorRTBackend(plan)
    assert not any(c[0].startswith("deserialize") for c in sc.calls[n:]) and freed(cudart)


@pytest.mark.parametrize("dtype", ["BF16", "FP8"])
def test_engine_tensor_without_a_numpy_type_is_a_backend_error(monkeypatch, tmp_path, dtype):
    plan, sc, cudart, _ = build(monkeypatch, tmp_path, "10.13.3")
    rewrite(plan, plan_changes={"out_dtype": dtype})
    with pytest.raises(BackendError, match=f"'probs' is <DataType.{dtype}.*no numpy type"):
        trtmod.TensorRTBackend(plan)
    assert freed(cudart)


def test_refused_input_shape_is_a_backend_error(monkeypatch, tmp_path):
    plan, sc, cudart, _ = build(monkeypatch, tmp_path, "11.1")
    sc.input_shapes_ok = False
    with trtmod.TensorRTBackend(plan) as be:
        with pytest.raises(BackendError, match="set_input_shape.*rejected"):
            be.infer(images(2))
    assert freed(cudart)


def test_export_refuses_an_engine_that_refuses_its_opt_shape(monkeypatch, tmp_path, capsys):
    from export.tensorrt import main

    trt_double.install(monkeypatch, "10.13.3", trt_double.Scenario(input_shapes_ok=False))
    cudart_double.install(monkeypatch, FakeCudart())
    plan = tmp_path / "m.plan"
    assert main(["--onnx", str(tiny_onnx(tmp_path / "m.onnx")), "--output", str(plan)]) == 1
    assert "set_input_shape returned False" in capsys.readouterr().err and not plan.exists()


def test_manifest_mismatch_missing_manifest_and_no_gpu(monkeypatch, tmp_path):
    plan, sc, cudart, _ = build(monkeypatch, tmp_path, "10.13.3")
    rewrite(plan, {"tensorrt_version": "10.12.0.36"})
    n = len(sc.calls)
    with pytest.raises(BackendError, match=r"model.plan: engine built by TensorRT 10.12.0.36, this is TensorRT 10.13.3"):
        trtmod.TensorRTBackend(plan)
    plan.with_name("model.plan.json").unlink()
    with pytest.raises(BackendError, match="no TensorRT manifest"):
        trtmod.TensorRTBackend(plan)
    assert not any(c[0].startswith("deserialize") for c in sc.calls[n:]) and freed(cudart)


@pytest.mark.parametrize("cudart, needle", [
    (FakeCudart(devices=0), "cudaGetDevice.*cudaErrorNoDevice"),
    (FakeCudart(error=cudart_double.cudaError_t.cudaErrorInsufficientDriver, driver=12020),
     r"driver \(CUDA 12.2\) is older than cuda-python 12.9.0.*cuda-python>=12.0,<13.*gpu-cu12"),
])
def test_no_gpu_or_an_old_driver(monkeypatch, tmp_path, cudart, needle):
    plan, *_ = build(monkeypatch, tmp_path, "10.3")
    cudart_double.install(monkeypatch, cudart)
    with pytest.raises(BackendError, match=needle):
        trtmod.TensorRTBackend(plan)


def test_failed_allocation_frees_the_rest(monkeypatch, tmp_path):
    plan, sc, _, _ = build(monkeypatch, tmp_path, "10.13.3")
    cudart = cudart_double.install(monkeypatch, FakeCudart(fail_malloc_after=2))
    sc.device = cudart
    with pytest.raises(BackendError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        trtmod.TensorRTBackend(plan)
    assert freed(cudart)


@pytest.mark.parametrize("release", RELEASES)
def test_probres_infer_with_the_plan_matches_the_onnx(monkeypatch, tmp_path, capsys, release):
    """probres-infer --engine model.plan (TensorRT double) gives the records probres-infer gives for the .onnx."""
    import cv2

    from runtime.infer import main

    plan, sc, cudart, _ = build(monkeypatch, tmp_path, release, "--opt-batch", "2", "--max-batch", "4")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        cv2.imwrite(str(img_dir / f"{i}.png"), rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
    outs = {}
    for model in (plan, tmp_path / "model.onnx"):
        out = tmp_path / f"{model.suffix[1:]}.jsonl"
        assert main(["--engine", str(model), str(img_dir), "--top-k", "all", "--batch-size", "3", "--output", str(out)]) == 0
        outs[model.suffix] = [json.loads(line) for line in out.read_text().splitlines()[1:]]   # after the header
    assert len(outs[".plan"]) == 5
    for a, b in zip(outs[".plan"], outs[".onnx"]):
        assert a.keys() == b.keys() and a.get("path", a.get("file")) == b.get("path", b.get("file"))
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert freed(cudart)


def test_plan_without_tensorrt_is_a_clear_error(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; this checks the message on machines without it")
    except ImportError:
        pass
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really a plan")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        open_backend(plan)
    with pytest.raises(BackendError, match="GPU only"):
        open_backend(plan, device="cpu")


# ------------------------------------------------------------------------------------ the real thing

def _have_gpu_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
        trtmod.gpu_identity(trtmod.import_cuda()[1])
    except (ImportError, BackendError) as e:
        return f"needs tensorrt + cuda-python + a CUDA GPU ({e})"
    return None


@pytest.mark.skipif(_have_gpu_tensorrt() is not None, reason=str(_have_gpu_tensorrt()))
@pytest.mark.parametrize("fp16", [False, True])
def test_real_tensorrt_export_and_backend_match_onnxruntime(tmp_path, fp16):
    """On a GPU machine with TensorRT (never run yet): python -m export.tensorrt, then the backend, vs ORT CPU."""
    from runtime.backends.onnxrt import OnnxRuntimeBackend

    model = tiny_onnx(tmp_path / "model.onnx", fp16=fp16)
    plan = tmp_path / "model.plan"
    r = subprocess.run([sys.executable, "-m", "export.tensorrt", "--onnx", str(model), "--output", str(plan),
                        "--opt-batch", "4", "--max-batch", "8", *(["--fp16"] if fp16 else [])],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert read_manifest(plan).precision == ("fp16" if fp16 else "fp32")
    x = images(11, 2)
    with trtmod.TensorRTBackend(plan) as be:
        got = be.infer(x)
    want = OnnxRuntimeBackend(model, device="cpu").infer(x)
    np.testing.assert_allclose(got, want, atol=2e-3 if fp16 else 1e-4)
