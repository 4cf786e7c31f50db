"""Read a probres training checkpoint where the runtime may: weights_only, torch imported lazily.

    python -c "from runtime.checkpoint import read_checkpoint; print(read_checkpoint('runs/x/best.pt')['arch'])"

The PyTorch backend needs the checkpoint's network, and `runtime` must not import `train`
(train imports runtime; the runtime is a leaf). So the reader and the network's definition
live here and `train.checkpoint` / `train.model` build on them. torch and torchvision are
imported inside the functions: importing this module costs nothing on a device without them.

A checkpoint is a plain dict (nothing pickled beyond what torch.load(weights_only=True) admits):
format "probres-checkpoint/1", arch (torchvision ResNet name), state_dict, contract (ModelContract
JSON), config, epoch, val_metrics, weights; last.pt adds the training state (see train.checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtime.contract import ContractError, ModelContract

CHECKPOINT_FORMAT = "probres-checkpoint/1"
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not a probres checkpoint; the message names it."""


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ModelContract]:
    """(the checkpoint's dict, its parsed contract), read with torch.load(weights_only=True) on the CPU."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint "
                              f"({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file")
    for key in ("arch", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{path}: incomplete checkpoint (no {key!r})")
    try:
        contract = ModelContract.from_json(obj["contract"])
    except (KeyError, TypeError, ContractError) as e:
        raise CheckpointError(f"{path}: bad model contract ({e})") from None
    return obj, contract


def build_network(arch: str, num_classes: int) -> Any:
    """torchvision's `arch` (no weights) with its 1000-way fc replaced by a `num_classes`-way linear head (logits)."""
    import torch.nn as nn
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def load_network(path: str | os.PathLike[str]) -> tuple[Any, ModelContract, dict[str, Any]]:
    """(network with the checkpoint's weights in eval mode on the CPU, contract, val_metrics); CheckpointError names the file."""
    obj, contract = read_checkpoint(path)
    try:
        model = build_network(obj["arch"], contract.labels.num_classes)
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:    # weights that do not fit the arch
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: checkpoint weights do not build a {obj['arch']} "
                              f"({text[0][:200] if text else e.__class__.__name__})") from None
    metrics = obj.get("val_metrics") or {}
    return model.eval(), contract, dict(metrics) if isinstance(metrics, dict) else {}
