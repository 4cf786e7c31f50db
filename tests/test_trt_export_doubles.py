"""`python -m export.tensorrt` end to end against strict doubles of TensorRT 10.3, 10.13.3 and 11.1.

    python -m pytest -q tests/test_trt_export_doubles.py

The doubles (tests/trt_double.py) reject any attribute, keyword or enum member the release lacks;
cuda-python is tests/cudart_double.py. What this proves: every TensorRT call the export makes
exists with those arguments in that release, and each documented failure (parse errors, a build
that returns None, a refused timing cache, ...) ends as one line and an exit code with nothing
written. What it cannot prove: that a real TensorRT builds this engine (never run here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cudart_double
import trt_double
from export.trt_build import cache_key_path
from runtime.fileio import sha256_file
from runtime.trt_manifest import read_manifest, this_platform
from test_export_tensorrt import CONTRACT, tiny_onnx

ALL = ("10.3", "10.13.3", "11.1")
METRICS = {"mAP": 0.5, "CF1": 0.4}


def export(monkeypatch, tmp_path: Path, release: str, argv: list[str], scenario=None, cudart=None, onnx=None,
           **onnx_kw):
    """Run export.tensorrt's main against the doubles; returns (exit code, scenario, plan path)."""
    from export.tensorrt import main

    _, sc = trt_double.install(monkeypatch, release, scenario)
    cudart_double.install(monkeypatch, cudart or cudart_double.FakeCudart())
    model = onnx or tiny_onnx(tmp_path / "model.onnx", val_metrics=METRICS, **onnx_kw)
    plan = tmp_path / "out" / "model.plan"
    rc = main(["--onnx", str(model), "--output", str(plan), "--opt-batch", "4", "--max-batch", "8", *argv])
    return rc, sc, plan


def built(sc) -> dict:
    (plan,) = [c[1] for c in sc.calls if c[0] == "build"]
    return plan


@pytest.mark.parametrize("release, flags_word", [("10.3", 2), ("10.13.3", 2), ("11.1", 0)])
def test_fp16_engine_from_the_fp16_onnx(monkeypatch, tmp_path, release, flags_word):
    cache = tmp_path / "trt.cache"
    rc, sc, plan = export(monkeypatch, tmp_path, release, ["--fp16", "--timing-cache", str(cache)], fp16=True)
    assert rc == 0
    b = built(sc)
    # 10.x: 1 << STRONGLY_TYPED (header value 1) = 2, also on 10.0-10.11 (the FP16 graph carries its precision);
    # 11.x: 0, every network is strongly typed
    assert (b["network_flags"], b["strong"], b["precision"]) == (flags_word, True, "fp16")
    assert "FP16" not in b["flags"] and ("clear_flag", "TF32") not in sc.calls
    assert b["profile"] == [(1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16)] and b["verbosity"] == "DETAILED"
    assert ("set_timing_cache", False) in sc.calls
    m = read_manifest(plan)
    assert (m.tensorrt_version, m.gpu_name, m.compute_capability) == (trt_double.RELEASES[release][1],
                                                                      "NVIDIA Fake Orin", "8.7")
    assert (m.cuda_driver_version, m.cuda_python_version, (m.os, m.arch)) == ("12.6", "12.9.0", this_platform())
    assert (m.precision, m.min_batch, m.opt_batch, m.max_batch, m.image_size) == ("fp16", 1, 4, 8, 16)
    assert m.val_metrics == METRICS and m.contract == CONTRACT and m.plan_sha256 == sha256_file(plan)
    assert cache.read_bytes() == b"cache:" and json.loads(cache_key_path(cache).read_text())["arch"] == this_platform()[1]


def test_the_manifest_records_an_fp16_input(monkeypatch, tmp_path):
    """export.onnx --fp16 writes an FP16-input graph: the plan's manifest says so (Triton's config reads it)."""
    rc, _, plan = export(monkeypatch, tmp_path, "10.13.3", ["--fp16"], fp16=True, half_io=True)
    assert rc == 0 and read_manifest(plan).input_dtype == "float16"
    (tmp_path / "b").mkdir()
    rc, _, plan32 = export(monkeypatch, tmp_path / "b", "10.13.3", [])
    assert rc == 0 and read_manifest(plan32).input_dtype == "float32"


@pytest.mark.parametrize("release", ALL)
def test_fp32_reference_engine(monkeypatch, tmp_path, release):
    rc, sc, plan = export(monkeypatch, tmp_path, release, [])
    assert rc == 0 and ("clear_flag", "TF32") in sc.calls
    assert (built(sc)["precision"], built(sc)["strong"], read_manifest(plan).precision) == ("fp32", True, "fp32")


def test_weak_fp16_only_on_10_0_to_10_11_with_the_fp32_onnx(monkeypatch, tmp_path, capsys):
    rc, sc, plan = export(monkeypatch, tmp_path, "10.3", ["--fp16"])
    assert rc == 0 and (built(sc)["network_flags"], built(sc)["flags"], built(sc)["precision"]) == (0, ["FP16"], "fp16")
    (tmp_path / "b").mkdir()
    rc, sc, plan = export(monkeypatch, tmp_path / "b", "10.13.3", ["--fp16"])
    assert rc == 2 and "strongly typed" in capsys.readouterr().err and not plan.exists()


@pytest.mark.parametrize("release", ALL)
def test_int8_qdq_onnx_builds_strongly_typed_and_is_checked_as_int8(monkeypatch, tmp_path, release):
    rc, sc, plan = export(monkeypatch, tmp_path, release, [], qdq=True)
    assert rc == 0 and built(sc)["strong"] and read_manifest(plan).precision == "int8"
    assert ("clear_flag", "TF32") not in sc.calls


@pytest.mark.parametrize("release", ALL)
def test_hardware_and_version_compatible_build(monkeypatch, tmp_path, release):
    rc, sc, plan = export(monkeypatch, tmp_path, release, ["--fp16", "--hardware-compatible", "--version-compatible"],
                          fp16=True)
    assert rc == 0
    b = built(sc)
    assert b["hardware"] == "AMPERE_PLUS" and b["version_compatible"] and "VERSION_COMPATIBLE" in b["flags"]
    assert ("deserialize", "fp16") in sc.calls                 # engine_host_code_allowed was set before it
    m = read_manifest(plan)
    assert m.hardware_compatible and m.version_compatible


def test_hardware_compatible_needs_an_ampere_build_gpu(monkeypatch, tmp_path, capsys):
    rc, sc, plan = export(monkeypatch, tmp_path, "10.13.3", ["--hardware-compatible"],
                          cudart=cudart_double.FakeCudart(name=b"Tesla T4", cc=(7, 5)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "compute capability 8.0 or later" in err and "Tesla T4 is 7.5" in err and "\n" not in err
    assert not [c for c in sc.calls if c[0] == "create_network"] and not plan.exists()


@pytest.mark.parametrize("release", ALL)
@pytest.mark.parametrize("scenario, needle", [
    (dict(parse_errors=["Unsupported ONNX op: Frobnicate"]), "the ONNX parser failed: Unsupported ONNX op: Frobnicate"),
    (dict(build_returns_none=True), "build_serialized_network failed"),
    (dict(timing_cache_refused=True), "rejected the timing cache"),
    (dict(timing_cache_none=True), "could not read the timing cache"),
    (dict(profile_index=-1), "add_optimization_profile returned -1"),
    (dict(inspector=trt_double.inspector_sample("fp32", 10)), "asked for FP16 but the engine is mostly not FP16"),
])
def test_failures_are_one_line_and_write_nothing(monkeypatch, tmp_path, capsys, release, scenario, needle):
    cache = tmp_path / "trt.cache"
    rc, sc, plan = export(monkeypatch, tmp_path, release, ["--fp16", "--timing-cache", str(cache)],
                          scenario=trt_double.Scenario(**scenario), fp16=True)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error:") and needle in err and "\n" not in err
    assert not plan.exists() and not plan.with_name("model.plan.json").exists() and not cache.exists()


def test_bad_profile_shape_is_a_build_error(monkeypatch, tmp_path, capsys):
    """set_shape raises on bad shapes: the export turns it into one line (here a profile the double refuses)."""
    import export.tensorrt as et

    monkeypatch.setattr(et, "profile_shapes", lambda *a: ((4, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16)))
    rc, _, plan = export(monkeypatch, tmp_path, "11.1", ["--fp16"], fp16=True)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "refused the profile" in err and "\n" not in err and not plan.exists()


@pytest.mark.parametrize("cudart, needle", [
    (cudart_double.FakeCudart(devices=0), "no CUDA GPU is visible"),
    (cudart_double.FakeCudart(error=cudart_double.cudaError_t.cudaErrorInsufficientDriver), "older than cuda-python"),
])
def test_no_usable_gpu_exits_2(monkeypatch, tmp_path, capsys, cudart, needle):
    with pytest.raises(SystemExit) as e:
        export(monkeypatch, tmp_path, "10.3", [], cudart=cudart)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and "\n" not in err


def test_the_manifest_records_the_checkpoint_the_onnx_came_from(monkeypatch, tmp_path):
    """Issue 24: the plan's lineage reaches the checkpoint (probres-eval checks a reference against it)."""
    import onnx

    from runtime.provenance import lineage, relation

    src = tiny_onnx(tmp_path / "model.onnx", val_metrics=METRICS)
    m = onnx.load(str(src))
    m.metadata_props.add(key="probres.checkpoint_sha256", value="c" * 64)
    onnx.save(m, str(src))
    rc, _, plan = export(monkeypatch, tmp_path, "10.13.3", [], onnx=src)
    assert rc == 0 and read_manifest(plan).checkpoint_sha256 == "c" * 64
    made = lineage(plan)
    assert made.kind == "plan" and made.checkpoint_sha256 == "c" * 64 and sha256_file(src) in made.sources
    assert relation(made, lineage(src)) == "source"
