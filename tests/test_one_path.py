"""One image path: the pipeline writes into the backend's own buffers, sized by the input, recycled safely.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_one_path.py

Also: the runtime is a leaf (no runtime module imports train or export, nor torch at module level),
backend options reach the backends (and wrong ones are named), PyTorch FP16 channels_last matches
FP32, and ONNX Runtime's IO-binding code path gives what run() gives.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import infer
from runtime.backends import BackendError, open_backend
from runtime.backends.onnxrt import OnnxRuntimeBackend
from runtime.backends.base import Pending
from runtime.chunks import READ_AHEAD
from runtime.pipeline import IN_FLIGHT, classify, iter_batches, numpy_buffers
from runtime.preprocess import preprocess, preprocess_one
from tests.test_pipeline_memory import CONTRACT, S, write_images

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def tiny_onnx(path: Path, fp16_input: bool = False) -> Path:
    """probs (N, 3) = sigmoid(channel means), with a float32 or float16 input like export's graphs."""
    import onnx
    from onnx import TensorProto, helper

    x = "images"
    nodes = []
    if fp16_input:
        nodes.append(helper.make_node("Cast", ["images"], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Sigmoid", ["f"], ["probs"])]
    dt = TensorProto.FLOAT16 if fp16_input else TensorProto.FLOAT
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", dt, ["N", 3, S, S])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="probres.contract", value=CONTRACT.to_json())
    onnx.save(m, str(path))
    return path


# ------------------------------------------------------------------------------------------- the leaf

def _imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names.add(n.module.split(".")[0])
    return names


def test_no_runtime_module_imports_train_or_export_and_none_imports_torch_at_module_level():
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) > 10
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        everywhere = _imports(tree, top_level_only=False)          # lazy imports inside functions count too
        assert not everywhere & {"train", "export", "benchmarks"}, f"{f} imports {everywhere & {'train', 'export'}}"
        assert not _imports(tree, top_level_only=True) & {"torch", "torchvision"}, f"{f} imports torch at module level"


def test_the_detector_sees_a_lazy_import():
    tree = ast.parse("def f():\n    from train.checkpoint import load_checkpoint\n")
    assert "train" in _imports(tree, top_level_only=False)


# Reading import statements misses __import__("train.checkpoint") and importlib calls: this imports
# every runtime module for real, in a process where train, export, benchmarks and torch cannot be.
IMPORT_ALL = """
import importlib, pkgutil, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"train", "export", "benchmarks", "torch", "torchvision"}:
            raise ImportError("layering: " + name + " imported")
sys.meta_path.insert(0, Blocker())
try:
    import train
    sys.exit("the blocker does not block")
except ImportError:
    pass
import runtime
names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]
for name in names:
    importlib.import_module(name)        # an ImportError fails the process, naming the module
print(len(names))
"""


def test_every_runtime_module_imports_where_train_and_export_cannot(tmp_path):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout) > 20                              # every module, not an empty walk
    # The check catches what the AST test cannot see.
    (tmp_path / "sneaky.py").write_text('__import__("train.checkpoint")\n')
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL.replace("import runtime\n", "import runtime, sneaky\n")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{RUNTIME.parent}"})
    assert r.returncode != 0 and "layering: train" in r.stderr


# ------------------------------------------------------------------------------------------- buffers

class OwnBuffersOnly(OnnxRuntimeBackend):
    """The real ONNX Runtime backend, refusing any batch that is not a view of its own buffers and
    checking at wait() that the buffer was not rewritten while the batch was in flight."""

    submitted: list[tuple[int, str]]

    def _submit(self, batch: np.ndarray) -> Pending:
        if not self.owns(batch) or batch.dtype != self.input_dtype:
            raise AssertionError(f"batch {batch.dtype} {batch.shape} is not the backend's own {self.input_dtype} buffer")
        self.submitted = getattr(self, "submitted", []) + [(batch.ctypes.data, batch.dtype.name)]
        snapshot, probs = batch.copy(), self._infer(batch)
        backend = self

        class Checked(Pending):
            def wait(self) -> np.ndarray:
                time.sleep(0.03)              # a GPU computing: time for the producer to rewrite a recycled buffer
                assert np.array_equal(batch, snapshot), "buffer rewritten before its batch's wait()"
                backend.waited = getattr(backend, "waited", 0) + 1
                return probs

        return Checked(probs)


@pytest.mark.parametrize("fp16_input", [False, True])
def test_probres_infer_hands_the_backend_its_own_buffers(tmp_path, monkeypatch, capsys, fp16_input):
    model = tiny_onnx(tmp_path / "m.onnx", fp16_input)
    paths = write_images(tmp_path / "imgs", 37, size=72)
    opened = []

    def spy_open(path, device="auto", threads=None, **options):
        opened.append(OwnBuffersOnly(path, device="cpu", threads=1))
        return opened[-1]

    monkeypatch.setattr(infer, "open_backend", spy_open)
    assert infer.main(["--engine", str(model), *paths, "--batch-size", "4", "--threads", "2", "--top-k", "all"]) == 0
    be = opened[0]
    assert len(be.submitted) == 10 and be.waited == 10                       # ceil(37 / 4), every one waited
    assert {d for _, d in be.submitted} == {"float16" if fp16_input else "float32"}
    assert len({a for a, _ in be.submitted}) <= IN_FLIGHT + 1 + 2            # recycled: fixed, not 10
    lines = capsys.readouterr().out.splitlines()[1:]                        # after the provenance header
    assert len(lines) == 37


def test_the_spy_refuses_a_foreign_array(tmp_path):
    be = OwnBuffersOnly(tiny_onnx(tmp_path / "m.onnx"), device="cpu")
    with pytest.raises(AssertionError, match="not the backend's own"):
        be.infer(np.zeros((1, 3, S, S), np.float32))
    (buf,) = be.allocate_inputs(2, 1)
    buf[:] = 0
    assert be.infer(buf[:1]).shape == (1, 3)


def test_buffers_are_sized_by_the_input_and_paths_are_read_a_few_batches_ahead(tmp_path):
    paths = write_images(tmp_path / "imgs", 9, size=40) * 4                     # 36 paths
    calls, consumed = [], []

    def source():
        for p in paths:
            consumed.append(p)
            yield p

    def allocate(rows, count):
        calls.append((rows, count, len(consumed)))
        return numpy_buffers(CONTRACT.preprocess)(rows, count)

    # one image, a huge batch size: one buffer of one image (not 100000 x 48 KB per buffer)
    (b,) = list(iter_batches(paths[:1], CONTRACT.preprocess, batch_size=100000, allocate=allocate))
    assert calls[-1][:2] == (1, 1) and b.data.shape == (1, 3, S, S)
    got = [b for b in iter_batches(source(), CONTRACT.preprocess, batch_size=4, threads=2, allocate=allocate, hold=2)]
    # allocated once the first 4 paths are in, while the reader is at most READ_AHEAD + 1 batches ahead, not 36
    rows, count, read = calls[-1]
    assert (rows, count) == (4, IN_FLIGHT + 1 + 2) and 4 <= read <= (READ_AHEAD + 1) * 4 + 1
    assert [len(b.paths) for b in got] == [4] * 9


def test_probres_infer_batch_size_larger_than_the_input_runs(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx")
    (p,) = write_images(tmp_path / "imgs", 1, size=40)
    assert infer.main(["--engine", str(model), p, "--batch-size", "100000"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 1               # the provenance header, the record


def test_held_batches_stay_intact_until_released(tmp_path):
    paths = write_images(tmp_path / "imgs", 30, size=48)
    it = iter_batches(paths, CONTRACT.preprocess, batch_size=3, threads=2, hold=2)
    prev = next(it)
    for cur in it:                            # with hold=2 the previous batch is still ours here
        assert not np.shares_memory(prev.data, cur.data)
        for j, i in enumerate(prev.ok):
            np.testing.assert_array_equal(prev.data[j], preprocess_one(prev.paths[i], CONTRACT.preprocess))
        prev = cur


def test_classify_gives_each_batch_its_own_probabilities(tmp_path):
    model = tiny_onnx(tmp_path / "m.onnx")
    paths = write_images(tmp_path / "imgs", 11, size=48)
    paths[5] = str(tmp_path / "missing.jpg")
    be = OwnBuffersOnly(model, device="cpu")
    want = OnnxRuntimeBackend(model, device="cpu").infer(preprocess([p for i, p in enumerate(paths) if i != 5],
                                                                    spec=CONTRACT.preprocess))
    rows = []
    for batch, probs in classify(be, paths, batch_size=2, threads=2):
        assert probs is None if not batch.ok else probs.shape == (len(batch.ok), 3)
        if probs is not None:
            rows.append(probs)
    np.testing.assert_allclose(np.concatenate(rows), want, atol=1e-6)


def test_preprocess_is_the_pipeline_engine(tmp_path):
    paths = write_images(tmp_path / "imgs", 7, size=56)
    whole = preprocess(paths, spec=CONTRACT.preprocess, threads=2)
    streamed = np.concatenate([b.data.copy() for b in iter_batches(paths, CONTRACT.preprocess, batch_size=3)])
    np.testing.assert_array_equal(whole, streamed)


# ------------------------------------------------------------------------------------------- options

def test_backend_options_are_checked_and_named(tmp_path, toy_checkpoint):
    model = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(BackendError, match="--compile: the onnxruntime backend has no such option"):
        open_backend(model, device="cpu", compile=True)
    with pytest.raises(BackendError, match="--provider cuda: this onnxruntime build has no CUDAExecutionProvider"):
        open_backend(model, device="auto", provider="cuda")
    with pytest.raises(BackendError, match="--backend must be one of"):
        open_backend(model, backend="nope")
    with pytest.raises(BackendError, match="--cuda-graph: CUDA graphs need a GPU"):
        open_backend(toy_checkpoint, device="cpu", cuda_graph=True)
    with pytest.raises(BackendError, match="--precision must be one of"):
        open_backend(toy_checkpoint, device="cpu", precision="int4")
    assert open_backend(model, device="cpu", provider="cpu").name == "onnxruntime[CPUExecutionProvider]"


def test_probres_infer_rejects_a_wrong_option_with_exit_2(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx")
    (p,) = write_images(tmp_path / "imgs", 1, size=40)
    assert infer.main(["--engine", str(model), p, "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision: the onnxruntime backend has no such option" in err and "Traceback" not in err


def test_pytorch_fp16_channels_last_matches_fp32(toy_checkpoint, tmp_path):
    fp32 = open_backend(toy_checkpoint, device="cpu", threads=1)
    fp16 = open_backend(toy_checkpoint, device="cpu", threads=1, backend="pytorch", precision="fp16")
    assert fp16.input_dtype == np.float16 and fp32.input_dtype == np.float32 and fp16.precision == "fp16"
    size = fp32.contract.preprocess.size
    paths = write_images(tmp_path / "imgs", 4, size=size + 9)
    (buf,) = fp16.allocate_inputs(4, 1)
    preprocess(paths, spec=fp32.contract.preprocess, out=buf)             # the C kernel writes FP16 in place
    x = preprocess(paths, spec=fp32.contract.preprocess)
    want, got = fp32.infer(x), fp16.infer(buf)
    d = float(np.abs(got - want).max())
    assert got.dtype == np.float32 and 0 < d < 5e-3, d                     # really FP16, close to FP32


def test_onnxruntime_io_binding_path_equals_run(tmp_path):
    for fp16_input in (False, True):
        model = tiny_onnx(tmp_path / f"m{int(fp16_input)}.onnx", fp16_input)
        be = open_backend(model, device="cpu")
        (buf,) = be.allocate_inputs(5, 1)
        buf[:] = np.random.default_rng(1).normal(size=buf.shape).astype(buf.dtype)
        want = be.infer(buf[:3])
        be._io, be._out_device = be._sess.io_binding(), "cpu"             # the GPU providers' code path, on the CPU
        np.testing.assert_array_equal(be.infer(buf[:3]), want)
        np.testing.assert_array_equal(be.infer(buf), be._sess.run(["probs"], {"images": buf})[0])


def test_classify_stopped_early_stops_its_threads(tmp_path):
    import threading
    be = OnnxRuntimeBackend(tiny_onnx(tmp_path / "m.onnx"), device="cpu")
    paths = write_images(tmp_path / "imgs", 20, size=40)
    before = threading.active_count()
    it = classify(be, paths, batch_size=2, threads=2)
    next(it)
    it.close()
    assert threading.active_count() == before
