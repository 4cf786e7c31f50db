"""The TensorRT backend's cuda-python calling conventions, against the REAL cuda-python (no GPU needed).

    python -m pytest -q tests/test_trt_cuda_python.py

cuda-python's bindings import and run without a GPU: every call returns a tuple whose first item
is a cudaError_t (cudaErrorInsufficientDriver or cudaErrorNoDevice here). This checks that the
backend's helpers unpack those tuples, name the errors, read cudaDeviceProp.name as bytes, and
that the cuda-python double (tests/cudart_double.py) takes exactly the real functions' parameters
and the enum members the backend uses exist in the real module.
"""

from __future__ import annotations

import inspect

import pytest

from cudart_double import SIGNATURES
from runtime.backends import tensorrt as trtmod
from runtime.backends.base import BackendError

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) is in the dev extra")


@pytest.mark.parametrize("fn", sorted(SIGNATURES))
def test_the_double_takes_exactly_the_real_parameters(fn: str) -> None:
    real = tuple(inspect.signature(getattr(rt, fn)).parameters)
    assert real == SIGNATURES[fn], f"{fn}: real cuda-python takes {real}"


def test_names_the_backend_uses_exist_in_the_real_module() -> None:
    assert trtmod.import_cudart() is rt                          # cuda.bindings.runtime is preferred
    for name in ("cudaStreamNonBlocking", "cudaEventDisableTiming"):
        assert isinstance(int(getattr(rt, name)), int)
    assert {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"} <= set(rt.cudaMemcpyKind.__members__)
    assert {"cudaSuccess", "cudaErrorInsufficientDriver", "cudaErrorNoDevice"} <= set(rt.cudaError_t.__members__)


def test_every_call_returns_an_error_tuple_and_cuda_check_names_it() -> None:
    res = rt.cudaMalloc(1024)
    assert isinstance(res, tuple) and isinstance(res[0], rt.cudaError_t)
    if res[0] == rt.cudaError_t.cudaSuccess:
        pytest.skip("a GPU is usable here: the no-GPU conventions cannot be seen")
    with pytest.raises(BackendError, match=rf"CUDA cudaMalloc\(1024 bytes\) failed: {res[0].name}"):
        trtmod.cuda_check(rt, res, "cudaMalloc(1024 bytes)")
    no_value = rt.cudaStreamSynchronize(0)                      # calls without a value: a 1-tuple
    assert isinstance(no_value, tuple) and len(no_value) == 1
    assert trtmod.error_name(rt, res[0]) == res[0].name          # cudaGetErrorName gives bytes; decoded
    assert isinstance(rt.cudaGetErrorName(res[0])[1], bytes)


def test_device_prop_name_is_bytes_and_the_identity_error_is_specific() -> None:
    assert isinstance(rt.cudaDeviceProp().name, bytes)
    err = rt.cudaGetDevice()[0]
    if err == rt.cudaError_t.cudaSuccess:
        pytest.skip("a GPU is usable here")
    with pytest.raises(BackendError) as e:
        trtmod.gpu_identity(rt)
    msg = str(e.value)
    if err == rt.cudaError_t.cudaErrorInsufficientDriver and rt.cudaDriverGetVersion()[1] == 0:
        assert "no NVIDIA driver loaded" in msg                  # this machine: no driver at all
    elif err == rt.cudaError_t.cudaErrorInsufficientDriver:
        # an old driver: what it has, what this cuda-python needs, what to install
        assert "older than cuda-python" in msg and trtmod.cuda_python_version() in msg and "gpu-cu" in msg
    else:
        assert err.name in msg
    assert "\n" not in msg


def test_versions_are_what_they_say() -> None:
    """cudaRuntimeGetVersion is cuda-python's own (statically linked) CUDA: the manifest does not record it."""
    import cuda.bindings

    assert trtmod.cuda_python_version() == cuda.bindings.__version__
    err, v = rt.cudaDriverGetVersion()
    assert err == rt.cudaError_t.cudaSuccess                    # answers even without a driver: 0
    assert trtmod.driver_cuda_version(rt) == ("none" if v == 0 else f"{v // 1000}.{(v % 1000) // 10}")


def test_backend_and_export_on_the_real_cuda_python_stop_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    """The TensorRT double with the real cuda-python: both stop at the first cudart call, one line, exit 2."""
    import sys

    import cuda
    import cuda.bindings

    from export.tensorrt import main
    from test_export_tensorrt import tiny_onnx
    from test_trt_backend_logic import build

    plan, *_ = build(monkeypatch, tmp_path, "10.13.3")            # built over the cuda-python double
    if rt.cudaGetDevice()[0] == rt.cudaError_t.cudaSuccess:
        pytest.skip("a GPU is usable here")
    for name, mod in (("cuda", cuda), ("cuda.bindings", cuda.bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)               # now the real module
    with pytest.raises(BackendError) as e:
        trtmod.TensorRTBackend(plan)
    assert "cudaGetDevice" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as ex:
        main(["--onnx", str(tiny_onnx(tmp_path / "m.onnx")), "--output", str(tmp_path / "m.plan")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and not (tmp_path / "m.plan").exists()


def test_cuda_python_extras_are_bounded_per_cuda_major() -> None:
    """cuda-python 13 needs a CUDA 13 driver: every extra that pulls cuda-python stays inside one major."""
    import re
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    seen = {}
    for name, reqs in extras.items():
        for r in reqs:
            m = re.fullmatch(r"cuda-python>=(\d+)[\d.]*,<(\d+)", r.replace(" ", ""))
            if r.startswith("cuda-python"):
                assert m and int(m.group(2)) == int(m.group(1)) + 1, f"extra {name}: {r!r} spans CUDA majors"
                seen[name] = int(m.group(1))
    assert seen.get("gpu-cu12") == 12 and seen.get("gpu-cu13") == 13
