"""INT8 Q/DQ export (export.int8) and the OpenVINO backend: one file that ONNX Runtime, OpenVINO and TensorRT load.

    .venv/bin/python -m pytest -q tests/test_int8.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("nncf", reason="the int8 extra (nncf) is not installed")
pytest.importorskip("openvino", reason="the openvino extra is not installed")

from export.int8 import Int8Error, check_qdq, main as int8_main, to_signed  # noqa: E402
from runtime.backends import BackendError, open_backend  # noqa: E402
from runtime.onnx_meta import read_onnx_meta  # noqa: E402
from runtime.preprocess import preprocess  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_checkpoint, toy_root):
    """(fp32.onnx, int8.onnx, x): the toy checkpoint exported, then quantized by the CLI on 24 train images."""
    from export.onnx import main as export_main

    d = tmp_path_factory.mktemp("int8")
    fp32, int8 = d / "model.onnx", d / "model_int8.onnx"
    assert export_main(["--checkpoint", str(toy_checkpoint), "--output", str(fp32),
                        "--verify-images", str(toy_root / "val2014")]) == 0
    assert int8_main(["--onnx", str(fp32), "--calib-images", str(toy_root / "train2014"), "--num", "24",
                      "--output", str(int8)]) == 0
    spec = read_onnx_meta(fp32).contract.preprocess
    x = preprocess([str(p) for p in sorted((toy_root / "val2014").glob("*.jpg"))[:7]], spec=spec)
    return fp32, int8, x


def test_int8_file_is_symmetric_signed_qdq_with_contract_and_calibration(files, toy_root):
    fp32, int8, _ = files
    model = onnx.load(str(int8))
    counts = check_qdq(model)                 # INT8 zero points, all zero: what TensorRT's parser takes
    assert counts["QuantizeLinear"] >= 10 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    weights_int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert weights_int8, "conv weights should be stored as int8 initializers"
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert "DequantizeLinear" not in {producers.get(i) for i in gemm.input}, "the head should stay FP32"
    a, b = read_onnx_meta(fp32), read_onnx_meta(int8)
    assert b.contract == a.contract and b.precision == "int8" and b.checkpoint_sha256 == a.checkpoint_sha256
    calib = json.loads(b.raw["probres.int8_calibration"])
    assert calib["images"] == 24 and calib["source"] == str(toy_root / "train2014") and calib["head"] == "fp32"


def test_int8_runs_on_onnxruntime_and_openvino_close_to_fp32(files):
    fp32, int8, x = files
    ref = open_backend(fp32, device="cpu", threads=1, backend="onnxruntime").infer(x)
    ort8 = open_backend(int8, device="cpu", threads=1, backend="onnxruntime")
    ov8 = open_backend(int8, device="cpu", threads=1, backend="openvino")
    assert ort8.name.startswith("onnxruntime") and ov8.name == "openvino[CPU]" and ov8.precision == "int8"
    p_ort, p_ov = ort8.infer(x), ov8.infer(x)
    # INT8 moves probabilities a little, not a lot: both runtimes stay near FP32 and near each other.
    assert np.abs(p_ort - ref).mean() < 0.02 and np.abs(p_ov - ref).mean() < 0.02
    assert np.abs(p_ort - p_ov).max() < 0.05
    assert np.abs(p_ort - ref).max() > 1e-6, "INT8 identical to FP32: the quantizers did nothing"


def test_openvino_matches_onnxruntime_on_the_fp32_file_and_overlaps_two_batches(files):
    fp32, _, x = files
    ort = open_backend(fp32, device="cpu", threads=1, backend="onnxruntime")
    ov = open_backend(fp32, device="cpu", threads=2, backend="openvino")
    assert ov.contract == ort.contract and ov.input_dtype == np.float32 and "2 threads" in ov.describe()
    want = ort.infer(x)
    for xb in (x[:1], x):
        np.testing.assert_allclose(ov.infer(xb), want[:len(xb)], atol=1e-4)
    bufs = ov.allocate_inputs(4, 2)
    bufs[0][:] = x[:4]
    bufs[1][:3] = x[4:]
    first = ov.submit(bufs[0])              # two in flight, waited in order
    second = ov.submit(bufs[1][:3])
    np.testing.assert_allclose(first.wait(), want[:4], atol=1e-4)
    np.testing.assert_allclose(second.wait(), want[4:], atol=1e-4)
    ov.close()


def test_backend_selection(files):
    fp32, int8, _ = files
    assert open_backend(int8, device="cpu").name == "openvino[CPU]"          # INT8 on CPU: the faster runtime
    assert open_backend(fp32, device="cpu").name.startswith("onnxruntime")  # FP32: ONNX Runtime is faster here
    assert open_backend(int8, device="cpu", backend="onnxruntime").name.startswith("onnxruntime")
    with pytest.raises(BackendError, match="runs on the CPU"):
        open_backend(int8, device="cuda", backend="openvino")
    # an ONNX Runtime option keeps the file on ONNX Runtime; OpenVINO refuses it naming the flag
    assert open_backend(int8, device="cpu", provider="cpu").name == "onnxruntime[CPUExecutionProvider]"
    with pytest.raises(BackendError, match="--provider: the openvino backend has no such option"):
        open_backend(int8, device="cpu", backend="openvino", provider="cpu")


def test_int8_eval_uses_the_int8_tolerance(files, toy_checkpoint, toy_root, tmp_path):
    from runtime.eval import main as eval_main

    _, int8, _ = files
    rep_path = tmp_path / "rep.json"
    eval_main(["--engine", str(int8), "--coco-root", str(toy_root), "--reference", str(toy_checkpoint),
               "--json", str(rep_path), "--limit", "8", "--threads", "1"])
    rep = json.loads(rep_path.read_text())
    assert rep["tolerance"] == 0.005 and rep["engine_model"]["backend"] == "openvino[CPU]"
    assert rep["engine_model"]["precision"] == "int8" and rep["passed"] == (rep["map_drop"] <= 0.005)


@pytest.mark.parametrize("case, message", [
    ("val", "evaluation split"), ("same", "would overwrite the input"), ("fp16", "quantize the FP32 export"),
    ("nodir", "no such directory"), ("empty", "no image files"),
    ("verify_nodir", "--verify-images"), ("verify_empty", "--verify-images"),
])
def test_int8_cli_refuses_bad_input_and_writes_nothing(files, toy_root, tmp_path, capsys, case, message):
    fp32, _, _ = files
    src, calib, out = fp32, toy_root / "train2014", tmp_path / "out_int8.onnx"
    if case == "val":
        calib = toy_root / "val2014"
    elif case == "same":
        out = fp32
    elif case == "fp16":
        m = onnx.load(str(fp32))
        next(p for p in m.metadata_props if p.key == "probres.precision").value = "fp16"
        src = tmp_path / "model_fp16.onnx"
        onnx.save(m, str(src))
    elif case == "nodir":
        calib = tmp_path / "missing"
    elif case == "empty":
        calib = tmp_path / "empty"
        calib.mkdir()
    extra = []
    if case.startswith("verify_"):      # checked before quantizing, not a traceback after it
        extra = ["--verify-images", str(tmp_path / "vmissing")]
        if case == "verify_empty":
            (tmp_path / "vmissing").mkdir()
    before = fp32.stat().st_mtime_ns
    assert int8_main(["--onnx", str(src), "--calib-images", str(calib), "--num", "4", "--output", str(out),
                      *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert fp32.stat().st_mtime_ns == before and (case == "same" or not out.exists())


def _qdq_graph(zero_point: np.ndarray, scale: float):
    """x -> QuantizeLinear -> DequantizeLinear -> y, with the given zero point (dtype decides UINT8/INT8)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq0")]
    qtype = TensorProto.UINT8 if zero_point.dtype == np.uint8 else TensorProto.INT8
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                          [numpy_helper.from_array(np.array(scale, np.float32), "s"),
                           numpy_helper.from_array(zero_point, "z")],
                          value_info=[helper.make_tensor_value_info("q", qtype, [64])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_to_signed_keeps_the_range_of_an_unsigned_quantizer():
    import onnxruntime as ort

    s = 0.02
    m = _qdq_graph(np.array(0, np.uint8), s)
    with pytest.raises(Int8Error, match="UINT8 zero point; TensorRT needs INT8"):
        check_qdq(m)
    x = np.linspace(0, 255 * s, 64).astype(np.float32)     # the unsigned quantizer's whole range
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    y_u8 = run(m)
    assert to_signed(m) == 1
    check_qdq(m)
    y_i8 = run(m)
    s8 = 255 * s / 127
    assert y_i8.max() == pytest.approx(255 * s, rel=1e-6)             # top of the range kept, not clipped at 127 s
    assert np.abs(y_i8 - x).max() <= s8 / 2 + 1e-6 and np.abs(y_u8 - x).max() <= s / 2 + 1e-6
    with pytest.raises(Int8Error, match="asymmetric"):
        check_qdq(_qdq_graph(np.array(3, np.int8), s))


@pytest.mark.parametrize("release", ("10.3", "10.13.3", "11.1"))
def test_int8_file_builds_strongly_typed_on_the_tensorrt_doubles(files, monkeypatch, tmp_path, release):
    """export.tensorrt on the real NNCF file against the strict doubles of TensorRT 10.x / 11.x: strongly typed,
    no FP16 flag, TF32 left alone, the precision check fed NVIDIA's QAT-INT8 inspector sample expects INT8."""
    from runtime.trt_manifest import read_manifest
    from test_trt_export_doubles import built, export

    _, int8, _ = files
    rc, sc, plan = export(monkeypatch, tmp_path, release, [], onnx=int8)
    assert rc == 0
    b = built(sc)
    assert b["strong"] and b["precision"] == "int8" and "FP16" not in b["flags"] and "INT8" not in b["flags"]
    m = read_manifest(plan)
    assert m.precision == "int8" and m.contract == read_onnx_meta(int8).contract


def test_nncf_unsigned_output_is_what_the_tensorrt_parser_refuses(files, monkeypatch, tmp_path, capsys):
    """Undo to_signed on one activation quantizer: the double's parser (as onnx-tensorrt #884) says no."""
    from onnx import numpy_helper

    from test_trt_export_doubles import export

    _, int8, _ = files
    m = onnx.load(str(int8))
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in m.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(zp).shape, np.uint8), zp.name))
    bad = tmp_path / "uint8.onnx"
    onnx.save(m, str(bad))
    (tmp_path / "o").mkdir()
    rc, _, plan = export(monkeypatch, tmp_path / "o", "11.1", [], onnx=bad)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "UINT8 zero point" in err and not plan.exists()


def test_probres_infer_runs_the_int8_file_on_openvino(files, toy_root, tmp_path, capsys):
    from runtime.infer import main as infer_main

    _, int8, _ = files
    out = tmp_path / "pred.jsonl"
    images = [str(p) for p in sorted((toy_root / "val2014").glob("*.jpg"))[:3]]
    assert infer_main(["--engine", str(int8), "--backend", "openvino", "--threads", "1", "--output", str(out),
                       *images]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]     # after the provenance header
    assert [r["image"] for r in rows] == images and "openvino[CPU] int8" in capsys.readouterr().err


def test_int8_records_its_sources_and_its_printed_gate_runs_as_printed(toy_checkpoint, toy_root, tmp_path, capsys):
    """Issue 24 rows 3 and 17: the INT8 file records the FP32 file's and the checkpoint's sha256; the
    printed probres-eval command has --coco-root, names the file it was quantized from and runs."""
    import shlex

    from export.onnx import main as export_main
    from runtime.eval import main as eval_main
    from runtime.fileio import sha256_file
    from runtime.provenance import lineage, relation

    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model_int8.onnx"
    assert export_main(["--checkpoint", str(toy_checkpoint), "--output", str(fp32),
                        "--verify-images", str(toy_root / "val2014")]) == 0
    capsys.readouterr()
    assert int8_main(["--onnx", str(fp32), "--calib-images", str(toy_root / "train2014"), "--num", "8",
                      "--output", str(int8)]) == 0
    out = capsys.readouterr().out
    made = lineage(int8)
    assert made.checkpoint_sha256 == sha256_file(toy_checkpoint) and sha256_file(fp32) in made.sources
    assert relation(made, lineage(toy_checkpoint)) == relation(made, lineage(fp32)) == "source"
    hint = out.strip().splitlines()[-1].split("its accuracy gate is ", 1)[1]
    assert hint == f"probres-eval --engine {int8} --coco-root {toy_root} --reference-engine {fp32}"
    argv = shlex.split(hint)
    assert eval_main(argv[1:] + ["--limit", "6", "--threads", "1", "--json", str(tmp_path / "r.json")]) in (0, 1)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["reference_model"]["relation"] == "source" and rep["engine_model"]["precision"] == "int8"
    assert rep["gates"]["max_dprob"]["tolerance"] == 0.15 and rep["gates"]["label_diff_share"]["tolerance"] == 0.15
