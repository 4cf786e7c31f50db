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
import pickle
import zipfile
from pathlib import Path
from typing import Any

from runtime.contract import ContractError, ModelContract
from runtime.errors import ModelError

CHECKPOINT_FORMAT = "probres-checkpoint/1"
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class CheckpointError(ModelError, ValueError):
    """A checkpoint file is missing, truncated, or not a probres checkpoint; the message names it."""


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], ModelContract]:
    """(the checkpoint's dict, its parsed contract), read with torch.load(weights_only=True) on the CPU."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):       # torch.save writes a zip archive; anything else is not one of ours
        what = "an ONNX model: run it with the onnxruntime backend" if path.suffix.lower() == ".onnx" else \
            "not the zip archive torch.save writes"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({what})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running whatever the file holds: never.
        raise CheckpointError(f"{path}: not a loadable checkpoint: it holds Python objects beyond tensors and plain "
                              f"containers; probres only loads checkpoints safely (weights_only) and does not unpickle it"
                              ) from None
    except Exception as e:
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{path}: not a loadable checkpoint ({e.__class__.__name__}"
                              f"{': ' + text if 'weights_only' not in text else ''})") from None
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


# The label-dependency head's parameters (train/label_dependency.py fits them; the head is
# defined here so that the runtime's PyTorch backend builds it without importing train).
LABEL_DEPENDENCY_KEYS = ("fc.dep_scale", "fc.dep_weight", "fc.dep_bias")
_DEPENDENT_LINEAR: Any = None


def dependent_linear_class() -> Any:
    """The nn.Linear subclass z' = dep_scale * z + sigmoid(z) @ dep_weight.T + dep_bias, z = W x + b.

    (N, F) features -> (N, C) logits; dep_weight (C, C) has a zero diagonal (fitted so). Built on
    first use, so that importing this module needs no torch.
    """
    global _DEPENDENT_LINEAR
    if _DEPENDENT_LINEAR is None:
        import torch
        import torch.nn as nn

        class DependentLinear(nn.Linear):
            """The classifier head with the label-dependency update (a one-step mean field over the labels)."""

            def __init__(self, in_features: int, num_classes: int) -> None:
                super().__init__(in_features, num_classes)
                self.dep_scale = nn.Parameter(torch.ones(num_classes))
                self.dep_weight = nn.Parameter(torch.zeros(num_classes, num_classes))
                self.dep_bias = nn.Parameter(torch.zeros(num_classes))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                z = super().forward(x)                                  # (N, C) backbone logits
                return self.dep_scale * z + torch.sigmoid(z) @ self.dep_weight.T + self.dep_bias

        _DEPENDENT_LINEAR = DependentLinear
    return _DEPENDENT_LINEAR


def has_label_dependency(state_dict: dict) -> bool:
    """Whether a state_dict carries the label-dependency head."""
    return all(k in state_dict for k in LABEL_DEPENDENCY_KEYS)


def build_network(arch: str, num_classes: int, label_dependency: bool = False) -> Any:
    """torchvision's `arch` (no weights) with its 1000-way fc replaced by a `num_classes`-way linear head (logits),
    or by the label-dependency head."""
    import torch.nn as nn
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None)
    head = dependent_linear_class() if label_dependency else nn.Linear
    model.fc = head(model.fc.in_features, num_classes)
    return model


def network_with_weights(arch: str, num_classes: int, state_dict: dict) -> Any:
    """build_network for these weights (the label-dependency head when they carry it), loaded, in eval mode.

    The one way a checkpoint becomes a network: the PyTorch backend (load_network) and training,
    calibration and export (train.checkpoint.Checkpoint.build) all come here.
    """
    model = build_network(arch, num_classes, has_label_dependency(state_dict))
    model.load_state_dict(state_dict)
    return model.eval()


def load_network(path: str | os.PathLike[str]) -> tuple[Any, ModelContract, dict[str, Any]]:
    """(network with the checkpoint's weights in eval mode on the CPU, contract, val_metrics); CheckpointError names the file."""
    obj, contract = read_checkpoint(path)
    try:
        model = network_with_weights(obj["arch"], contract.labels.num_classes, obj["state_dict"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:    # weights that do not fit the arch
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: checkpoint weights do not build a {obj['arch']} "
                              f"({text[0][:200] if text else e.__class__.__name__})") from None
    metrics = obj.get("val_metrics") or {}
    return model, contract, dict(metrics) if isinstance(metrics, dict) else {}
