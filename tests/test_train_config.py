"""TrainConfig (train/config.py) and the split trainer: old configs load, a resumed run equals an uninterrupted one.

    .venv/bin/python -m pytest -q tests/test_train_config.py

The resume test trains resnet18 @ 32 px on the 48-image toy set: 2 epochs straight, against the
same run's end-of-epoch-1 last.pt (its config rewritten as an older probres stored it) resumed.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import FrozenInstanceError, fields, replace
from pathlib import Path

import pytest
import torch

import train.trainer as T
from train.__main__ import build_parser, main, parse_args, resolve_config
from train.config import RECIPE, RESOLVED, RUN_OPTIONS, TrainConfig, UsageError

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
        "--device", "cpu", "--no-progress", "--no-calibrate"]
TRAIN = Path(__file__).resolve().parents[1] / "train"


def test_from_dict_reads_fields_drops_the_rest_and_fills_defaults() -> None:
    # A last.pt "config" as probres wrote it before TrainConfig: recipe, run options, resolved facts
    # (world_size, steps_per_epoch, ...), a retired key (ema_decay), no holdout_frac, the old augment name.
    old = {"arch": "resnet18", "image_size": 64, "epochs": 3, "augment": "full", "coco_root": "/data/coco",
           "workers": 2, "world_size": 8, "steps_per_epoch": 641, "torch": "2.1.0", "lr_effective": 1e-4,
           "ema_decay": 0.9997, "progress": False}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.arch, cfg.image_size, cfg.epochs, cfg.coco_root, cfg.workers, cfg.progress) == \
        ("resnet18", 64, 3, "/data/coco", 2, False)
    assert cfg.augment == "crop" and cfg.holdout_frac == 0.0        # the two legacy rules
    assert (cfg.lr, cfg.batch_size, cfg.ema_epochs, cfg.train_csv) == (1e-4, 64, 5.2, None)   # defaults
    # What a checkpoint stores now reads back as the same config.
    new = TrainConfig(arch="resnet50", train_csv="t.csv", val_frac=0.1, images="img", pretrained="imagenet")
    assert TrainConfig.from_dict(new.to_dict() | {"world_size": 2}) == new
    assert TrainConfig().holdout_frac == 0.05                       # a fresh run's default is not the legacy 0.0
    with pytest.raises(FrozenInstanceError):
        new.epochs = 2


def test_every_recipe_setting_is_a_flag_that_defaults_to_none() -> None:
    """--resume refuses a recipe flag given with another value: it must see which were given (None: not)."""
    defaults = {a.dest: a.default for a in build_parser()._actions}
    assert {k: defaults.get(k, "no such flag") for k in RECIPE} == dict.fromkeys(RECIPE)
    names = [f.name for f in fields(TrainConfig)]
    assert sorted(RECIPE + RUN_OPTIONS + RESOLVED) == sorted(names)      # each field in exactly one


def test_flags_become_the_config(toy_root: Path, tmp_path: Path) -> None:
    cfg, given, resume = parse_args(["--coco-root", str(toy_root), "--out", str(tmp_path / "r"), "--epochs", "3",
                                     "--no-calibrate", "--no-progress", "--holdout-frac", "0"])
    assert given == {"epochs", "holdout_frac"} and resume is False
    assert cfg == TrainConfig(epochs=3, holdout_frac=0.0, coco_root=str(toy_root), out=str(tmp_path / "r"),
                              calibrate=False, progress=False)
    assert resolve_config(cfg, given) == (cfg, None)
    with pytest.raises(UsageError, match="--epochs must be >= 1, got 0"):
        resolve_config(TrainConfig(epochs=0, coco_root=str(toy_root), out=str(tmp_path / "r")))


def test_no_function_in_train_takes_a_namespace_but_the_argument_parsing() -> None:
    """Issue 20: argparse stays in main / parse_args / build_parser."""
    parsing = {"main", "parse_args", "build_parser"}
    found = []
    for path in sorted(TRAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in parsing:
                for a in node.args.args + node.args.kwonlyargs:
                    if a.arg == "args" or (a.annotation is not None and "Namespace" in ast.unparse(a.annotation)):
                        found.append(f"{path.name}:{node.name}({a.arg})")
    assert found == []


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def one_thread():
    """torch on one thread for this test (2 shared cores: oversubscribed threads made it 3x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_two_epochs_equal_one_epoch_then_resume(toy_root: Path, tmp_path: Path, monkeypatch, one_thread) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    resumed.mkdir()
    real_save = T.save_checkpoint

    def save_and_keep_epoch_1(path, ckpt) -> None:
        real_save(path, ckpt)
        if Path(path).name == "last.pt" and ckpt.epoch == 1 and ckpt.extra["progress"]["steps"] == 0:
            shutil.copy(path, resumed / "last.pt")          # as if the run had stopped right after epoch 1

    monkeypatch.setattr(T, "save_checkpoint", save_and_keep_epoch_1)
    assert main(["--coco-root", str(toy_root), "--out", str(straight), *TINY, "--epochs", "2",
                 "--holdout-frac", "0"]) == 0
    monkeypatch.undo()

    # Store epoch 1's config as probres did before TrainConfig: no null data keys, no pretrained_file/note,
    # the retired ema_decay, and no holdout_frac (such a run had no held-out split: read as 0.0).
    obj = torch.load(resumed / "last.pt", weights_only=True)
    obj["config"] = {k: v for k, v in obj["config"].items() if v is not None and k != "holdout_frac"} | \
        {"ema_decay": 0.9997}
    torch.save(obj, resumed / "last.pt")
    assert main(["--coco-root", str(toy_root), "--out", str(resumed), "--resume", "--workers", "0",
                 "--no-progress", "--device", "cpu", "--no-calibrate"]) == 0

    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("state_dict", "optimizer", "scheduler", "ema", "val_metrics", "best", "global_step"):
        assert _tensors_equal(a[key], b[key]), key
    assert TrainConfig.from_dict(b["config"]) == replace(TrainConfig.from_dict(a["config"]), out=str(resumed))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert ma["best"] == mb["best"]
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        for k in ("epoch", "train_loss", "lr", "steps", "raw", "ema", "skipped_images"):
            assert ea[k] == eb[k], (ea["epoch"], k)
    # best.pt: the resumed run writes one only when epoch 2 beat epoch 1, and then the same weights.
    if ma["best"]["epoch"] == 2:
        assert _tensors_equal(torch.load(straight / "best.pt", weights_only=True)["state_dict"],
                              torch.load(resumed / "best.pt", weights_only=True)["state_dict"])
    else:
        assert not (resumed / "best.pt").exists()
