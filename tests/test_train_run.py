"""probres-train end to end: usage errors, kill -9 + --resume, 2-process torchrun (gloo), val coverage.

    .venv/bin/python -m pytest -q tests/test_train_run.py

Tiny settings (resnet18 @ 32 px, batch 4, the 48/24-image toy set) keep each run to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.coco import load_coco_split
from runtime.metrics import multilabel_metrics
from runtime.preprocess import preprocess
from train.__main__ import main
from train.checkpoint import load_checkpoint

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
        "--device", "cpu", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _eval_checkpoint(path: Path, root: Path) -> dict:
    """Independent val metrics: runtime preprocessing + the checkpoint's model, one process."""
    ck = load_checkpoint(path)
    split = load_coco_split(root, "val2014", labels=ck.contract.labels)
    x = torch.from_numpy(preprocess([str(p) for p in split.image_paths], spec=ck.contract.preprocess))
    with torch.no_grad():
        scores = torch.sigmoid(ck.build()(x)).numpy()
    return multilabel_metrics(scores, split.targets)


@pytest.mark.parametrize("argv, needle", [
    (["--coco-root", "/nonexistent/coco"], "--coco-root /nonexistent/coco: no such directory"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--pretrained", "/nonexistent/resnet101-cbd1c6e8.pth"], "download.pytorch.org"),
    (["--resume"], "last.pt not found"),
    (["--workers", "-1"], "--workers must be >= 0"),
])
def test_usage_errors_are_one_line_exit_2(toy_root: Path, tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    base = ["--coco-root", str(toy_root), "--out", str(tmp_path / "run")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_flag_and_missing_coco_root_exit_2(capsys) -> None:
    assert main(["--out", "x"]) == 2           # no data: neither --coco-root nor --train-csv (checked after parsing)
    err = capsys.readouterr().err.strip()
    assert "--coco-root" in err and "--train-csv" in err and len(err.splitlines()) == 1
    for argv, needle in ((["--coco-root", "x", "--arch", "resnet7"], "resnet7"),
                         (["--coco-root", "x", "--epochs", "two"], "--epochs")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and err.startswith("probres-train: error:")


def test_console_script_missing_data_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    r = _run(["--coco-root", str(tmp_path / "coco"), "--out", str(tmp_path / "run"), *TINY])
    assert r.returncode == 2
    assert r.stderr.strip().endswith("image directory not found (expected the COCO-2014 layout ROOT/train2014/)")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sigkill_mid_epoch_then_resume_finishes(toy_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--coco-root", str(toy_root), "--out", str(run), *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, "--epochs", "2", "--save-every", "3"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]        # still training when we kill it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(last)                                 # complete, loadable
    steps = ck.extra["progress"]["steps"]
    assert ck.epoch == 0 and 3 <= steps < ck.config["steps_per_epoch"]   # killed inside epoch 1
    assert not (run / "metrics.json").exists()

    # The recipe cannot be changed on resume; then the resumed run finishes.
    bad = _run(["--coco-root", str(toy_root), "--out", str(run), "--resume", "--epochs", "3"])
    assert bad.returncode == 2 and "differs from the run's 2" in bad.stderr
    again = _run(["--coco-root", str(toy_root), "--out", str(run), *TINY])
    assert again.returncode == 2 and "pass --resume" in again.stderr
    r = _run(["--coco-root", str(toy_root), "--out", str(run), "--resume", "--workers", "0", "--no-progress"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {last}: epoch 1, step {steps}/" in r.stdout
    doc = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    assert doc["epochs"][0]["steps"] == ck.config["steps_per_epoch"]   # the pre-kill steps count in epoch 1
    for e in doc["epochs"]:
        for w in ("raw", "ema"):
            assert set(e[w]) >= {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}
            assert e[w]["num_images"] == len(load_coco_split(toy_root, "val2014"))
        assert e["train_loss"] > 0 and 0 <= e["data_wait_frac"] <= 1
    final, best = load_checkpoint(last), load_checkpoint(run / "best_raw.pt")   # best.pt: calibrated, below
    assert final.epoch == 2 and final.extra["progress"]["steps"] == 0
    assert best.weights in ("raw", "ema") and best.val_metrics["mAP"] == doc["best"]["mAP"]
    assert best.val_metrics["mAP"] == max(max(e["raw"]["mAP"], e["ema"]["mAP"]) for e in doc["epochs"])
    # best.pt's recorded mAP is what its weights really score.
    assert _eval_checkpoint(run / "best_raw.pt", toy_root)["mAP"] == pytest.approx(best.val_metrics["mAP"], abs=1e-4)
    assert list(run.glob(".*.tmp")) == []                       # stale temp files cleaned
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "selected on val2014" in (run / "train.log").read_text()
    # The end of the run: calibration on the held-out split (kept out of training), thresholds in the contract.
    # best.pt is then the model to ship (best_raw.pt the uncalibrated one), its thresholds in the contract unless
    # the held-out split was too small to calibrate on (then the identity, said in the log).
    cal = load_checkpoint(run / "best.pt")
    rec = cal.extra["calibration"]
    assert rec["heldout_images"] >= 1 and (cal.contract.thresholds is None) == (rec["method"] == "identity")
    assert abs(rec["val_after"]["mAP"] - best.val_metrics["mAP"]) <= 1e-4
    assert "calibrate: val mAP" in (run / "train.log").read_text()


def _odd_val_root(toy_root: Path, dst: Path) -> Path:
    """toy_root with an odd number of val images (one dropped from the json if needed), images linked."""
    (dst / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014"):
        (dst / split).symlink_to(toy_root / split, target_is_directory=True)
    shutil.copy(toy_root / "annotations/instances_train2014.json", dst / "annotations")
    doc = json.loads((toy_root / "annotations/instances_val2014.json").read_text())
    if len({a["image_id"] for a in doc["annotations"]}) % 2 == 0:
        drop = doc["annotations"][0]["image_id"]
        doc["images"] = [i for i in doc["images"] if i["id"] != drop]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != drop]
    (dst / "annotations/instances_val2014.json").write_text(json.dumps(doc))
    return dst


def test_torchrun_two_processes_gloo(toy_root: Path, tmp_path: Path) -> None:
    root = _odd_val_root(toy_root, tmp_path / "coco")
    n_val, n_train = len(load_coco_split(root, "val2014")), len(load_coco_split(root, "train2014"))
    assert n_val % 2 == 1                           # uneven shards: DistributedSampler would pad a duplicate
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "--coco-root", str(root), "--out", str(run), *TINY, "--epochs", "1"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "x 2 on cpu" in r.stdout                 # 2 processes
    assert r.stdout.count("epoch 1/1:") == 1        # only rank 0 logs
    doc = json.loads((run / "metrics.json").read_text())
    e = doc["epochs"][0]
    assert e["raw"]["num_images"] == e["ema"]["num_images"] == n_val
    n_train -= len(json.loads((run / "holdout.json").read_text())["image_ids"])   # the held-out split is not trained on
    assert doc["config"]["world_size"] == 2 and doc["config"]["steps_per_epoch"] == n_train // (4 * 2)
    # The gathered val mAP equals a single-process evaluation of the saved weights on every image.
    ref = _eval_checkpoint(run / "last.pt", root)
    assert np.isfinite(ref["mAP"])
    assert ref["mAP"] == pytest.approx(e["raw"]["mAP"], abs=1e-4)
    assert ref["CF1"] == pytest.approx(e["raw"]["CF1"], abs=1e-4)
