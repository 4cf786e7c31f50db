"""probres-serve on the real Triton server (the tritonserver binary of nvidia-pytriton): load and faults.

    make serve-env && .venv/bin/python -m pytest -q tests/test_serve.py

The server and its clients run in .venv-serve (tests/serve_env.py says why). The reference is
probres-infer on the same files with the same backend (ONNX Runtime CPU in .venv-serve).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.contract import ModelContract
from runtime.serve_model import MAX_REQUEST_BYTES, ServeModel
from runtime.provenance import records
from serve_env import (CAP, ROOT, SERVE_PY, free_ports, http_status, images, kill, model,  # noqa: F401
                       needs_serve_env, reap_shm, serve_py, server_log, shm_names, stop, tail)
from test_infer import S

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

def test_serve_labels_are_probres_infers_predictions_and_a_nan_tensor_is_that_items_error(model, images, tmp_path):
    """Issue 24 row 10: the labels JSON is the "predictions" of probres-infer's record for the same
    image (per-label threshold included), with --threshold too; NaN/inf tensors are item errors."""
    from runtime.backends import open_backend
    from runtime.infer import main as infer_main
    from runtime.preprocess import preprocess

    path, contract = model
    good, _ = images
    for threshold in (None, 0.3):
        out = tmp_path / f"ref_{threshold}.jsonl"
        argv = ["--engine", str(path), "--device", "cpu", str(good[0]), str(good[1]), "--output", str(out)]
        assert infer_main(argv + ([] if threshold is None else ["--threshold", str(threshold)])) == 0
        lines = out.read_text().splitlines()
        want = [r["predictions"] for r in records(lines)]       # header skipped
        assert all("threshold" in p for preds in want for p in preds) and any(want)
        m = ServeModel(open_backend(path, device="cpu"), max_batch=4, threads=1, threshold=threshold, source=path)
        try:
            got = m.from_bytes([good[0].read_bytes(), good[1].read_bytes(), b"junk"])
            assert [json.loads(x) for x in got["labels"][:2, 0]] == want
            # issue 24 item 2: every answer, the error item's too, names the model and rule probres-infer's header does
            assert [json.loads(x) for x in got["provenance"][:, 0]] == [json.loads(lines[0])["probres"]] * 3
            assert got["error"][2, 0].startswith(b"image 2: ")
            x = preprocess([str(good[0]), str(good[1]), str(good[2])], spec=contract.preprocess)
            x[1, 0, 3, 3] = np.nan
            x[2, 2, 0, 0] = np.inf
            t = m.from_tensors(x)
            errs = [e.decode() for e in t["error"][:, 0]]
            assert errs[0] == "" and errs[1] == "image 1: the input tensor holds NaN or infinite values"
            assert errs[2] == "image 2: the input tensor holds NaN or infinite values"
            assert np.isfinite(t["probs"]).all() and not t["probs"][1:].any()
            assert json.loads(t["labels"][0, 0]) == want[0] and t["labels"][1, 0] == b"[]"
        finally:
            m.close()


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


def test_ctrl_c_while_the_instances_load_exits_130_without_a_traceback(model, capsys, monkeypatch):
    import importlib.util
    import sys
    import types

    import runtime.serve as serve

    if importlib.util.find_spec("pytriton") is None:      # main imports PyTriton before loading: give it the names it takes
        fake = types.ModuleType("pytriton.triton")
        fake.Triton = fake.TritonConfig = fake.TritonLifecyclePolicy = object
        monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
        monkeypatch.setitem(sys.modules, "pytriton.triton", fake)
        errors = types.ModuleType("pytriton.client.exceptions")
        errors.PyTritonClientTimeoutError = TimeoutError
        monkeypatch.setitem(sys.modules, "pytriton.client", types.ModuleType("pytriton.client"))
        monkeypatch.setitem(sys.modules, "pytriton.client.exceptions", errors)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(serve, "open_backend", interrupted)
    free = free_ports(3)
    try:
        rc = serve.main(["--engine", str(model[0]), "--http-port", str(free[0]), "--grpc-port", str(free[1]),
                         "--metrics-port", str(free[2])])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a traceback, exit 1)")
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted while loading" in err and err.count("\n") == 1, err

# ------------------------------------------------------------------------------ the real server

def start_server(model_path: Path, log_dir: Path, instances: int = 2) -> tuple[subprocess.Popen, int, int, int]:
    """probres-serve on loopback, waited for (90 s at most) until /v2/health/ready answers 200; on failure
    its process group is killed and the test fails with its log. No retry: Triton loads a model's
    instances one after another, so the stubs' handshake race that once needed one is gone."""
    http, grpc, metrics = free_ports(3)
    log = log_dir / "server.log"
    proc = subprocess.Popen([str(SERVE_PY), "-m", "runtime.serve", "--engine", str(model_path),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--instances", str(instances), "--threads", "1", "--max-batch", "8",
                             "--max-request-bytes", str(CAP)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=server_log(log_dir),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while http_status(f"http://127.0.0.1:{http}/v2/health/ready") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"probres-serve did not start: {tail(log)}")
        time.sleep(0.3)
    return proc, http, grpc, metrics


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """probres-serve on loopback: 2 instances, max batch 8, a 200 kB request cap."""
    shm_before = shm_names()
    proc, http, grpc, metrics = start_server(model[0], tmp_path_factory.mktemp("serve_log"))
    try:
        yield proc, http, grpc, metrics
    finally:
        stop(proc)
        reap_shm(shm_before)


# Run in .venv-serve: print "polling", then poll /v2/health/ready every 10 ms; at its first 200,
# without a pause, one inference on each model. Prints {"ready_s", "refused", "models", "errors"}.
READY_PROBE = """
import json, sys, time, urllib.request
import numpy as np, tritonclient.http as h
port, image, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
i = h.InferInput('image', [1, 1], 'BYTES')
i.set_data_from_numpy(np.array([[open(image, 'rb').read()]], dtype=object))
t = h.InferInput('images', [1, 3, size, size], 'FP32')
t.set_data_from_numpy(np.zeros((1, 3, size, size), np.float32))
def status(path):
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=5) as r:
            return r.status
    except Exception as e:
        return getattr(e, 'code', 0)
print('polling', flush=True)
t0, refused = time.monotonic(), 0
while status('/v2/health/ready') != 200:
    refused += 1
    if time.monotonic() - t0 > 90:
        sys.exit('not ready after 90 s')
    time.sleep(0.01)
ready_s = time.monotonic() - t0
models = {m: status(f'/v2/models/{m}/ready') for m in ('probres', 'probres_tensor')}
c = h.InferenceServerClient(f'127.0.0.1:{port}')
errors = [c.infer('probres', [i]).as_numpy('error')[0, 0].decode(), c.infer('probres_tensor', [t]).as_numpy('error')[0, 0].decode()]
c.close()
print(json.dumps({'ready_s': ready_s, 'refused': refused, 'models': models, 'errors': errors}))
"""


@needs_serve_env
def test_health_ready_only_once_both_models_answer(model, images, tmp_path):
    """Issue 24 row 8: Triton's own /v2/health/ready answers 200 only once both models are loaded: a
    client polling it from the server's start sends an inference to each model at its first 200 and
    both answer (before, it answered 200 seconds before the models, which answered NOT_FOUND)."""
    http, grpc, metrics = free_ports(3)
    shm_before = shm_names()
    log = tmp_path / "server.log"
    probe = subprocess.Popen([str(SERVE_PY), "-c", READY_PROBE, str(http), str(images[0][0]), str(S)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc = None
    try:
        # the server starts only once the probe polls, so the probe sees it from its first moment
        ready, _, _ = select.select([probe.stdout], [], [], 60)
        assert ready and probe.stdout.readline() == "polling\n", "the probe did not start in 60 s"
        proc = subprocess.Popen([str(SERVE_PY), "-m", "runtime.serve", "--engine", str(model[0]),
                                 "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                 "--threads", "1", "--instances", "2"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=server_log(tmp_path),
                                stderr=subprocess.STDOUT, start_new_session=True)
        out, err = probe.communicate(timeout=120)
        assert probe.returncode == 0, (err.strip().splitlines()[-1:], tail(log)[-500:])
        seen = json.loads(out)
        assert seen["refused"] > 0, seen                 # it polled before the server was up
        assert seen["models"] == {"probres": 200, "probres_tensor": 200}, seen
        assert seen["errors"] == ["", ""], seen
    finally:
        kill(probe)
        if proc is not None:
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

    ref = serve_py("-m", "runtime.infer", "--engine", str(model[0]), *map(str, good))
    head = json.loads(ref.stdout.splitlines()[0])["probres"]       # probres-infer's provenance header
    assert all(x["provenance"] == head for x in recs)             # every answer, error items too (issue 24 item 2)
    ref = serve_py("-m", "runtime.infer", "--engine", str(model[0]), "--top-k", "all", *map(str, good))
    want = {}
    for line in ref.stdout.splitlines()[1:]:                # after probres-infer's provenance header
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


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")[:100]
    except OSError:
        return ""


def _tree(root: int) -> dict[int, int]:
    """{pid: start time} of every process whose parent chain leads to root (the start time tells a
    reused pid from the original)."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _proc_stat(int(p)))}
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, start) in stats.items():
            if ppid == parent:
                found[pid] = start
                todo.append(pid)
    return found


@needs_serve_env
def test_sigterm_leaves_no_process_behind(model, tmp_path):
    """Issue 24 item 5: SIGTERM to probres-serve with 4 instances exits 143, and every process that
    descended from it (tritonserver, its Python-backend stubs, their TensorStores) is gone within 15 s
    (before, stubs outlived Triton's 5 s exit timeout for minutes)."""
    shm_before = shm_names()
    proc, *_ = start_server(model[0], tmp_path, instances=4)
    tree: dict[int, int] = {}
    try:
        tree = _tree(proc.pid)                        # before the signal: orphans leave the chain
        assert sum("triton_python_backend_stub" in _cmd(p) for p in tree) == 8, [_cmd(p) for p in tree]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 143, tail(tmp_path / "server.log")
        deadline = time.monotonic() + 15
        alive = tree
        while alive and time.monotonic() < deadline:
            alive = {p: s for p, s in alive.items() if (st := _proc_stat(p)) and st[2] == s and st[1] != "Z"}
            time.sleep(0.2)
        assert not alive, [_cmd(p) for p in alive]
        # nor shared memory: the Python backend's regions (named after the server's pid) of a stub ended by force
        assert not {n for n in shm_names() - shm_before if n.startswith(f"pytrtion{proc.pid}-")}
        assert "Traceback" not in tail(tmp_path / "server.log")
    finally:
        kill(proc)
        for pid, start in tree.items():               # whatever left the process group too
            st = _proc_stat(pid)
            if st and st[2] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        reap_shm(shm_before)
