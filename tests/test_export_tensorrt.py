"""export.trt_build and export.tensorrt's checks before TensorRT: everything that does not need TensorRT.

    python -m pytest -q tests/test_export_tensorrt.py

The build itself runs against strict doubles of TensorRT releases in tests/test_trt_export_doubles.py.
The precision check runs here on NVIDIA's real engine-inspector JSON (tests/data/trt_inspector, from
trt-engine-explorer, TensorRT 10.x on an A100) and on that JSON in the 11.x shape (split dtype field).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import convert_fp16
from export.trt_build import (EnginePrecisionError, UsageError, build_plan, cache_key_path, check_engine_precision,
                              check_profile, layer_precisions, load_timing_cache, onnx_facts, parse_version,
                              profile_shapes, save_timing_cache, timing_cache_key, workspace_bytes)
from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.fileio import sha256_file
from runtime.trt_manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ModelContract(LabelSet.from_categories([(1, "person"), (3, "car")]), PreprocessSpec(size=16))


def tiny_onnx(path: Path, batch: int | str = "batch", fp16: bool = False, metadata: bool = True,
              qdq: bool = False, val_metrics: dict | None = None, half_io: bool = False) -> Path:
    """images [N,3,16,16] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Sigmoid -> probs [N,2].

    qdq: a QuantizeLinear/DequantizeLinear pair on the input (an INT8 Q/DQ graph, as issue 15 makes);
    half_io: float16 input (an FP16-input engine)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (2, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")]
    first = "images"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        first = "dq"
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])] if qdq else []
    nodes += [helper.make_node("Conv", [first, "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["l"], transB=1), helper.make_node("Sigmoid", ["l"], ["probs"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata:
        model.metadata_props.add(key="probres.contract", value=CONTRACT.to_json())
    if val_metrics:
        model.metadata_props.add(key="probres.val_metrics", value=json.dumps(val_metrics))
    if fp16:
        model = convert_fp16(model, fp16_input=False)     # FP16 weights, float32 input (half_io: FP16 input)
    if half_io:
        model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        model.graph.node.insert(0, helper.make_node("Cast", ["images"], ["images32"], to=TensorProto.FLOAT))
        for node in model.graph.node[1:]:
            node.input[:] = ["images32" if i == "images" else i for i in node.input]
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------- version dispatch

def test_parse_version() -> None:
    assert parse_version("10.12.0.36") == (10, 12, 0, 36) and parse_version("11.1") == (11, 1)
    for bad in ("", "10.x", "v10.12", None):
        with pytest.raises(UsageError):
            parse_version(bad)  # type: ignore[arg-type]


def test_tensorrt_10_0_to_10_11_weak_only_for_the_fp32_onnx_with_fp16() -> None:
    p = build_plan("10.8.0.43", "fp32", fp16=True)
    assert (p.mode, p.network_flags, p.fp16_flag, p.disable_tf32, p.precision) == ("weak", "none", True, False, "fp16")
    # the FP16 graph carries its precision: strongly typed there too, so its FP32 head stays FP32
    p = build_plan("10.3.0.30", "fp16", fp16=True)
    assert (p.mode, p.network_flags, p.fp16_flag, p.precision) == ("strong", "strongly_typed", False, "fp16")
    p = build_plan("10.8.0.43", "fp32", fp16=False)
    assert (p.mode, p.fp16_flag, p.disable_tf32, p.precision) == ("strong", False, True, "fp32")


def test_tensorrt_10_12_is_strongly_typed_and_needs_the_fp16_graph() -> None:
    p = build_plan("10.12.0.36", "fp16", fp16=True)
    assert (p.mode, p.network_flags, p.fp16_flag, p.precision) == ("strong", "strongly_typed", False, "fp16")
    with pytest.raises(UsageError) as e:
        build_plan("10.12.0.36", "fp32", fp16=True, onnx_name="model.onnx")
    msg = str(e.value)
    assert "strongly typed" in msg and "model.onnx is FP32" in msg and "export.onnx" in msg and "--fp16" in msg
    p = build_plan("10.16.1.11", "fp32", fp16=False)                         # FP32 reference engine
    assert (p.mode, p.fp16_flag, p.disable_tf32, p.precision) == ("strong", False, True, "fp32")


def test_tensorrt_11_passes_no_network_flag() -> None:
    p = build_plan("11.1.0.7", "fp16", fp16=True)
    assert (p.mode, p.network_flags, p.fp16_flag) == ("strong", "none", False)
    with pytest.raises(UsageError, match="strongly typed"):
        build_plan("11.4.1.2", "fp32", fp16=True)


def test_int8_qdq_graph_builds_strongly_typed_everywhere() -> None:
    for version, flags in (("10.3.0.30", "strongly_typed"), ("10.13.3.9", "strongly_typed"), ("11.1.0.7", "none")):
        p = build_plan(version, "int8", fp16=False)
        assert (p.mode, p.network_flags, p.fp16_flag, p.disable_tf32, p.precision) == \
            ("strong", flags, False, False, "int8")
    with pytest.raises(UsageError, match="INT8 Q/DQ graph.*drop --fp16"):
        build_plan("10.13.3.9", "int8", fp16=True)


def test_fp16_graph_without_flag_and_old_tensorrt_are_refused() -> None:
    with pytest.raises(UsageError, match="FP16 graph: add --fp16"):
        build_plan("10.13.3.9", "fp16", fp16=False, onnx_name="model_fp16.onnx")
    with pytest.raises(UsageError, match="too old"):
        build_plan("8.6.1.6", "fp32", fp16=True)


# ---------------------------------------------------------------- arguments

def test_profile_checks() -> None:
    check_profile(1, 8, 32)
    check_profile(4, 4, 4, onnx_batch=4)
    check_profile(1, 8, 32, onnx_batch="batch")
    for args, needle in [((0, 8, 32), "--min-batch 0"), ((1, 64, 32), "min-batch <= --opt-batch"),
                         ((9, 8, 32), "9 / 8 / 32"), ((1, 8, 5000), "at most"), ((1, 8, 32, 1), "fixed batch of 1")]:
        with pytest.raises(UsageError, match=needle):
            check_profile(*args)
    assert profile_shapes(1, 8, 32, 448) == ((1, 3, 448, 448), (8, 3, 448, 448), (32, 3, 448, 448))


def test_workspace_bytes() -> None:
    assert workspace_bytes(4) == 4 << 30 and workspace_bytes(0.5) == 512 << 20
    for bad in (0, -1, 2048):
        with pytest.raises(UsageError, match="--workspace-gib"):
            workspace_bytes(bad)


def test_onnx_facts(tmp_path: Path) -> None:
    f32 = onnx_facts(tiny_onnx(tmp_path / "a.onnx"))
    assert (f32.input_name, f32.output_name, f32.batch_dim, f32.image_size, f32.precision) == \
        ("images", "probs", "batch", 16, "fp32")
    assert f32.fp32_weight_bytes == 4 * (4 * 3 * 3 * 3 + 2 * 4 + 2)
    assert onnx_facts(tiny_onnx(tmp_path / "b.onnx", fp16=True)).precision == "fp16"
    assert onnx_facts(tiny_onnx(tmp_path / "c.onnx", batch=1)).batch_dim == 1
    assert onnx_facts(tiny_onnx(tmp_path / "q.onnx", qdq=True)).precision == "int8"
    with pytest.raises(UsageError, match="no such file"):
        onnx_facts(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(UsageError, match="junk.onnx"):
        onnx_facts(tmp_path / "junk.onnx")


# ---------------------------------------------------------------- timing cache

def test_timing_cache_key_policy(tmp_path: Path) -> None:
    key = timing_cache_key("10.13.3.9", "NVIDIA H100", "9.0", False, ("Linux", "x86_64"))
    # what does not invalidate a cache is not in the key: cuda-python's own CUDA runtime, the driver
    assert not any("cuda" in k for k in key)
    cache = tmp_path / "trt.cache"
    assert load_timing_cache(None, key)[0] == b""
    data, msg = load_timing_cache(cache, key)
    assert data == b"" and "new" in msg
    save_timing_cache(cache, b"\x01tactics", key)
    assert json.loads(cache_key_path(cache).read_text()) == key
    assert load_timing_cache(cache, key)[0] == b"\x01tactics"
    for other in (dict(key, gpu_name="NVIDIA A100"), dict(key, tensorrt_version="10.13.3.10"),
                  dict(key, hardware_compatible=True), dict(key, arch="aarch64")):
        with pytest.raises(UsageError, match="another setup") as e:
            load_timing_cache(cache, other)
        assert str(cache) in str(e.value)
    assert cache.read_bytes() == b"\x01tactics"            # refused, never overwritten
    cache_key_path(cache).unlink()                         # e.g. a cache written by trtexec: no provenance
    with pytest.raises(UsageError, match="no key file"):
        load_timing_cache(cache, key)
    cache_key_path(cache).write_text("{broken")
    with pytest.raises(UsageError, match="unreadable key file"):
        load_timing_cache(cache, key)


# ---------------------------------------------------------------- precision check on inspector JSON

INSPECTOR = REPO / "tests" / "data" / "trt_inspector"


def real_sample(name: str, schema: int = 10, datatype_key: str = "Datatype") -> dict:
    """NVIDIA's 10.x sample; schema 11: 'Format/Datatype' split into 'Format' + `datatype_key`."""
    d = json.loads((INSPECTOR / f"resnet_{name}.json").read_text())
    if schema == 11:
        for layer in d["Layers"]:
            for t in layer.get("Inputs", []) + layer.get("Outputs", []):
                words = t.pop("Format/Datatype").split()
                dt = [w for w in words if w.lower() in ("fp16", "fp32", "int8")]
                t["Format"], t[datatype_key] = " ".join(w for w in words if w not in dt), " ".join(dt)
    return d


@pytest.mark.parametrize("schema, key", [(10, ""), (11, "Datatype"), (11, "DataType"), (11, "datatype")])
def test_real_inspector_samples_by_precision(schema: int, key: str) -> None:
    fp16, fp32, qat = (layer_precisions(real_sample(n, schema, key)) for n in ("fp16", "fp32", "qat"))
    # the ResNet samples: 21 convolutions each (hand count of "CaskConvolution" in the files)
    assert fp16["layers"] == fp32["layers"] == qat["layers"] == 21
    assert (fp16["fp16"], fp32["fp32"], qat["int8"]) == (21, 21, 21)
    assert "21/21" in check_engine_precision("fp16", fp16, 50_000_000, 170_000_000)
    check_engine_precision("fp32", fp32, 170_000_000, 170_000_000)
    check_engine_precision("int8", qat, 50_000_000, 170_000_000)
    with pytest.raises(EnginePrecisionError, match="asked for FP16 but the engine is mostly not FP16"):
        check_engine_precision("fp16", fp32, 170_000_000, 170_000_000)
    with pytest.raises(EnginePrecisionError, match="asked for INT8"):
        check_engine_precision("int8", fp16, 50_000_000, 170_000_000)
    with pytest.raises(EnginePrecisionError, match="asked for FP32"):
        check_engine_precision("fp32", fp16, 50_000_000, 170_000_000)


def test_11x_keys_are_read_not_only_10x() -> None:
    """Without the 11.x keys the split sample has no dtypes at all (the old code read 'DataType' only)."""
    d = real_sample("fp16", 11, "Datatype")
    assert not any("Format/Datatype" in t for layer in d["Layers"] for t in layer.get("Inputs", []))
    for layer in d["Layers"]:
        layer.pop("Weights", None)                       # leave the tensors as the only source
    assert layer_precisions(d)["fp16"] == 21


def _layer(kind: str, fmt: str) -> dict:
    t = {"Name": "t", "Location": "Device", "Dimensions": [8, 64, 56, 56], "Format/Datatype": fmt}
    return {"Name": f"{kind} layer", "LayerType": kind, "Inputs": [t], "Outputs": [dict(t)]}


FP16_10 = "Channel major FP16 format where channel % 8 == 0"
FP32_10 = "Row major linear FP32 format"


def test_fused_myelin_layers_with_fp32_io_count_as_unknown() -> None:
    """A valid FP16 engine whose head went to a Myelin/kgen layer: its I/O is FP32, its casts are inside."""
    layers = [_layer("CaskConvolution", FP16_10) for _ in range(3)] + [_layer("Myelin", FP32_10) for _ in range(4)] \
        + [_layer("kgen", FP32_10)]
    counts = layer_precisions({"Layers": layers})
    assert (counts["layers"], counts["fp16"], counts["fp32"], counts["unknown"]) == (8, 3, 0, 5)
    check_engine_precision("fp16", counts, 85_000_000, 170_000_000)   # 3 of 3 known layers: FP16
    assert layer_precisions({"Layers": [_layer("Myelin", FP16_10)]})["fp16"] == 1


def test_without_layer_dtypes_the_engine_size_decides() -> None:
    names_only = layer_precisions({"Layers": ["conv1 + relu", "fc"]})   # LAYER_NAMES_ONLY verbosity
    dynamic = layer_precisions({"Layers": [_layer("CaskConvolution", "N/A due to dynamic shapes")]})
    assert names_only["layers"] == 0 and dynamic["unknown"] == 1
    for counts in (names_only, dynamic, None):
        with pytest.raises(EnginePrecisionError, match="too large"):
            check_engine_precision("fp16", counts, 168_000_000, 170_000_000)
        assert "0.50x" in check_engine_precision("fp16", counts, 85_000_000, 170_000_000)
        with pytest.raises(EnginePrecisionError, match="asked for INT8"):
            check_engine_precision("int8", counts, 85_000_000, 170_000_000)
        # a version-compatible plan embeds the lean runtime: its size proves nothing either way
        assert "unverified" in check_engine_precision("fp16", counts, 168_000_000, 170_000_000, version_compatible=True)
        assert "too few weights" in check_engine_precision("fp16", counts, 4_000_000, 40_000)   # a toy model


# ---------------------------------------------------------------- the CLI

def test_cli_without_tensorrt_exits_2_saying_what_to_install(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    model = tiny_onnx(tmp_path / "model_fp16.onnx", fp16=True)
    r = subprocess.run([sys.executable, "-m", "export.tensorrt", "--onnx", str(model), "--output",
                        str(tmp_path / "model.plan"), "--fp16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "pip install tensorrt" in lines[0]
    assert "cuda-python" in lines[0] and not (tmp_path / "model.plan").exists()


def test_cli_usage_errors_come_before_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from export.tensorrt import main

    good = tiny_onnx(tmp_path / "model.onnx")
    cases = [(["--onnx", str(tmp_path / "nope.onnx"), "--output", "m.plan"], "nope.onnx: no such file"),
             (["--onnx", str(good), "--output", str(tmp_path / "m.txt")], "--output"),
             (["--onnx", str(good), "--output", "m.plan", "--opt-batch", "64"], "--opt-batch"),
             (["--onnx", str(good), "--output", "m.plan", "--workspace-gib", "0"], "--workspace-gib"),
             (["--onnx", str(tiny_onnx(tmp_path / "fixed.onnx", batch=1)), "--output", "m.plan"], "fixed batch"),
             (["--onnx", str(tiny_onnx(tmp_path / "bare.onnx", metadata=False)), "--output", "m.plan"],
              "no probres.contract")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err
