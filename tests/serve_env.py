"""Helpers for the tests that drive Triton in .venv-serve (tests/test_serve.py, tests/test_export_triton.py).

    make serve-env && .venv/bin/python -m pytest -q tests/test_serve.py tests/test_export_triton.py

PyTriton pins numpy<2, so the servers, their clients and the protobuf checks run in .venv-serve
(built by `make serve-env`, which `make test` runs first) as subprocesses; the tests only drive
them and check what comes back. Loopback only, every subprocess under a hard timeout. The model
is test_infer's tiny ONNX graph with the COCO labels.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from test_infer import S, png_header, smooth_image, tiny_onnx

ROOT = Path(__file__).resolve().parent.parent
# `make serve-env` marks a complete .venv-serve with .installed; PROBRES_SERVE_PYTHON names another.
SERVE_PY = Path(os.environ.get("PROBRES_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
SERVE_OK = SERVE_PY.is_file() and ("PROBRES_SERVE_PYTHON" in os.environ or (ROOT / ".venv-serve" / ".installed").is_file())
CAP = 200_000                    # the server's --max-request-bytes in these tests
needs_serve_env = pytest.mark.skipif(not SERVE_OK, reason=f"no complete serve environment at {SERVE_PY}: "
                                                          f"run `make serve-env` (PyTriton needs numpy<2: its own venv)")


def serve_py(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(SERVE_PY), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception:
        return 0


# Shared memory that PyTriton and Triton's Python backend create in /dev/shm; a SIGKILLed server
# (the kill test) cannot remove its own, so the tests remove what is left and no process uses.
SHM_PREFIXES = ("pytrtion", "psm_", "triton_python_backend_shm_region_")


def shm_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)}
    except OSError:
        return set()


def _shm_in_use() -> set[str]:
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                used.add(os.path.basename(os.readlink(f"/proc/{pid}/fd/{fd}")))
            with open(f"/proc/{pid}/maps") as f:
                used.update(os.path.basename(line.split()[-1]) for line in f if "/dev/shm/" in line)
        except OSError:
            continue
    return used


def reap_shm(before: set[str], wait_s: float = 15.0) -> None:
    """Unlink segments created since `before` once no live process has them open or mapped
    (the killed server's stubs take a few seconds to exit)."""
    deadline = time.monotonic() + wait_s
    while True:
        new = shm_names() - before
        busy = new & _shm_in_use()
        for name in new - busy:
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:                  # the whole group has already exited
        pass


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (Triton and its stubs clean up), SIGKILL after 30 s."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    proc.wait(30)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its group."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    contract = ModelContract(LabelSet.coco(), PreprocessSpec(size=S))
    path = tmp_path_factory.mktemp("serve_model") / "tiny.onnx"
    tiny_onnx(path, contract, seed=3)
    return path, contract


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four distinct good images and one of each kind of bad one (kind -> the error it must get)."""
    d = tmp_path_factory.mktemp("serve_images")
    good = []
    for k, (h, w) in enumerate([(48, 64), (90, 40), (33, 33), (120, 200)]):
        p = d / f"good{k}.{'png' if k % 2 else 'jpg'}"
        cv2.imwrite(str(p), smooth_image(h, w, seed=k)[:, :, ::-1])
        good.append(p)
    jpeg = good[0].read_bytes()
    bad = {"truncated": (jpeg[: len(jpeg) // 2], "not a decodable image"),
           "random": (np.random.default_rng(1).bytes(3000), "not a decodable image"),
           "bomb": (png_header(100000, 100000), "image too large (100000x100000 pixels claimed"),
           "oversize": (jpeg + b"\0" * CAP, f"request too large ({len(jpeg) + CAP} bytes, limit {CAP} bytes)")}
    paths = {}
    for kind, (data, _) in bad.items():
        paths[kind] = d / f"bad_{kind}.jpg"
        paths[kind].write_bytes(data)
    return good, {k: (paths[k], msg) for k, (_, msg) in bad.items()}


def server_log(tmp: Path):
    """A file for a server's output: a pipe nobody reads would fill up and block the server."""
    return open(tmp / "server.log", "wb")


def tail(path: Path) -> str:
    return path.read_bytes().decode(errors="replace")[-2000:]
