"""probres-batch on a local Ray: records equal probres-infer's, and every input lands exactly once
after an actor SIGKILL, a clean stop (Ctrl-C) + --resume, and a driver SIGKILL + --resume.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_batch.py

One Ray head for the module (`ray start --head --num-cpus 2 --block` in its own session, so the
teardown kills exactly its processes); every job is a `python -m runtime.batch` subprocess with
a timeout, killed with its process group if it overruns. The checks that need no Ray (a missing
model, a refused output directory, the plan) call main() in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from runtime import batch_plan  # noqa: E402
from runtime.batch import main as batch_main  # noqa: E402
from runtime.batch_fs import Location  # noqa: E402
from runtime.batch_ray import ChunkLabeler, cpus_per_actor, read_chunk_files  # noqa: E402
from runtime.contract import LabelSet, ModelContract, PreprocessSpec  # noqa: E402
from runtime.infer import main as infer_main  # noqa: E402
from runtime.provenance import records  # noqa: E402
from test_infer import S, expected_probs, tiny_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (one we started with start_new_session): Ray's raylet,
    GCS and workers included, and nothing else on this shared machine."""
    import psutil
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


@pytest.fixture(scope="module")
def ray_address():
    """A 2-CPU Ray head for the module, with one logical GPU (declared: there is none); its whole session
    is killed at teardown."""
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")          # short: Ray's socket paths have a length limit
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--num-gpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}",
                             "--object-store-memory=200000000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:                     # ready when the GCS answers a client
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}: {head.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("ray start --head: not ready in 90 s")
            ok = subprocess.run([str(ray_bin), "status", f"--address={address}"], capture_output=True, timeout=30,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            if ok.returncode == 0:
                break
            time.sleep(1)
        yield address
    finally:
        _kill_session(head.pid)
        head.wait(timeout=30)
        subprocess.run(["rm", "-rf", tmp], timeout=60)


@pytest.fixture(scope="module")
def weighed_model(tmp_path_factory, toy_root) -> tuple[Path, np.ndarray, np.ndarray]:
    """The tests' tiny ONNX model (channel means -> linear -> sigmoid) and its weights W, b."""
    cats = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    path = tmp_path_factory.mktemp("batch_model") / "tiny.onnx"
    return path, *tiny_onnx(path, ModelContract(LabelSet.from_categories(cats), PreprocessSpec(size=S)))


@pytest.fixture(scope="module")
def model(weighed_model) -> Path:
    return weighed_model[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 small JPEG/PNG files in nested folders, plus two that cannot be decoded."""
    d = tmp_path_factory.mktemp("batch_images")
    rng = np.random.default_rng(1)
    for i in range(24):
        sub = d / f"s{i % 3}"
        sub.mkdir(exist_ok=True)
        img = cv2.GaussianBlur(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(sub / f"im{i:02d}.{'png' if i % 4 == 0 else 'jpg'}"), img)
    (d / "s0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "s1" / "empty.png").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def slow_images(tmp_path_factory) -> Path:
    """120 large JPEGs (1600x1200): decoding takes long enough to kill a job in the middle."""
    d = tmp_path_factory.mktemp("batch_slow")
    rng = np.random.default_rng(2)
    base = cv2.resize(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (1600, 1200))
    for i in range(120):
        cv2.imwrite(str(d / f"big{i:03d}.jpg"), np.roll(base, i * 7, axis=1), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return d


def _cmd(model, inp, out, address, *extra) -> list[str]:
    return [sys.executable, "-m", "runtime.batch", "--engine", str(model), "--input", str(inp), "--output", str(out),
            "--address", address, *map(str, extra)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RAY_AUTH_MODE": "disabled"}


def run_job(cmd: list[str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The command in its own session; on timeout its whole session is killed and the test fails."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(p.pid)
        out, err = p.communicate(timeout=30)
        pytest.fail(f"{' '.join(cmd)}: still running after {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def start_job(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)


def wait_for_parts(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> int:
    """Poll until `out` holds `at_least` part files; returns how many (fails if the job ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(list(out.glob("part-*"))) if out.is_dir() else 0
        if n >= at_least:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {at_least} files: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    _kill_session(proc.pid)
    pytest.fail(f"no {at_least} part files in {timeout} s")


def read_records(out: Path, fmt: str) -> list[dict]:
    """Every record of a finished job, after checking _SUCCESS against the files."""
    success = json.loads((out / batch_plan.SUCCESS).read_text())
    listed = {f["file"]: f["records"] for f in success["files"]}
    assert sorted(listed) == sorted(p.name for p in out.glob("part-*")), "a part file not in _SUCCESS (or missing)"
    assert not list(out.glob(".*.tmp")), "temp files left behind"
    records = []
    for name in sorted(listed):
        if fmt == "jsonl":
            rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        else:
            rows = pq.read_table(out / name).to_pylist()
        assert len(rows) == listed[name]
        records += rows
    assert success["records"] == len(records)
    return records


def assert_exactly_once(records: list[dict], inputs: list[str]) -> None:
    counts = Counter(r["image"] for r in records)
    dup = [p for p, c in counts.items() if c > 1]
    assert not dup, f"{len(dup)} inputs recorded twice, e.g. {dup[:3]}"
    assert sorted(counts) == sorted(inputs)


def infer_records(model, inputs: list[str], tmp_path: Path) -> list[dict]:
    out = tmp_path / "infer.jsonl"
    infer_main(["--engine", str(model), *inputs, "--output", str(out), "--threads", "1"])
    return list(records(out.read_text().splitlines()))          # its provenance header skipped


def same_record(a: dict, b: dict) -> bool:
    """Equal fields; probabilities within 1e-6 (a batch cut elsewhere may change a float32 ulp)."""
    if set(a) != set(b) or a["image"] != b["image"] or a.get("error") != b.get("error"):
        return False
    if "error" in a:
        return True
    pa_, pb = a["predictions"], b["predictions"]
    return str(a["threshold"]) == str(b["threshold"]) and [p["label"] for p in pa_] == [p["label"] for p in pb] and all(
        abs(x["probability"] - y["probability"]) <= 1e-6 and x["category_id"] == y["category_id"]
        and x["threshold"] == y["threshold"] for x, y in zip(pa_, pb))


# ---------------------------------------------------------------------------------------------- Ray jobs

def test_records_equal_probres_infer_and_bad_images_are_error_records(ray_address, model, images, tmp_path):
    out = tmp_path / "out"
    r = run_job(_cmd(model, images, out, ray_address, "--format", "jsonl", "--chunk-size", 5, "--batch-size", 4,
                     "--actors", 2, "--threads", 1))        # two actors on 2 CPUs: must not starve Ray Data
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_records(out, "jsonl")
    want = infer_records(model, [str(images)], tmp_path)
    assert len(want) == 26 and sum("error" in w for w in want) == 2
    assert [g["image"] for g in sorted(got, key=lambda g: g["image"])] == [w["image"] for w in want]
    by_image = {g["image"]: g for g in got}
    assert all(same_record(by_image[w["image"]], w) for w in want)
    assert "26 labelled, 2 failed" in r.stderr and "Traceback" not in r.stderr
    # The files hold consecutive runs of the sorted walk, in order: chunk i = inputs 5i..5i+4.
    files = sorted(out.glob("part-*"))
    assert [len(f.read_text().splitlines()) for f in files] == [5, 5, 5, 5, 5, 1]
    first = [json.loads(line)["image"] for line in files[1].read_text().splitlines()]
    assert first == [w["image"] for w in want[5:10]]


def test_object_store_paths_file_uris_in_and_out(ray_address, model, images, tmp_path):
    # file:// goes through pyarrow.fs as s3:// and gs:// do (FileSystem.from_uri), a LocalFileSystem here.
    out = tmp_path / "out"
    r = run_job(_cmd(model, images.as_uri() + "/", out.as_uri(), ray_address, "--chunk-size", 10,
                     "--batch-size", 4, "--threads", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_records(out, "parquet")
    want = infer_records(model, [str(images)], tmp_path)
    uri = images.as_uri()
    for w in want:                          # the records name the URIs; errors too
        w["image"] = uri + w["image"][len(str(images)):]
        if "error" in w:
            w["error"] = uri + w["error"][len(str(images)):]
    assert [g["image"] for g in got] == [w["image"] for w in want]       # probres-infer's walk order
    assert all(same_record({k: v for k, v in g.items() if v is not None}, w) for g, w in zip(got, want))


def test_gpu_actor_gets_a_logical_gpu_and_cuda_visible_devices(ray_address, model, images, tmp_path):
    out = tmp_path / "out"
    r = run_job(_cmd(model, images, out, ray_address, "--gpus-per-actor", 1, "--format", "jsonl", "--chunk-size", 13))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "actors' CUDA_VISIBLE_DEVICES: 0" in r.stderr          # set by Ray for the actor's one GPU
    assert_exactly_once(read_records(out, "jsonl"), [w["image"] for w in infer_records(model, [str(images)], tmp_path)])
    r = run_job(_cmd(model, images, tmp_path / "out2", ray_address, "--gpus-per-actor", 1, "--actors", 2))
    assert r.returncode == 2 and "needs 2 GPUs; the cluster has 1" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out2").exists()     # refused before any chunk ran


def test_actor_sigkill_mid_run_every_input_once(ray_address, model, weighed_model, slow_images, tmp_path):
    import psutil
    out = tmp_path / "out"
    proc = start_job(_cmd(model, slow_images, out, ray_address, "--chunk-size", 4, "--batch-size", 4,
                          "--actors", 1, "--threads", 1, "--all-probs"))
    try:
        done_at_kill = wait_for_parts(out, 2, proc)
        actors = [p for p in psutil.process_iter(["cmdline"]) if "ChunkLabeler" in " ".join(p.info["cmdline"] or [])]
        assert len(actors) == 1, [p.info["cmdline"] for p in actors]
        actors[0].send_signal(signal.SIGKILL)
        assert done_at_kill < 30 and not (out / batch_plan.SUCCESS).exists()
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid)
    assert rc == 0, err[-3000:]
    records = read_records(out, "parquet")
    assert_exactly_once(records, [str(p) for p in slow_images.glob("*.jpg")])
    assert all(r["error"] is None and r["threshold"] == "0.5" for r in records)   # no contract thresholds: 0.5
    some = sorted(records, key=lambda r: r["image"])[::12]     # --all-probs against numpy's forward pass
    want = expected_probs([r["image"] for r in some], PreprocessSpec(size=S), *weighed_model[1:])
    np.testing.assert_allclose([r["probs"] for r in some], want, atol=2e-6)


def test_clean_stop_then_driver_sigkill_then_resume_every_input_once(ray_address, model, slow_images, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    cmd = _cmd(model, slow_images, out, ray_address, "--chunk-size", 4, "--batch-size", 4, "--format", "jsonl")
    inputs = [str(p) for p in slow_images.glob("*.jpg")]
    proc = start_job(cmd)                                    # 1. Ctrl-C mid-run: exit 130, no _SUCCESS
    try:
        wait_for_parts(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        _kill_session(proc.pid)
    assert rc == 130 and "--resume" in err and "Traceback" not in err, err[-3000:]
    assert not (out / batch_plan.SUCCESS).exists()
    assert batch_main(cmd[3:]) == 2 and "is not empty" in capsys.readouterr().err   # refused without --resume
    kept = len(list(out.glob("part-*")))
    proc = start_job(cmd + ["--resume"])                     # 2. resumed, then the driver SIGKILLed mid-run
    try:
        wait_for_parts(out, kept + 2, proc)
        os.kill(proc.pid, signal.SIGKILL)                    # the driver only; Ray ends its job's actors
        proc.wait(timeout=30)
    finally:
        _kill_session(proc.pid)
    assert not (out / batch_plan.SUCCESS).exists()
    kept = len(list(out.glob("part-*")))
    assert kept < 30                                         # 120 inputs / 4: the kill came mid-run
    r = run_job(cmd + ["--resume"])                          # 3. resumed to the end
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({kept} already there)" in r.stderr
    assert_exactly_once(read_records(out, "jsonl"), inputs)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert batch_main(cmd[3:] + ["--resume"]) == 0           # 4. a finished job is left as it is
    assert "already complete" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------- no Ray needed

def test_a_model_that_cannot_load_is_one_line_and_leaves_no_job(ray_address, images, tmp_path):
    # The driver's full model load overlaps Ray's start; when it fails, the job just planned is undone.
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a protobuf of a graph")
    r = run_job(_cmd(bad, images, tmp_path / "out", ray_address))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.onnx" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_model_is_one_line_before_any_work(images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = batch_main(["--engine", str(tmp_path / "nope.onnx"), "--input", str(images), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope.onnx: no such model file" in err
    assert not out.exists()


def test_an_output_dir_of_another_job_is_refused(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    args = ["--engine", str(model), "--input", str(images), "--output", str(out)]
    assert batch_main(args) == 2 and "is not empty" in capsys.readouterr().err
    assert batch_main(args + ["--resume"]) == 2 and "did not write (notes.txt" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    other = dict(input=str(images), cwd=os.getcwd(), model_sha256="0" * 64, chunk_size=1024, format="parquet",
                 all_probs=False)
    batch_plan.write_manifest(Location(str(out)), other)               # another model's job
    assert batch_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "another job's files: model_sha256" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [batch_plan.MANIFEST]


def test_an_actor_labels_chunk_after_chunk_in_the_same_buffers(model, images, tmp_path):
    # classify() allocates per run and a backend keeps what it allocated until close(): one run per
    # chunk must not add buffers (190 MB a chunk at 448 px, for the whole job).
    out = tmp_path / "out"
    out.mkdir()
    loc = Location(str(out))
    batch_plan.write_plan(batch_plan.iter_input(str(images)), loc)
    plan = batch_plan.scan_plan(loc, 4)
    job = {"model": str(model), "cwd": os.getcwd(), "out": loc, "format": "jsonl",
           "all_probs": False, "batch_size": 2, "threads": 1, "device": "cpu"}
    labeler = ChunkLabeler(job)
    owned = []
    for i in range(4):
        rows = labeler(read_chunk_files({k: np.array([v]) for k, v in plan.chunk(i).items()}, loc))
        assert list(rows["records"]) == [4] and (out / rows["file"][0]).is_file()
        owned.append(len(labeler.backend._backend._owned_inputs))
    assert owned == [owned[0]] * 4


def test_actors_leave_ray_data_a_cpu_share():
    assert cpus_per_actor(2, 2, 1, 0) == 0.75             # two 1-thread actors on 2 CPUs: 1.5 of them
    assert cpus_per_actor(2, 1, 2, 0) == 1.75             # (a read task of 0.25 CPU per actor beside them)
    assert cpus_per_actor(64, 8, 2, 0) == 2.0
    assert cpus_per_actor(16, 4, 8, 1) == 1.0              # a GPU actor: one CPU for its decode threads
    with pytest.raises(ValueError):
        cpus_per_actor(0.25, 1, 1, 0)
