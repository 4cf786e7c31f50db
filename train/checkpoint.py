"""Checkpoints: written atomically, loaded with torch.load(weights_only=True).

    python -c "from train.checkpoint import load_checkpoint; print(load_checkpoint('runs/x/best.pt').arch)"

A checkpoint is a plain dict of tensors, numbers and strings (nothing pickled beyond what
weights_only admits):
  format        "probres-checkpoint/1"
  arch          torchvision ResNet name
  state_dict    model weights (the selected weights: raw or EMA, see "weights")
  contract      ModelContract JSON (labels + preprocessing)
  config        the run's train.config.TrainConfig as a plain dict (asdict) plus what fit() resolved
                (world_size, steps_per_epoch, ...); TrainConfig.from_dict reads it back, old ones too
  epoch         last finished epoch (1-based)
  val_metrics   val metrics of these weights (dict, may be empty)
  weights       "raw" or "ema"
last.pt also holds the training state needed by --resume (optimizer, scheduler, scaler,
ema_state_dict, rng states, metrics history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from runtime.checkpoint import CHECKPOINT_FORMAT, CheckpointError, network_with_weights, read_checkpoint
from runtime.contract import ModelContract
from runtime.fileio import atomic_open

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]


@dataclass
class Checkpoint:
    arch: str
    state_dict: dict[str, torch.Tensor]
    contract: ModelContract
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    val_metrics: dict[str, Any] = field(default_factory=dict)
    weights: str = "raw"
    extra: dict[str, Any] = field(default_factory=dict)   # resume state (last.pt only)

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode, on the CPU (with its label-dependency head if it has one):
        runtime.checkpoint's builder, the network the PyTorch backend runs."""
        return network_with_weights(self.arch, self.contract.labels.num_classes, self.state_dict)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it.

    A crash (even SIGKILL) mid-write leaves the previous file intact, never a truncated one.
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` atomically."""
    obj = {
        "format": CHECKPOINT_FORMAT,
        "arch": ckpt.arch,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "contract": ckpt.contract.to_json(),
        "config": ckpt.config,
        "epoch": int(ckpt.epoch),
        "val_metrics": ckpt.val_metrics,
        "weights": ckpt.weights,
        **ckpt.extra,
    }
    atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a probres checkpoint safely (runtime.checkpoint: weights_only=True); CheckpointError names the file."""
    obj, contract = read_checkpoint(path)
    known = {"format", "arch", "state_dict", "contract", "config", "epoch", "val_metrics", "weights"}
    return Checkpoint(
        arch=obj["arch"], state_dict=obj["state_dict"], contract=contract, config=obj.get("config", {}),
        epoch=int(obj.get("epoch", 0)), val_metrics=obj.get("val_metrics", {}), weights=obj.get("weights", "raw"),
        extra={k: v for k, v in obj.items() if k not in known},
    )
