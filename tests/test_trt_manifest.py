"""runtime.trt_manifest: the TensorRT plan's sidecar, its round trip and the load-time compatibility check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.trt_manifest import (REBUILD_HINT, ManifestError, ManifestMismatch, TrtManifest, check_compatible,
                                  manifest_path, read_manifest, this_platform, write_manifest)

JETSON = ("Linux", "aarch64")


def _manifest(**kw) -> TrtManifest:
    contract = ModelContract(LabelSet.from_categories([(1, "person"), (3, "car"), (85, "clock")]), PreprocessSpec(size=448))
    base = dict(tensorrt_version="10.13.3.9", gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7",
                cuda_driver_version="12.6", cuda_python_version="12.9.0", os="Linux", arch="aarch64", precision="fp16", input_name="images", output_name="probs", min_batch=1,
                opt_batch=8, max_batch=32, image_size=448, onnx_sha256="a" * 64, plan_sha256="b" * 64,
                contract=contract, created="2025-01-01T00:00:00+00:00")
    base.update(kw)
    return TrtManifest(**base)


def test_round_trip_beside_the_plan(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    m = _manifest(hardware_compatible=True, precision="int8", val_metrics={"mAP": 0.81, "CF1": 0.75})
    path = write_manifest(plan, m)
    assert path == manifest_path(plan) == tmp_path / "model.plan.json"
    assert read_manifest(plan) == m and read_manifest(path) == m            # plan path or the .json itself
    d = json.loads(path.read_text())
    assert d["format"] == "probres-trt-manifest/1" and d["contract"]["labels"][2] == {"id": 85, "name": "clock"}
    assert d["min_batch"] == 1 and d["hardware_compatible"] is True and d["version_compatible"] is False
    assert d["val_metrics"] == {"mAP": 0.81, "CF1": 0.75} and (d["os"], d["arch"]) == JETSON
    assert d["cuda_driver_version"] == "12.6" and d["cuda_python_version"] == "12.9.0" and "cuda_version" not in d
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan.json"]   # no temp file left behind


def test_optional_fields_default_when_absent(tmp_path: Path) -> None:
    d = _manifest().to_dict()
    for k in ("hardware_compatible", "version_compatible", "created", "os", "arch", "val_metrics",
              "cuda_driver_version", "cuda_python_version", "input_dtype"):
        del d[k]
    d["cuda_version"] = "12.6"                     # a manifest written before the fields were split
    (tmp_path / "m.plan.json").write_text(json.dumps(d))
    m = read_manifest(tmp_path / "m.plan")
    assert (m.hardware_compatible, m.version_compatible, m.created, m.os, m.arch, m.val_metrics, m.input_dtype) == \
        (False, False, "", "", "", None, "float32")
    check_compatible(m, "10.13.3.9", "NVIDIA Jetson AGX Orin", "8.7", ("Linux", "x86_64"))   # unrecorded: not checked


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("tensorrt_version"), "missing key 'tensorrt_version'"),
    (lambda d: d.update(min_batch="1"), "min_batch must be an integer"),
    (lambda d: d.update(max_batch=True), "max_batch must be an integer"),
    (lambda d: d.update(hardware_compatible="yes"), "hardware_compatible must be a bool"),
    (lambda d: d.update(precision="bf16"), "precision"),
    (lambda d: d.update(compute_capability="sm_87"), "compute_capability"),
    (lambda d: d.update(opt_batch=64), "batch profile"),
    (lambda d: d.update(image_size=224), "image_size 224"),
    (lambda d: d.update(tensorrt_version="ten"), "TensorRT version"),
    (lambda d: d["contract"].pop("labels"), "bad contract"),
    (lambda d: d.update(format="other/1"), "not a probres-trt-manifest/1"),
    (lambda d: d.update(val_metrics=[0.8]), "val_metrics must be a JSON object"),
    (lambda d: d.update(arch=64), "arch must be a str"),
])
def test_malformed_manifest_names_the_file(tmp_path: Path, mutate, needle: str) -> None:
    d = _manifest().to_dict()
    mutate(d)
    path = tmp_path / "model.plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path / "model.plan")
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_or_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"model\.plan\.json: no TensorRT manifest.*export\.tensorrt"):
        read_manifest(tmp_path / "model.plan")
    (tmp_path / "model.plan.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        read_manifest(tmp_path / "model.plan")


def test_exact_match_and_same_architecture_are_compatible() -> None:
    m = _manifest()
    check_compatible(m, "10.13.3.9", "NVIDIA Jetson AGX Orin", "8.7", JETSON)
    check_compatible(m, "10.13.3.9", "NVIDIA Jetson Orin NX", "8.7", JETSON)        # another SKU, same CC: fine


def test_tensorrt_version_must_match_exactly() -> None:
    for other in ("10.13.3.10", "10.12.0.36", "11.1.0.1"):
        with pytest.raises(ManifestMismatch) as e:
            check_compatible(_manifest(), other, "NVIDIA Jetson AGX Orin", "8.7", JETSON)
        msg = str(e.value)
        assert "10.13.3.9" in msg and other in msg and REBUILD_HINT in msg and "python -m export.tensorrt" in msg


def test_compute_capability_must_match() -> None:
    with pytest.raises(ManifestMismatch) as e:
        check_compatible(_manifest(), "10.13.3.9", "NVIDIA GeForce RTX 4090", "8.9", JETSON)
    msg = str(e.value)
    assert "Jetson AGX Orin" in msg and "8.7" in msg and "RTX 4090" in msg and "8.9" in msg and REBUILD_HINT in msg


@pytest.mark.parametrize("built, here, ok", [
    ("10.8.0.43", "10.13.3.9", True),      # newer runtime, same major
    ("10.13.3.9", "10.13.3.9", True),
    ("10.13.3.9", "10.8.0.43", False),     # older runtime
    ("10.16.1.11", "11.1.0.7", True),      # 10 -> 11 is the supported cross-major pair
    ("8.6.1.6", "10.13.3.9", True),        # 8 -> 10 as well
    ("8.6.1.6", "11.1.0.7", False),        # but not 8 -> 11
    ("11.1.0.7", "10.16.1.11", False),
])
def test_version_compatible_plans(built: str, here: str, ok: bool) -> None:
    m = _manifest(tensorrt_version=built, version_compatible=True)
    if ok:
        check_compatible(m, here, "NVIDIA Jetson AGX Orin", "8.7", JETSON)
    else:
        with pytest.raises(ManifestMismatch, match="version-compatible"):
            check_compatible(m, here, "NVIDIA Jetson AGX Orin", "8.7", JETSON)


def test_hardware_compatible_plans_run_on_ampere_and_newer() -> None:
    m = _manifest(gpu_name="NVIDIA H100", compute_capability="9.0", hardware_compatible=True)
    for cc in ("8.0", "8.6", "8.7", "9.0", "12.0"):
        check_compatible(m, "10.13.3.9", "some GPU", cc, JETSON)
    with pytest.raises(ManifestMismatch, match="compute capability >= 8.0.*7.5"):
        check_compatible(m, "10.13.3.9", "Tesla T4", "7.5", JETSON)
    # compute capability 10.0 vs 9.0: compared as numbers, not strings
    with pytest.raises(ManifestMismatch):
        check_compatible(dataclasses.replace(m, hardware_compatible=False), "10.13.3.9", "B200", "10.0", JETSON)


def test_platform_mismatch_is_refused_even_when_hardware_compatible() -> None:
    """An x86-64 hardware-compatible plan passes the GPU check on an Orin (CC 8.7): the platform must not."""
    m = _manifest(gpu_name="NVIDIA A100", compute_capability="8.0", hardware_compatible=True, os="Linux", arch="x86_64")
    check_compatible(m, "10.13.3.9", "NVIDIA RTX A6000", "8.6", ("Linux", "x86_64"))
    with pytest.raises(ManifestMismatch) as e:
        check_compatible(m, "10.13.3.9", "NVIDIA Jetson AGX Orin", "8.7", JETSON)
    assert "built on Linux x86_64, this is Linux aarch64" in str(e.value) and REBUILD_HINT in str(e.value)
    with pytest.raises(ManifestMismatch, match="Windows"):
        check_compatible(m, "10.13.3.9", "NVIDIA RTX A6000", "8.6", ("Windows", "x86_64"))


def test_this_platform_normalizes_the_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    for machine, want in (("AMD64", "x86_64"), ("x86_64", "x86_64"), ("arm64", "aarch64"), ("aarch64", "aarch64")):
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert this_platform()[1] == want
