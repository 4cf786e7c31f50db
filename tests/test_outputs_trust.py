"""Outputs that never destroy and say which model made them (issue 24, rows 1, 2, 5, 6, 12, 13).

    .venv/bin/python -m pytest -q tests/test_outputs_trust.py

Devices, FIFOs and symlinks as outputs; SIGTERM and SIGHUP sent for real to a probres-infer
process that is provably mid-run (blocked on stdin, --from-list -); the provenance header
checked against hashlib; --resume into another model's file; two runs on one output at once;
a binary --from-list; --output -. The model is test_pipeline_memory's tiny ONNX graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_output_safety import one_line_error
from test_pipeline_memory import tiny_onnx, write_images
from test_video import write_clip

import runtime.infer as infer
from runtime.fileio import atomic_write_text

EXE = str(Path(sys.executable).parent / "probres-infer")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    return tiny_onnx(d / "tiny.onnx"), write_images(d / "imgs", 12, size=32)


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def default_signals() -> None:
    """In the child before exec: SIGTERM and SIGHUP at their defaults (a suite run under nohup
    inherits SIGHUP ignored, and probres-infer leaves an ignored signal ignored)."""
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def start_blocked(model: Path, paths: list[str], out: Path, *extra: str) -> subprocess.Popen:
    """probres-infer reading paths from stdin; returns once every path fed is in the output (temp)
    file: the process is then idle mid-run, waiting for more input, with the output locked."""
    p = subprocess.Popen([EXE, "--engine", str(model), "--from-list", "-", "--output", str(out), "--batch-size", "4",
                          "--threads", "1", *extra], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    p.stdin.write("".join(f"{x}\n" for x in paths))
    p.stdin.flush()
    deadline = time.time() + 60
    while time.time() < deadline:
        files = [out] if "--resume" in extra else list(out.parent.glob(f".{out.name}.*.tmp"))
        if files and files[0].exists() and files[0].read_text().count("\n") >= 1 + len(paths):
            return p
        if p.poll() is not None:
            pytest.fail(p.stderr.read())
        time.sleep(0.02)
    p.kill()
    pytest.fail("probres-infer did not write the records fed within 60 s")


# ------------------------------------------------------------------------ row 1: devices, FIFOs, symlinks

def test_a_symlink_to_dev_full_is_a_one_line_write_error_and_the_link_and_device_stay(data, tmp_path, capsys):
    model, paths = data
    link = tmp_path / "out.jsonl"
    link.symlink_to("/dev/full")
    assert infer.main(["--engine", str(model), *paths[:3], "--output", str(link)]) == 2
    line = one_line_error(capsys.readouterr().err, link)
    assert "No space left on device" in line
    assert link.is_symlink() and os.readlink(link) == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert os.listdir(tmp_path) == ["out.jsonl"]                   # no temp file, no lock file


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_character_device_is_written_in_place_never_replaced(data, tmp_path, capsys):
    model, paths = data
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))         # a second /dev/null
    assert infer.main(["--engine", str(model), *paths[:3], "--output", str(dev)]) == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.stat(dev).st_mode) and os.stat(dev).st_rdev == os.makedev(1, 3)
    atomic_write_text(dev, "eval's --json goes through the same writer\n")
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    capsys.readouterr()
    assert infer.main(["--engine", str(model), *paths[:3], "--output", str(dev), "--resume"]) == 2
    assert "not a regular file" in one_line_error(capsys.readouterr().err, dev)


def test_a_fifo_is_written_in_place_and_its_reader_gets_every_record(data, tmp_path, capsys):
    model, paths = data
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        rc = infer.main(["--engine", str(model), *paths[:5], "--output", str(fifo), "--batch-size", "2"])
    finally:
        reader.join(timeout=30)               # infer closed its write end: the reader has its EOF
        if reader.is_alive():                 # never leave the reader blocked (infer never opened the FIFO):
            try:                              # open the write end once, without blocking if it has no reader
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            reader.join(timeout=30)
    assert rc == 0, capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    recs = [json.loads(ln) for ln in got[0].decode().splitlines()]
    assert "probres" in recs[0] and [r["image"] for r in recs[1:]] == paths[:5]


def test_a_symlink_to_a_file_keeps_the_link_and_replaces_the_target(data, tmp_path, capsys):
    model, paths = data
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "r.jsonl"
    target.write_text("old\n")
    link = tmp_path / "r.jsonl"
    link.symlink_to(target)
    assert infer.main(["--engine", str(model), *paths[:2], "--output", str(link)]) == 0, capsys.readouterr().err
    assert link.is_symlink() and len(lines(target)) == 3
    assert sorted(os.listdir(tmp_path / "real")) == ["r.jsonl"]


def test_a_socket_is_refused_with_one_line_before_the_model_loads(data, tmp_path, capsys):
    model, paths = data
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        garbage = tmp_path / "garbage.onnx"
        garbage.write_bytes(b"not a model")
        assert infer.main(["--engine", str(garbage), *paths[:1], "--output", str(path)]) == 2
        assert "is a socket" in one_line_error(capsys.readouterr().err, path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_eval_json_into_a_symlink_to_dev_full_is_one_line_and_keeps_the_device(data, toy_root, tmp_path, capsys):
    from runtime.eval import main as eval_main
    from test_infer import tiny_onnx as toy_onnx

    from runtime.contract import LabelSet, ModelContract, PreprocessSpec
    cats = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    model = tmp_path / "toy.onnx"
    contract = ModelContract(LabelSet.from_categories(cats), PreprocessSpec(size=32))
    toy_onnx(model, contract)
    toy_onnx(tmp_path / "ref.onnx", contract, seed=1)
    link = tmp_path / "parity.json"
    link.symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left"):           # the shared writer itself
        atomic_write_text(link, "{}\n")
    rc = eval_main(["--engine", str(model), "--reference-engine", str(tmp_path / "ref.onnx"),
                    "--coco-root", str(toy_root), "--json", str(link), "--allow-different-model"])   # unrelated toys
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err and str(link) in last and "No space left on device" in last, err
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/full").st_mode)


# ------------------------------------------------------------------------ row 2: SIGTERM and SIGHUP

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_keep_the_finished_batches_and_resume_finishes(data, tmp_path, sig, capsys):
    model, paths = data
    out = tmp_path / "term.jsonl"
    p = start_blocked(model, paths[:6], out)          # 6 records: a batch of 4 and a partial one of 2
    p.send_signal(sig)
    try:
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines() == [
        f"probres-infer: interrupted by {sig.name} after 6 inputs; 6 records kept in {out} "
        f"(finish with the same command plus --resume)"]
    assert [r["image"] for r in lines(out)[1:]] == paths[:6]
    assert sorted(os.listdir(tmp_path)) == ["term.jsonl"]          # no hidden temp file, no lock file
    assert infer.main(["--engine", str(model), *paths, "--output", str(out), "--resume"]) == 0
    assert "(6 already in" in capsys.readouterr().err
    assert [r["image"] for r in lines(out)[1:]] == paths                # each image once


# ------------------------------------------------------------------------ row 5: provenance

def test_the_header_names_the_model_by_sha256_and_the_decision_rule(data, tmp_path, capsys):
    model, paths = data
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    want = {"model": model.name, "sha256": sha}
    for extra, rule in (([], {"threshold": "contract", "top_k": None}),
                        (["--threshold", "0.7", "--top-k", "2"], {"threshold": 0.7, "top_k": 2}),
                        (["--top-k", "all"], {"threshold": None, "top_k": "all"})):
        assert infer.main(["--engine", str(model), paths[0], *extra]) == 0
        first, record = capsys.readouterr().out.splitlines()
        assert json.loads(first) == {"probres": {**want, **rule}} and json.loads(record)["image"] == paths[0]
    for fmt in ("csv", "table"):
        assert infer.main(["--engine", str(model), paths[0], "--format", fmt]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("# probres: ") and json.loads(first[len("# probres: "):]) == {**want, "threshold":
                                                                                              "contract", "top_k": None}


def test_resume_refuses_a_file_made_by_another_model_or_decision_rule(data, tmp_path, capsys):
    model, paths = data
    import onnx

    m = onnx.load(str(model))
    m.metadata_props.add(key="note", value="another model: the same graph, other bytes")
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    out = tmp_path / "r.jsonl"
    base = ["--engine", str(model), *paths[:3], "--output", str(out), "--resume"]
    assert infer.main(base) == 0
    before = out.read_bytes()
    capsys.readouterr()
    for argv, what in ((["--engine", str(other), *paths, "--output", str(out), "--resume"], "other.onnx"),
                       ([*base, "--threshold", "0.9"], "threshold 0.9"),
                       ([*base, "--top-k", "1"], "top-k 1")):
        assert infer.main(argv) == 2
        line = one_line_error(capsys.readouterr().err, out, what)
        assert "tiny.onnx" in line and "one file never mixes two" in line
        assert out.read_bytes() == before
    assert infer.main([*base[:2], *paths, *base[5:]]) == 0                      # the same model and rule
    capsys.readouterr()
    recs = lines(out)
    assert sum("probres" in r for r in recs) == 1 and [r["image"] for r in recs[1:]] == paths
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]                       # shards, then `cat`
    for i, part in enumerate(parts):
        assert infer.main(["--engine", str(model), *paths, "--shard", f"{i}/2", "--output", str(part)]) == 0
    merged = tmp_path / "all.jsonl"
    merged.write_text("".join(p.read_text() for p in parts))
    assert infer.main(["--engine", str(model), *paths, "--output", str(merged), "--resume"]) == 0
    assert f"({len(paths)} already in" in capsys.readouterr().err
    assert infer.main(["--engine", str(other), *paths, "--shard", "0/2", "--output", str(parts[0])]) == 0
    merged.write_text("".join(p.read_text() for p in parts))                     # one part by another model
    capsys.readouterr()
    assert infer.main(["--engine", str(model), *paths, "--output", str(merged), "--resume"]) == 2
    assert "mixes two models" in one_line_error(capsys.readouterr().err, merged)
    old = tmp_path / "old.jsonl"                                                   # records, no header
    old.write_text(json.dumps({"image": paths[0], "threshold": 0.5, "predictions": []}) + "\n")
    assert infer.main(["--engine", str(model), *paths[:2], "--output", str(old), "--resume"]) == 2
    assert "no provenance header" in one_line_error(capsys.readouterr().err, old)


# ------------------------------------------------------------------------ row 6: one writer per output

def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(data, tmp_path, capsys):
    from runtime.fileio import OutputLocked

    model, paths = data
    out = tmp_path / "dup.jsonl"
    p = start_blocked(model, paths[:4], out, "--resume")
    try:
        for extra in (["--resume"], []):
            assert infer.main(["--engine", str(model), *paths, "--output", str(out), *extra]) == 2
            line = one_line_error(capsys.readouterr().err, out)
            assert "being written by another run" in line and f"pid {p.pid}" in line
        clip = write_clip(Path(model).with_name("clip.avi"), 5, "MJPG")   # a video run: the same check, before the model loads
        assert infer.main(["--engine", str(model), str(clip), "--output", str(out)]) == 2
        line = one_line_error(capsys.readouterr().err, out)
        assert line.startswith("probres-infer: error: --output ") and f"pid {p.pid}" in line
        with pytest.raises(OutputLocked, match="dup.jsonl"):           # every atomic writer: eval --json, exports
            atomic_write_text(out, "x\n")
        p.stdin.write("".join(f"{x}\n" for x in paths[4:]))
        p.stdin.close()
        assert p.wait(timeout=60) == 0, p.stderr.read()
    finally:
        p.kill()
        p.wait(timeout=30)
    recs = lines(out)
    assert [r["image"] for r in recs[1:]] == paths                      # each image once
    assert infer.main(["--engine", str(model), *paths, "--output", str(out), "--resume"]) == 0   # lock released
    assert sorted(os.listdir(tmp_path)) == ["dup.jsonl"]


def test_the_lock_is_reentrant_in_a_process_and_removed_when_released(tmp_path):
    from runtime.fileio import OutputLock

    out = tmp_path / "r.json"
    with OutputLock(out) as lock:
        atomic_write_text(out, "{}\n")                 # the same process: nested, not refused
        assert os.path.exists(lock.lock_path)
    assert os.listdir(tmp_path) == ["r.json"]


# ------------------------------------------------------------------------ rows 12, 13

def test_a_binary_list_file_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch):
    model, paths = data
    out = tmp_path / "r.jsonl"
    assert infer.main(["--engine", str(model), "--from-list", str(model), "--output", str(out)]) == 2
    assert "binary file" in one_line_error(capsys.readouterr().err, model)
    assert not out.exists()
    r = subprocess.run([EXE, "--engine", str(model), "--from-list", "-"], input=model.read_bytes(),
                       capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and "binary file" in one_line_error(err, "--from-list -") and r.stdout.count(b"\n") <= 1


def test_output_dash_is_stdout(data, tmp_path, capsys, monkeypatch):
    model, paths = data
    monkeypatch.chdir(tmp_path)
    assert infer.main(["--engine", str(model), *paths[:2], "--output", "-"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(ln).get("image") for ln in out] == [None, *paths[:2]]
    assert os.listdir(tmp_path) == []
    assert infer.main(["--engine", str(model), *paths[:2], "--output", "-", "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "--resume")
