"""Backends behind one interface: ONNX Runtime and PyTorch agree with PyTorch run directly; loading errors are one line.

    .venv/bin/python -m pytest -q tests/test_backends.py
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import BackendError, open_backend
from runtime.backends.onnxrt import OnnxRuntimeBackend, choose_providers
from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.preprocess import preprocess

SMALL = ModelContract(LabelSet.from_categories([(1, "person"), (3, "car"), (18, "dog")]), PreprocessSpec(size=16))


def tiny_onnx(path, contract: ModelContract | None, fp16_io: bool = False, metadata: dict | None = None):
    """(N,3,S,S) -> GlobalAveragePool -> (N,3) -> + bias -> sigmoid: probs (N,3) = sigmoid(channel means + b)."""
    import onnx
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT16 if fp16_io else TensorProto.FLOAT
    bias = np.array([0.5, -0.25, 1.0], dtype=np.float16 if fp16_io else np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Add", ["f", "b"], ["l"]), helper.make_node("Sigmoid", ["l"], ["probs"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", t, ["N", 3, "S", "S"])],
                          [helper.make_tensor_value_info("probs", t, ["N", 3])],
                          [helper.make_tensor("b", t, [3], bias.astype(np.float32).tolist())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    props = dict(metadata or {})
    if contract is not None:
        props["probres.contract"] = contract.to_json()
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))
    return path, bias.astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, toy_checkpoint, toy_root):
    """The toy checkpoint exported by export.onnx (FP32), and val images preprocessed by the runtime."""
    from export.onnx import main as export_main

    out = tmp_path_factory.mktemp("exp") / "model.onnx"
    assert export_main(["--checkpoint", str(toy_checkpoint), "--output", str(out),
                        "--verify-images", str(toy_root / "val2014")]) == 0
    paths = sorted((toy_root / "val2014").glob("*.jpg"))[:5]
    x = preprocess([str(p) for p in paths], spec=PreprocessSpec(size=64))
    return out, x


def torch_reference(ckpt_path, x):
    import torch

    from train.checkpoint import load_checkpoint
    model = load_checkpoint(ckpt_path).build()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x))).numpy()


def test_onnxruntime_and_torch_backends_match_pytorch(exported, toy_checkpoint):
    onnx_path, x = exported
    want = torch_reference(toy_checkpoint, x)
    ort_be = open_backend(onnx_path, device="cpu", threads=1)
    torch_be = open_backend(toy_checkpoint, device="cpu")
    assert isinstance(ort_be, OnnxRuntimeBackend) and ort_be.name == "onnxruntime[CPUExecutionProvider]"
    assert ort_be.contract == torch_be.contract and ort_be.contract.preprocess.size == 64
    assert ort_be.max_batch is None and ort_be.precision == "fp32"
    for xb in (x[:1], x):                      # batch 1 and an odd batch
        got = ort_be.infer(xb)
        assert got.dtype == np.float32 and got.shape == (len(xb), ort_be.contract.labels.num_classes)
        np.testing.assert_allclose(got, want[:len(xb)], atol=1e-5)
        np.testing.assert_allclose(torch_be.infer(xb), want[:len(xb)], atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        ort_be.infer(x[:, :, :32, :32].copy())
    ort_be.close()
    torch_be.close()


def test_fp16_io_graph_is_cast_both_ways(tmp_path):
    path, bias = tiny_onnx(tmp_path / "t16.onnx", SMALL, fp16_io=True, metadata={"probres.precision": "fp16"})
    be = open_backend(path, device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    got = be.infer(x)
    want = 1 / (1 + np.exp(-(x.mean(axis=(2, 3)) + bias)))
    assert got.dtype == np.float32 and be.precision == "fp16"
    np.testing.assert_allclose(got, want, atol=2e-3)     # FP16 arithmetic


def test_val_metrics_come_from_metadata(tmp_path):
    path, _ = tiny_onnx(tmp_path / "m.onnx", SMALL, metadata={"probres.val_metrics": '{"mAP": 0.75}'})
    assert open_backend(path).val_metrics == {"mAP": 0.75}
    path2, _ = tiny_onnx(tmp_path / "m2.onnx", SMALL)
    assert open_backend(path2).val_metrics is None


def test_choose_providers_order_and_filtering():
    all3 = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "AzureExecutionProvider"]
    assert choose_providers(all3, "auto") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                              "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda") == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(all3, "cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], "auto") == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="--device cuda: .*no GPU provider"):
        choose_providers(["CPUExecutionProvider"], "cuda")


def test_loading_errors_are_one_line_backend_errors(tmp_path, toy_checkpoint):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf" * 10)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"garbage")
    cases = [(tmp_path / "missing.onnx", "no such model file"), (tmp_path / "m.tflite", "unknown model type"),
             (junk, "not a loadable ONNX model"), (bad_pt, "not a loadable checkpoint"),
             (tiny_onnx(tmp_path / "nometa.onnx", None)[0], "no probres.contract")]
    (tmp_path / "m.tflite").write_bytes(b"x")
    for path, msg in cases:
        with pytest.raises(BackendError, match=msg) as e:
            open_backend(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(BackendError, match="--device must be one of"):
        open_backend(toy_checkpoint, device="tpu")


def test_device_cuda_without_gpu_is_refused(tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal is for CPU-only builds")
    path, _ = tiny_onnx(tmp_path / "m.onnx", SMALL)
    with pytest.raises(BackendError, match="no GPU provider"):
        open_backend(path, device="cuda")


def test_checkpoint_without_torchvision_is_a_backend_error(toy_checkpoint, monkeypatch):
    """torch alone (a Jetson wheel, say): one line naming the missing package, not an ImportError traceback."""
    import sys

    import torch  # noqa: F401  (present; torchvision is what goes missing)
    monkeypatch.setitem(sys.modules, "torchvision", None)          # `import torchvision` raises ImportError
    with pytest.raises(BackendError, match="torchvision"):
        open_backend(toy_checkpoint, device="cpu")
