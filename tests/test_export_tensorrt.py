"""export.tensorrt / export.trt_build: everything that does not need TensorRT, plus the CLI's wiring.

TensorRT cannot be installed on the machines this is developed on. The TensorRT-free logic is tested
directly; the build itself runs against a small stand-in `tensorrt` module that implements only the
documented 10.x/11.x calls export.tensorrt makes (FakeTRT below). That checks the dispatch and the
file handling, not that real TensorRT accepts these calls: that needs a GPU machine with TensorRT.
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


def tiny_onnx(path: Path, batch: int | str = "batch", fp16: bool = False, metadata: bool = True) -> Path:
    """images [N,3,16,16] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Sigmoid -> probs [N,2]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (2, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["l"], transB=1), helper.make_node("Sigmoid", ["l"], ["probs"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 16, 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata:
        model.metadata_props.add(key="probres.contract", value=CONTRACT.to_json())
    if fp16:
        model = convert_fp16(model)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------- version dispatch

def test_parse_version() -> None:
    assert parse_version("10.12.0.36") == (10, 12, 0, 36) and parse_version("11.1") == (11, 1)
    for bad in ("", "10.x", "v10.12", None):
        with pytest.raises(UsageError):
            parse_version(bad)  # type: ignore[arg-type]


def test_tensorrt_10_8_is_weakly_typed_with_the_fp16_flag() -> None:
    p = build_plan("10.8.0.43", "fp32", fp16=True)
    assert (p.mode, p.network_flags, p.fp16_flag, p.disable_tf32, p.precision) == ("weak", "none", True, False, "fp16")
    assert build_plan("10.11.99", "fp16", fp16=True).mode == "weak"           # an FP16 graph works there too
    p = build_plan("10.8.0.43", "fp32", fp16=False)
    assert (p.fp16_flag, p.disable_tf32, p.precision) == (False, True, "fp32")


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
    with pytest.raises(UsageError, match="no such file"):
        onnx_facts(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(UsageError, match="junk.onnx"):
        onnx_facts(tmp_path / "junk.onnx")


# ---------------------------------------------------------------- timing cache

def test_timing_cache_key_policy(tmp_path: Path) -> None:
    key = timing_cache_key("10.13.3.9", "NVIDIA H100", "9.0", "12.8")
    cache = tmp_path / "trt.cache"
    assert load_timing_cache(None, key)[0] == b""
    data, msg = load_timing_cache(cache, key)
    assert data == b"" and "new" in msg
    save_timing_cache(cache, b"\x01tactics", key)
    assert json.loads(cache_key_path(cache).read_text()) == key
    assert load_timing_cache(cache, key)[0] == b"\x01tactics"
    for other in (dict(key, gpu_name="NVIDIA A100"), dict(key, tensorrt_version="10.13.3.10"),
                  dict(key, hardware_compatible=True)):
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


# ---------------------------------------------------------------- FP16 check on inspector JSON

def _layer(kind: str, fmt: str, schema: int = 10) -> dict:
    tensor = {"Name": "t", "Location": "Device", "Dimensions": [8, 64, 56, 56]}
    if schema == 10:
        tensor["Format/Datatype"] = fmt
    else:   # 11.x: Format and DataType are separate fields
        tensor.update(Format=fmt.split("|")[0], DataType=fmt.split("|")[1])
    return {"Name": f"{kind} layer", "LayerType": kind, "Inputs": [tensor], "Outputs": [dict(tensor)]}


FP16_10 = "Channel major FP16 format where channel % 8 == 0"
FP32_10 = "Row major linear FP32 format"


def test_fp16_engine_by_inspector_10x_schema() -> None:
    layers = [_layer("CaskConvolution", FP16_10) for _ in range(10)] + [_layer("CaskGemmConvolution", FP32_10),
                                                                       _layer("Reformat", FP32_10)]
    counts = layer_precisions(json.dumps({"Layers": layers, "Bindings": ["images", "probs"]}))
    assert (counts["layers"], counts["fp16"], counts["fp32"]) == (11, 10, 1)     # Reformat is not compute
    assert "10/11" in check_engine_precision("fp16", counts, 50_000_000, 170_000_000)


def test_fp16_engine_by_inspector_11x_schema() -> None:
    layers = [_layer("CaskConvolution", "Channel major format where channel % 8 == 0|Half", 11) for _ in range(5)]
    counts = layer_precisions({"Layers": layers, "I/O Tensors": []})
    assert (counts["layers"], counts["fp16"]) == (5, 5)


def test_fp32_engine_where_fp16_was_asked_fails_loudly() -> None:
    layers = [_layer("CaskConvolution", FP32_10) for _ in range(10)] + [_layer("CaskConvolution", "Float|Float", 11)]
    counts = layer_precisions({"Layers": layers})
    assert (counts["fp32"], counts["fp16"]) == (11, 0)
    with pytest.raises(EnginePrecisionError, match="asked for FP16 but the engine is mostly FP32"):
        check_engine_precision("fp16", counts, 170_000_000, 170_000_000)
    check_engine_precision("fp32", counts, 170_000_000, 170_000_000)
    with pytest.raises(EnginePrecisionError, match="asked for FP32"):
        check_engine_precision("fp32", layer_precisions({"Layers": [_layer("CaskConvolution", FP16_10)]}), 1, 1)


def test_without_layer_dtypes_the_engine_size_decides() -> None:
    names_only = layer_precisions({"Layers": ["conv1 + relu", "fc"]})   # LAYER_NAMES_ONLY verbosity
    dynamic = layer_precisions({"Layers": [_layer("CaskConvolution", "N/A due to dynamic shapes")]})
    assert names_only["layers"] == 0 and dynamic["unknown"] == 1
    for counts in (names_only, dynamic, None):
        with pytest.raises(EnginePrecisionError, match="as large as FP32"):
            check_engine_precision("fp16", counts, 168_000_000, 170_000_000)
        assert "0.50x" in check_engine_precision("fp16", counts, 85_000_000, 170_000_000)


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


class FakeTRT:
    """The documented TensorRT calls export.tensorrt makes, recording what it asked for."""

    def __init__(self, version: str, engine_dtype: str = "Half") -> None:
        self.calls: list[tuple] = []
        self.engine_dtype = engine_dtype
        calls = self.calls
        ns = types.SimpleNamespace
        mod = types.ModuleType("tensorrt")
        mod.__version__ = version
        major = int(version.split(".")[0])
        flags = dict(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
        if major == 10:
            flags["FP16"] = "FP16"                    # removed in 11.0
        mod.BuilderFlag = ns(**flags)
        mod.NetworkDefinitionCreationFlag = ns(STRONGLY_TYPED=0)   # deprecated (ignored) in 11, still present
        mod.MemoryPoolType, mod.ProfilingVerbosity = ns(WORKSPACE="WORKSPACE"), ns(DETAILED="DETAILED")
        mod.HardwareCompatibilityLevel = ns(AMPERE_PLUS="AMPERE_PLUS")
        mod.DataType, mod.LayerInformationFormat = ns(FLOAT="FLOAT", HALF="HALF"), ns(JSON="JSON")
        mod.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        fake = self

        class Config:
            profiling_verbosity = None
            hardware_compatibility_level = None
            set_memory_pool_limit = lambda self, pool, n: calls.append(("pool", pool, n))
            set_flag = lambda self, f: calls.append(("set_flag", f))
            clear_flag = lambda self, f: calls.append(("clear_flag", f))
            add_optimization_profile = lambda self, p: calls.append(("profile", p.shape))
            create_timing_cache = lambda self, b: calls.append(("cache_in", bytes(b))) or "cache"
            set_timing_cache = lambda self, c, ignore: calls.append(("set_cache", ignore)) or True
            get_timing_cache = lambda self: ns(serialize=lambda: b"new-cache")

        class Profile:
            shape = None
            set_shape = lambda self, name, *s: setattr(self, "shape", (name, *s))

        class Builder:
            def __init__(self, logger): pass
            create_network = lambda self, flags: calls.append(("network_flags", flags)) or "net"
            create_builder_config = lambda self: Config()
            create_optimization_profile = lambda self: Profile()
            build_serialized_network = lambda self, net, config: b"PLAN" * 100

        class OnnxParser:
            num_errors = 0
            def __init__(self, net, logger): pass
            parse_from_file = lambda self, path: calls.append(("parse", path)) or True

        def inspector_json() -> str:
            t = {"Format/Datatype": f"Row major linear {'FP16' if fake.engine_dtype == 'Half' else 'FP32'} format"}
            return json.dumps({"Layers": [{"LayerType": "CaskConvolution", "Inputs": [t], "Outputs": [t]}] * 3})

        engine = ns(num_io_tensors=2, get_tensor_name=["images", "probs"].__getitem__,
                    get_tensor_dtype=lambda name: "FLOAT",
                    create_execution_context=lambda: ns(set_input_shape=lambda n, s: calls.append(("ctx_shape", s))),
                    create_engine_inspector=lambda: ns(execution_context=None,
                                                       get_engine_information=lambda fmt: inspector_json()))
        mod.Builder, mod.OnnxParser = Builder, OnnxParser
        mod.Runtime = lambda logger: ns(deserialize_cuda_engine=lambda b: engine)
        self.module = mod


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int = 1) -> None:
    ok = 0
    props = types.SimpleNamespace(name=b"NVIDIA Fake Orin\x00\x00", major=8, minor=7)
    rt = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=ok), cudaGetDeviceCount=lambda: (ok, devices),
        cudaGetDevice=lambda: (ok, 0), cudaGetDeviceProperties=lambda d: (ok, props),
        cudaRuntimeGetVersion=lambda: (ok, 12060), cudaGetErrorName=lambda e: (ok, b"cudaErrorNoDevice"))
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = rt, bindings
    for name, m in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, m)


@pytest.mark.parametrize("version, onnx_fp16, expect_flags, expect_fp16_flag", [
    ("10.8.0.43", False, 0, True),      # weak typing + BuilderFlag.FP16 on the FP32 graph
    ("10.13.3.9", True, 1, False),      # 1 << STRONGLY_TYPED, FP16 graph
    ("11.1.0.7", True, 0, False),       # always strongly typed, no flag
])
def test_build_wiring_with_a_stand_in_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str,
                                               onnx_fp16: bool, expect_flags: int, expect_fp16_flag: bool) -> None:
    from export.tensorrt import main

    fake = FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    _fake_cuda(monkeypatch)
    model = tiny_onnx(tmp_path / "model.onnx", fp16=onnx_fp16)
    plan, cache = tmp_path / "out" / "model.plan", tmp_path / "trt.cache"
    assert main(["--onnx", str(model), "--output", str(plan), "--fp16", "--opt-batch", "4", "--max-batch", "16",
                 "--timing-cache", str(cache)]) == 0
    assert ("network_flags", expect_flags) in fake.calls
    assert (("set_flag", "FP16") in fake.calls) == expect_fp16_flag
    assert ("profile", ("images", (1, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))) in fake.calls
    assert ("set_cache", False) in fake.calls and ("ctx_shape", (4, 3, 16, 16)) in fake.calls
    assert not any(c[0] == "clear_flag" for c in fake.calls)          # TF32 stays on for FP16 builds
    assert plan.read_bytes() == b"PLAN" * 100
    m = read_manifest(plan)
    assert (m.tensorrt_version, m.gpu_name, m.compute_capability, m.cuda_version) == (version, "NVIDIA Fake Orin", "8.7", "12.6")
    assert (m.precision, m.min_batch, m.opt_batch, m.max_batch, m.image_size) == ("fp16", 1, 4, 16, 16)
    assert m.onnx_sha256 == sha256_file(model) and m.plan_sha256 == sha256_file(plan) and m.contract == CONTRACT
    assert cache.read_bytes() == b"new-cache" and json.loads(cache_key_path(cache).read_text())["gpu_name"] == "NVIDIA Fake Orin"


def test_stand_in_fp32_engine_for_fp16_request_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from export.tensorrt import main

    fake = FakeTRT("10.13.3.9", engine_dtype="Float")
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    _fake_cuda(monkeypatch)
    plan = tmp_path / "model.plan"
    assert main(["--onnx", str(tiny_onnx(tmp_path / "m.onnx", fp16=True)), "--output", str(plan), "--fp16"]) == 1
    assert "asked for FP16" in capsys.readouterr().err and not plan.exists()


def test_stand_in_fp32_reference_build_disables_tf32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from export.tensorrt import main

    fake = FakeTRT("10.13.3.9", engine_dtype="Float")
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    _fake_cuda(monkeypatch)
    plan = tmp_path / "model.plan"
    assert main(["--onnx", str(tiny_onnx(tmp_path / "m.onnx")), "--output", str(plan)]) == 0
    assert ("clear_flag", "TF32") in fake.calls and read_manifest(plan).precision == "fp32"


def test_stand_in_without_gpu_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    from export.tensorrt import main

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("10.13.3.9").module)
    _fake_cuda(monkeypatch, devices=0)
    with pytest.raises(SystemExit) as e:
        main(["--onnx", str(tiny_onnx(tmp_path / "m.onnx")), "--output", str(tmp_path / "m.plan")])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
