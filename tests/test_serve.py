"""probres-serve and export.triton on the real Triton server (the tritonserver binary of nvidia-pytriton).

    make serve-env && .venv/bin/python -m pytest -q tests/test_serve.py

PyTriton pins numpy<2, so the server, its clients and the protobuf checks run in .venv-serve
(built by `make serve-env`, a dependency of `make test`) as subprocesses; this file only drives
them and checks what comes back. Loopback only, every subprocess under a hard timeout. The model
is test_infer's tiny ONNX graph, and the reference is probres-infer on the same files with the
same backend (ONNX Runtime CPU in .venv-serve).
"""

from __future__ import annotations

import json
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
from runtime.serve_model import MAX_REQUEST_BYTES, ServeModel
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


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (Triton and its stubs clean up), SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
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


# ------------------------------------------------------------------------------ no server needed

def test_serve_model_per_item_errors_order_and_default_cap(model, images):
    """Bad items get their own error and zero probs; good ones keep their order and exact values."""
    from runtime.backends import open_backend
    from runtime.preprocess import preprocess

    path, contract = model
    good, bad = images
    m = ServeModel(open_backend(path, device="cpu"), max_batch=8, threads=2)
    assert m.max_bytes == MAX_REQUEST_BYTES == 64 << 20
    items = [good[0].read_bytes(), bad["random"][0].read_bytes(), good[2].read_bytes(),
             bad["bomb"][0].read_bytes(), b"\xff" * (MAX_REQUEST_BYTES + 1)]
    out = m.from_bytes(items)
    ref = m.backend.infer(preprocess([str(good[0]), str(good[2])], spec=contract.preprocess))
    np.testing.assert_array_equal(out["probs"][[0, 2]], ref)
    assert not out["probs"][[1, 3, 4]].any()
    errs = [e.decode() for e in out["error"][:, 0]]
    assert errs[0] == errs[2] == ""
    assert errs[1].startswith("image 1: not a decodable image")
    assert errs[3].startswith("image 3: image too large (100000x100000")
    assert errs[4] == f"image 4: request too large ({MAX_REQUEST_BYTES + 1} bytes, limit {MAX_REQUEST_BYTES} bytes)"
    labels = json.loads(out["labels"][0, 0])            # the contract has no thresholds: 0.5, most probable first
    assert [x["label"] for x in labels] == [contract.labels.names[i] for i in np.argsort(-ref[0], kind="stable")
                                            if ref[0, i] >= 0.5]
    m.close()


def test_export_triton_refuses_nonempty_out_and_bad_engine(model, tmp_path, capsys):
    from export.triton import main

    path, _ = model
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["--engine", str(path), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["--engine", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--engine", str(path), "--out", str(path)]) == 2      # never over the model
    assert path.stat().st_size > 0


def test_serve_without_pytriton_or_with_bad_flags_exits_2_with_one_line(model, capsys):
    """Checked before anything loads: the host, the ports, then PyTriton's presence (it lives in .venv-serve)."""
    import importlib.util

    from runtime.serve import main

    path = str(model[0])
    assert main(["--engine", path, "--host", "localhost:80"]) == 2
    assert "--host must be an IP address" in capsys.readouterr().err
    assert main(["--engine", path, "--http-port", "9", "--grpc-port", "9"]) == 2
    assert "must differ" in capsys.readouterr().err
    if importlib.util.find_spec("pytriton") is None:
        free = free_ports(3)
        assert main(["--engine", path, "--http-port", str(free[0]), "--grpc-port", str(free[1]),
                     "--metrics-port", str(free[2])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "make serve-env" in err


# ------------------------------------------------------------------------------ the real server

def server_log(tmp: Path):
    """A file for a server's output: a pipe nobody reads would fill up and block the server."""
    return open(tmp / "server.log", "wb")


def tail(path: Path) -> str:
    return path.read_bytes().decode(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """probres-serve on loopback: 2 instances, max batch 8, a 200 kB request cap."""
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_dir = tmp_path_factory.mktemp("serve_log")
    shm_before = shm_names()
    proc = subprocess.Popen([str(SERVE_PY), "-m", "runtime.serve", "--engine", str(model[0]), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", "2",
                             "--threads", "1", "--max-batch", "8", "--max-request-bytes", str(CAP)],
                            cwd=ROOT, env=env, stdout=server_log(log_dir), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while http_status(f"http://127.0.0.1:{http}/v2/models/probres_tensor/ready") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"probres-serve did not start: {tail(log_dir / 'server.log')}")
        time.sleep(0.3)
    yield proc, http, grpc, metrics
    stop(proc)
    reap_shm(shm_before)


def run_load(tmp_path: Path, grpc: int, files: list[Path], clients: int, timeout: float = 20):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"model": "probres", "file": str(f)} for f in files]))
    out = tmp_path / "load.jsonl"
    cmd = ["-m", "benchmarks.serve", "load", "--url", f"127.0.0.1:{grpc}", "--jobs", str(jobs),
           "--clients", str(clients), "--timeout", str(timeout), "--out", str(out)]
    return cmd, out


@needs_serve_env
def test_load_and_faults_32_clients(server, model, images, tmp_path):
    """32 clients x 20 requests, one in five bad: exact answers, per-request errors, none lost or doubled."""
    proc, http, grpc, metrics = server
    good, bad = images
    kinds = list(bad)
    files = [bad[kinds[(i // 5) % len(kinds)]][0] if i % 5 == 4 else good[i % len(good)] for i in range(640)]
    cmd, out = run_load(tmp_path, grpc, files, clients=32)
    r = serve_py(*cmd, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["index"] for x in recs) == list(range(640))                 # none lost, none twice
    assert all(x["answered_id"] == str(x["index"]) for x in recs)               # each answer is its own
    assert all(x["error"] is None for x in recs), [x["error"] for x in recs if x["error"]][:3]

    ref = serve_py("-m", "runtime.infer", "--engine", str(model[0]), "--top-k", "all", *map(str, good))
    want = {}
    for line in ref.stdout.splitlines():
        row = json.loads(line)
        p = np.zeros(len(model[1].labels.names))
        for pred in row["predictions"]:
            p[model[1].labels.names.index(pred["label"])] = pred["probability"]
        want[row["image"]] = p
    worst = 0.0
    for x, f in zip(sorted(recs, key=lambda x: x["index"]), files):
        if f in good:
            assert x["item_error"] is None
            worst = max(worst, float(np.abs(np.array(x["probs"]) - want[str(f)]).max()))
        else:
            kind = next(k for k in kinds if bad[k][0] == f)
            assert x["item_error"].startswith("image 0: ") and bad[kind][1] in x["item_error"], x["item_error"]
            assert x["labels"] == [] and not any(x["probs"])
    assert worst <= 1e-6                                # probres-infer writes 6 decimals
    assert http_status(f"http://127.0.0.1:{http}/v2/health/ready") == 200
    assert http_status(f"http://127.0.0.1:{metrics}/metrics") == 200
    assert proc.poll() is None


@needs_serve_env
def test_tensor_requests_and_usage_errors(server, model, images, tmp_path):
    """Preprocessed tensors in give the same probabilities; bad flags exit 2 with one line."""
    _, http, grpc, _ = server
    good, _ = images
    code = ("import sys, json, numpy as np; from benchmarks.serve import _client, send; "
            "from runtime.preprocess import preprocess_one; from runtime.contract import PreprocessSpec; "
            f"c = _client('127.0.0.1:{grpc}'); x = preprocess_one(sys.argv[1], PreprocessSpec(size={S})); "
            "b = send(c, 'probres', open(sys.argv[1], 'rb').read(), '1', 10); "
            "t = send(c, 'probres_tensor', x, '2', 10); import tritonclient.grpc as g; "
            "i = g.InferInput('image', [2, 1], 'BYTES'); "
            "i.set_data_from_numpy(np.array([[open(sys.argv[1], 'rb').read()], [b'junk']], dtype=object)); "
            "two = c.infer('probres', [i]); "
            "print(json.dumps([b.probs, t.probs, two.as_numpy('probs').tolist(), "
            "[e.decode() for e in two.as_numpy('error')[:, 0]]]))")
    r = serve_py("-c", code, str(good[1]), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    b, t, two, two_errors = json.loads(r.stdout)
    assert b == t                                        # same tensor, same engine: identical
    np.testing.assert_allclose(two[0], b, rtol=0, atol=1e-6)   # one request of two images: per-item answers
    assert two_errors[0] == "" and two_errors[1].startswith("image 1: not a decodable image")
    r = serve_py("-m", "runtime.serve", "--engine", str(tmp_path / "nope.onnx"), "--http-port", "1",
                 "--grpc-port", "2", "--metrics-port", "3", timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = serve_py("-m", "runtime.serve", "--engine", str(model[0]), "--http-port", str(http), timeout=60)
    assert r.returncode == 2 and f"--http-port {http}: cannot listen" in r.stderr, r.stderr


# The wheel's tritonserver has no ONNX Runtime backend, so for the ensemble check probres_model
# becomes a Python-backend model that runs the same model.onnx with ONNX Runtime, under the
# config export.triton wrote (names, dtypes, dims, batching): Triton validates every request
# against that config exactly as it would for the onnxruntime_onnx platform.
ORT_STAND_IN = """
import json, os
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.inp, self.out = cfg["input"][0]["name"], cfg["output"][0]["name"]
        self.sess = ort.InferenceSession(os.path.join(os.path.dirname(__file__), "model.onnx"),
                                         providers=["CPUExecutionProvider"])

    def execute(self, requests):
        out = []
        for r in requests:
            (y,) = self.sess.run([self.out], {self.inp: pb_utils.get_input_tensor_by_name(r, self.inp).as_numpy()})
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out, y)]))
        return out
"""


@needs_serve_env
def test_exported_repository_parses_and_its_preprocessing_serves(model, images, tmp_path):
    """Every config.pbtxt parses with tritonclient's model-config protobuf; the Python-backend
    preprocessing model runs on tritonserver and returns runtime.preprocess's exact tensor, and
    the ensemble (with an ONNX Runtime stand-in for the model step) answers like the runtime."""
    from export.triton import write_repository

    repo = tmp_path / "repo"
    write_repository(model[0], repo, max_batch=4, preprocess_instances=1)
    check = ("import sys, glob, json; from google.protobuf import text_format; "
             "from tritonclient.grpc import model_config_pb2 as mc; from google.protobuf.json_format import MessageToDict; "
             "print(json.dumps({p: MessageToDict(text_format.Parse(open(p).read(), mc.ModelConfig())) "
             "for p in sorted(glob.glob(sys.argv[1] + '/*/config.pbtxt'))}))")
    r = serve_py("-c", check, str(repo), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = {Path(p).parent.name: c for p, c in json.loads(r.stdout).items()}
    assert cfg["probres_model"]["platform"] == "onnxruntime_onnx" and cfg["probres_model"]["maxBatchSize"] == 4
    assert cfg["probres_model"]["input"][0] == {"name": "images", "dataType": "TYPE_FP32", "dims": ["3", str(S), str(S)]}
    assert cfg["probres_model"]["output"][0]["labelFilename"] == "labels.txt"
    assert cfg["probres_preprocess"]["backend"] == "python"
    steps = cfg["probres"]["ensembleScheduling"]["step"]
    assert [s["modelName"] for s in steps] == ["probres_preprocess", "probres_model"]
    assert ModelContract.from_json(cfg["probres"]["parameters"]["probres.contract"]["stringValue"]) == model[1]
    assert (repo / "probres_model" / "labels.txt").read_text().splitlines() == list(model[1].labels.names)

    config = repo / "probres_model" / "config.pbtxt"
    config.write_text(config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    (repo / "probres_model" / "1" / "model.py").write_text(ORT_STAND_IN)
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shm_before = shm_names()
    loads = [a for m in ("probres_preprocess", "probres_model", "probres") for a in ("--load", m)]
    proc = subprocess.Popen([str(SERVE_PY), "-m", "export.triton_local", "--repo", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), *loads], cwd=ROOT, env=env,
                            stdout=server_log(tmp_path), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while http_status(f"http://127.0.0.1:{http}/v2/models/probres/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, tail(tmp_path / "server.log")
            time.sleep(0.3)
        code = ("import sys, json, numpy as np, tritonclient.http as h; "
                "from runtime.preprocess import preprocess; from runtime.contract import PreprocessSpec; "
                f"c = h.InferenceServerClient('127.0.0.1:{http}'); out = []\n"
                "for f in sys.argv[1:]:\n"
                "    i = h.InferInput('image', [1, 1], 'BYTES'); i.set_data_from_numpy(np.array([[open(f, 'rb').read()]], dtype=object))\n"
                "    try:\n"
                f"        x = c.infer('probres_preprocess', [i]).as_numpy('images'); out.append(float(np.abs(x - preprocess([f], spec=PreprocessSpec(size={S}))).max()))\n"
                "    except Exception as e: out.append(str(e))\n"
                "print(json.dumps(out))")
        _, bad = images
        r = serve_py("-c", code, str(images[0][0]), str(images[0][3]), str(bad["random"][0]), str(bad["bomb"][0]),
                     timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        d0, d3, e_random, e_bomb = json.loads(r.stdout)
        assert d0 == 0.0 and d3 == 0.0
        assert "image 0: not a decodable image" in e_random and "image too large (100000x100000" in e_bomb

        ensemble = ("import sys, json, numpy as np, tritonclient.http as h; from runtime.backends import open_backend; "
                    "from runtime.preprocess import preprocess; "
                    f"c = h.InferenceServerClient('127.0.0.1:{http}'); b = open_backend(sys.argv[1], device='cpu'); out = []\n"
                    "for f in sys.argv[2:]:\n"
                    "    i = h.InferInput('image', [1, 1], 'BYTES'); i.set_data_from_numpy(np.array([[open(f, 'rb').read()]], dtype=object))\n"
                    "    try:\n"
                    "        p = c.infer('probres', [i]).as_numpy('probs')\n"
                    "        top = c.infer('probres', [i], outputs=[h.InferRequestedOutput('probs', class_count=2)]).as_numpy('probs')\n"
                    "        ref = b.infer(preprocess([f], spec=b.contract.preprocess))\n"
                    "        out.append([float(np.abs(p - ref).max()), [t.decode() for t in top[0]], int(np.argmax(ref[0]))])\n"
                    "    except Exception as e: out.append(str(e))\n"
                    "print(json.dumps(out))")
        r = serve_py("-c", ensemble, str(model[0]), str(images[0][1]), str(bad["truncated"][0]), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        (diff, top, best), e_truncated = json.loads(r.stdout)
        assert diff <= 1e-6
        value, index, label = top[0].split(":")       # the classification extension, labels.txt
        assert int(index) == best and label == model[1].labels.names[best]
        assert "image 0: not a decodable image" in e_truncated
        assert http_status(f"http://127.0.0.1:{http}/v2/health/ready") == 200
    finally:
        stop(proc)
        reap_shm(shm_before)


@needs_serve_env
def test_killed_server_gives_clients_errors_not_hangs(server, images, tmp_path):
    """Last user of the server fixture: SIGKILL it mid-load; every request still ends, the late ones with an error."""
    proc, http, grpc, _ = server
    good, _ = images
    cmd, out = run_load(tmp_path, grpc, [good[i % 4] for i in range(32 * 150)], clients=32, timeout=10)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = subprocess.Popen([str(SERVE_PY), *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "load.err", "wb"))
    time.sleep(2.0)
    assert load.poll() is None, "load finished before the kill: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert load.wait(60) == 0, tail(tmp_path / "load.err")
    assert time.monotonic() - t0 < 60
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 32 * 150
    answered = [x for x in recs if x["error"] is None]
    failed = [x for x in recs if x["error"] is not None]
    assert answered and failed
    assert all(x["item_error"] is None and x["answered_id"] == str(x["index"]) for x in answered)
    assert all(x["answered_id"] is None for x in failed)


def test_export_triton_plan_takes_names_and_batch_from_the_manifest(tmp_path, capsys):
    """A TensorRT plan: platform tensorrt_plan, KIND_GPU, names and max_batch_size from its sidecar."""
    from export.triton import main, write_repository
    from runtime.trt_manifest import write_manifest
    from test_trt_manifest import _manifest

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real plan: export.triton copies it as is")
    m = _manifest(input_name="input_0", output_name="output_0", max_batch=32)
    write_manifest(plan, m)
    write_repository(plan, tmp_path / "repo")
    cfg = (tmp_path / "repo" / "probres_model" / "config.pbtxt").read_text()
    for line in ('platform: "tensorrt_plan"', "max_batch_size: 32", 'name: "input_0" data_type: TYPE_FP32 dims: [ 3, 448, 448 ]',
                 'name: "output_0" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt"', "kind: KIND_GPU"):
        assert line in cfg, line
    assert (tmp_path / "repo" / "probres_model" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    ens = (tmp_path / "repo" / "probres" / "config.pbtxt").read_text()
    assert 'input_map { key: "input_0" value: "preprocessed" }' in ens and 'key: "output_0" value: "probs"' in ens
    assert main(["--engine", str(plan), "--out", str(tmp_path / "r2"), "--max-batch", "64"]) == 2
    assert "at most 32" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    if SERVE_OK:                                 # the same configs parse with tritonclient's protobuf
        r = serve_py("-c", "import sys, glob; from google.protobuf import text_format; "
                     "from tritonclient.grpc import model_config_pb2 as mc; "
                     "[text_format.Parse(open(p).read(), mc.ModelConfig()) for p in glob.glob(sys.argv[1] + '/*/config.pbtxt')]",
                     str(tmp_path / "repo"), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]


@needs_serve_env
def test_serve_benchmark_runs_its_documented_command(tmp_path, images):
    """benchmarks.serve toy-model, then the benchmark itself (tiny: 1 and 2 clients x 2 requests)."""
    from benchmarks.serve import main as bench_main
    from runtime.backends import open_backend

    toy = tmp_path / "toy.onnx"
    assert bench_main(["toy-model", str(toy), "--size", "32"]) == 0
    with open_backend(toy, device="cpu") as b:
        assert b.contract == ModelContract.coco(32) and b.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 80)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in images[0]:
        (imgs / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "serve.json"
    ports = ",".join(map(str, free_ports(3)))
    r = serve_py("-m", "benchmarks.serve", "--engine", str(toy), "--images", str(imgs), "--requests", "2",
                 "--clients", "1,2", "--ports", ports, "--json", str(out), "--instances", "1", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["clients"], x["mode"]) for x in rows] == [(1, "bytes"), (1, "tensors"), (2, "bytes"), (2, "tensors")]
    assert all(x["failed"] == 0 and x["requests"] == 2 * x["clients"] and x["p50_ms"] <= x["p99_ms"] for x in rows)
