"""Shared, session-scoped test data: a small toy COCO set and a small untrained checkpoint.

Built once per test session (a few seconds on 2 cores) and reused read-only by every test.
Tests that need to change them copy them first.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy COCO-2014 tree: train2014/ (48 images), val2014/ (24), annotations/."""
    from train.toy_coco import make_toy_coco

    root = tmp_path_factory.mktemp("toy_coco")
    make_toy_coco(root, n_train=48, n_val=24, seed=0)
    return root


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory: pytest.TempPathFactory, toy_root: Path) -> Path:
    """best.pt of an untrained resnet18 @ 64 px on the toy label set (fixed seed)."""
    import json

    import torch

    from runtime.contract import LabelSet, ModelContract, PreprocessSpec
    from train.checkpoint import Checkpoint, save_checkpoint
    from train.model import build_model

    cats = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    contract = ModelContract(LabelSet.from_categories(cats), PreprocessSpec(size=64))
    torch.manual_seed(0)
    model = build_model("resnet18", contract.labels.num_classes).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, Checkpoint(arch="resnet18", state_dict=model.state_dict(), contract=contract,
                                     config={"arch": "resnet18", "image_size": 64}, epoch=0))
    return path
