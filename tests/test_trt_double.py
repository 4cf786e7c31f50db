"""The TensorRT double bites: what real TensorRT would reject, the double rejects too, per release.

    python -m pytest -q tests/test_trt_double.py

Also checks the trimmed API data against the full data in ../shared/trt-api when that folder is
there (skipped in a clone without it), and a few facts the project's code depends on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_double import RELEASES, load_api, make_tensorrt, trim

FULL = Path(__file__).resolve().parents[2] / "shared" / "trt-api"


def _builder(trt):
    return trt.Builder(trt.Logger(trt.Logger.WARNING))


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_a_misspelled_attribute_fails_on_read_and_on_write(release: str) -> None:
    trt, _ = make_tensorrt(release)
    config = _builder(trt).create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED           # a real property: fine
    with pytest.raises(AttributeError):
        config.profiling_verbosty = trt.ProfilingVerbosity.DETAILED        # misspelled write
    with pytest.raises(AttributeError):
        config.hardware_compatiblity_level                                  # misspelled read
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runtime.engine_host_code_allowed = True
    with pytest.raises(AttributeError):
        runtime.engine_host_code_allowd = True
    with pytest.raises(AttributeError):
        trt.BuilderFlag.FP61
    with pytest.raises(AttributeError):
        trt.BuilderFlag.NEW = 3


def test_a_removed_enum_member_fails() -> None:
    """BuilderFlag.FP16 exists in 10.x and is gone in 11.x; deleting it from the data removes it."""
    assert make_tensorrt("10.13.3")[0].BuilderFlag.FP16 is not None
    with pytest.raises(AttributeError):
        make_tensorrt("11.1")[0].BuilderFlag.FP16
    with pytest.raises(AttributeError):
        make_tensorrt("11.1")[0].NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    trt, _ = make_tensorrt("10.13.3", edit=lambda api: api["enums"]["BuilderFlag"].remove("TF32"))
    with pytest.raises(AttributeError):
        trt.BuilderFlag.TF32


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_a_wrong_keyword_or_arity_fails(release: str) -> None:
    trt, _ = make_tensorrt(release)
    config = _builder(trt).create_builder_config()
    config.set_memory_pool_limit(pool=trt.MemoryPoolType.WORKSPACE, pool_size=1 << 20)   # the real names
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_memory_pool_limit(pool=trt.MemoryPoolType.WORKSPACE, size=1 << 20)     # wrong keyword
    with pytest.raises(TypeError):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)                        # missing argument
    with pytest.raises(TypeError):
        config.set_timing_cache(None)                                                     # ignore_mismatch missing
    with pytest.raises(TypeError):
        _builder(trt).create_network(0, 1)                                                # one flags word only
    with pytest.raises(TypeError):
        config.set_flag("FP16")                                                           # not a BuilderFlag
    with pytest.raises(TypeError):
        config.hardware_compatibility_level = "AMPERE_PLUS"                               # not the enum
    with pytest.raises(TypeError):
        trt.Runtime(trt.Logger()).engine_host_code_allowed = 1                            # a bool property
    with pytest.raises(TypeError, match="No constructor"):
        trt.ICudaEngine()
    with pytest.raises(TypeError):
        trt.Runtime()                                                                     # Runtime(logger)


def test_values_the_code_depends_on() -> None:
    """STRONGLY_TYPED is 1 in the 10.x headers (flags word 2); nptype refuses BF16/FP8 (no numpy type)."""
    for release in ("10.3", "10.13.3"):
        trt, _ = make_tensorrt(release)
        assert 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 2
    trt, _ = make_tensorrt("11.1")
    assert "STRONGLY_TYPED" in trt.NetworkDefinitionCreationFlag.__members__          # a Python name only
    assert "STRONGLY_TYPED" not in load_api("11.1")["enum_values_from_headers"]["NetworkDefinitionCreationFlag"]
    assert trt.nptype(trt.DataType.HALF).__name__ == "float16"
    for dt in (trt.DataType.BF16, trt.DataType.FP8, trt.DataType.FP4):
        with pytest.raises(TypeError):
            trt.nptype(dt)
    assert not hasattr(make_tensorrt("10.3")[0].DataType, "FP4")                       # FP4 came later


@pytest.mark.skipif(not FULL.is_dir(), reason=f"the full API data ({FULL}) is not beside this clone")
def test_trimmed_data_is_the_full_data_trimmed() -> None:
    for fname, _ in RELEASES.values():
        full = json.loads((FULL / fname).read_text())
        assert trim(full) == json.loads((Path(__file__).parent / "data" / "trt_api" / fname).read_text()), fname
