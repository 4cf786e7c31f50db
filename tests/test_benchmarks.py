"""Smoke tests of the benchmark tools (tiny inputs: they check plumbing and output format, not speed)."""

import json

import numpy as np
import pytest

from benchmarks import images as bimages
from benchmarks import latency, preprocess as bpre
from runtime.contract import PreprocessSpec
from runtime.preprocess import preprocess_one


def test_image_set_is_deterministic_and_coco_shaped(tmp_path):
    a = bimages.build_image_set(tmp_path / "a", count=3)
    b = bimages.build_image_set(tmp_path / "b", count=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    import cv2
    shapes = [cv2.imread(str(p)).shape for p in a]
    assert shapes == [(480, 640, 3), (427, 640, 3), (640, 480, 3)]          # from benchmarks.images.SHAPES
    assert bimages.list_images(tmp_path / "a") == a


def test_preprocess_benchmark_writes_the_documented_json(tmp_path, capsys):
    bimages.build_image_set(tmp_path / "img", count=2)
    out = tmp_path / "pre.json"
    assert bpre.main(["--images", str(tmp_path / "img"), "--threads", "1,2", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    got = {(r["pipeline"], r["threads"]) for r in res["results"]}
    assert {("decode_only", 1), ("probres", 2), ("pil_torchvision", 1)} <= got
    for r in res["results"]:
        assert r["ms_per_image"] > 0 and r["images_per_s"] == pytest.approx(1e3 / r["ms_per_image"], rel=1e-3)
    assert set(res["ratios"]) == {"probres_over_decode_1t", "pil_over_probres_1t", "probres_2t_speedup"}
    assert res["machine"]["logical_cpus"] >= 1 and "fastnorm" in res["machine"]
    assert "probres / decode_only" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "a"], ["--images", "/nonexistent"], ["--repeats", "0"]])
def test_preprocess_benchmark_usage_errors_exit_2(argv, capsys):
    assert bpre.main(argv) == 2
    assert capsys.readouterr().err.strip()


def _tiny_onnx(path, size=16):
    """A 3-label 'model': per-channel mean -> sigmoid, with the probres metadata export writes."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.contract import LabelSet, ModelContract, PreprocessSpec

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    g = helper.make_graph([helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=0),
                           helper.make_node("Sigmoid", ["m"], ["probs"])], "tiny", [x], [y], [axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    contract = ModelContract(LabelSet.from_categories([(1, "a"), (2, "b"), (3, "c")]), PreprocessSpec(size=size))
    for k, v in {"probres.contract": contract.to_json(), "probres.precision": "fp32"}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))
    return path


def test_latency_benchmark_rows_table_json_and_plot(tmp_path, toy_checkpoint, capsys):
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = latency.main(["--engine", str(toy_checkpoint), "--engine", str(model), "--device", "cpu", "--batch-sizes", "1,2",
                       "--iters", "2", "--warmup", "1", "--e2e-count", "5", "--e2e-rounds", "2", "--json", str(out),
                       "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["format"], r["precision"]): r for r in res["rows"]}
    eager, ort = rows[("PyTorch eager", "fp32")], rows[("ONNX Runtime CPU", "fp32")]
    for r in (eager, ort):
        assert r["status"] == "ok" and [q["batch"] for q in r["latency"]] == [1, 2]
        assert all(q["p50_ms"] <= q["p90_ms"] <= q["p99_ms"] for q in r["latency"])
        assert r["e2e_images_per_s"] > 0 and r["size_mb"] is not None and r["e2e_over_engine"] > 0
        # the ratio is median over median of alternating rounds, each round's own ratio kept
        assert r["e2e_rounds"] == 2 and len(r["e2e_over_engine_rounds"]) == 2
        assert r["e2e_over_engine"] == pytest.approx(r["e2e_images_per_s"] / r["e2e_engine_images_per_s"])
        assert r["command"].startswith(f"probres-infer --engine {r['path']} --device cpu")
    assert "prob_diff_vs_pytorch_fp32" not in ort          # other labels: not the same model, not compared
    ov = rows[("OpenVINO CPU", "fp32")]                     # a shipped backend: its row too
    assert ov["status"] == "ok" and ov["backend"].startswith("openvino") and "--backend openvino" in ov["command"]
    assert ov["e2e_over_engine"] > 0 and [q["batch"] for q in ov["latency"]] == [1, 2]
    # what cannot run here is listed with the reason, never timed
    for key in [("PyTorch eager channels_last", "fp16"), ("PyTorch CUDA graph channels_last", "fp16"), ("ONNX Runtime", "fp16"),
                ("TensorRT", "fp16")]:
        assert rows[key]["status"].startswith("unavailable: ") and "latency" not in rows[key]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "p50 ms" in table and "unavailable" in table


def test_rows_are_probres_infer_command_lines(tmp_path, toy_checkpoint, capsys):
    from runtime import infer
    model = _tiny_onnx(tmp_path / "t.onnx", size=16)
    rows = {r["format"]: r for r in latency.plan_rows([str(toy_checkpoint), str(model)], "cpu") if not r.get("why")}
    assert set(rows) == {"PyTorch eager", "ONNX Runtime CPU", "OpenVINO CPU"}
    img = tmp_path / "a.png"
    import cv2
    cv2.imwrite(str(img), np.full((20, 20, 3), 128, np.uint8))
    want = 1 / (1 + np.exp(-preprocess_one(str(img), PreprocessSpec(size=16)).mean(axis=(1, 2))))
    for fmt, flag in (("ONNX Runtime CPU", "--provider cpu"), ("OpenVINO CPU", "--backend openvino")):
        r = rows[fmt]
        cmd = latency.command_line(r["path"], r["device"], r.get("backend"), r["options"], 1, 4)
        assert cmd == f"probres-infer --engine {model} --device cpu {flag} --threads 1 --batch-size 4 IMAGES..."
        assert infer.main(cmd.split()[1:-1] + [str(img), "--top-k", "all"]) == 0       # the row's command runs
        out = json.loads(capsys.readouterr().out.splitlines()[-1])           # after the provenance header
        np.testing.assert_allclose([q["probability"] for q in out["predictions"]], sorted(want, reverse=True),
                                   rtol=1e-5)


@pytest.mark.parametrize("argv", [["--engine", "/nonexistent.pt"], ["--engine", "{f}", "--batch-sizes", "0"],
                                  ["--engine", "{bad}"]])
def test_latency_usage_errors_exit_2(argv, tmp_path, capsys):
    f, bad = tmp_path / "m.onnx", tmp_path / "m.txt"
    f.write_bytes(b"x")
    bad.write_bytes(b"x")
    assert latency.main([a.format(f=f, bad=bad) for a in argv]) == 2
    assert capsys.readouterr().err.strip()
