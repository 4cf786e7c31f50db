"""Where and how this process trains: its device, DataLoader workers, RNG state and log.

    python -c "from train.run_env import rng_state; print(sorted(rng_state()))"

train/trainer.py uses these; last.pt carries rng_state() so that --resume continues rank 0's
random streams (augmentation, dropout) where the run left them.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from train import distributed as D
from train.config import UsageError


def pick_device(name: str, info: D.DistInfo) -> torch.device:
    """--device auto|cpu|cuda|cuda:N as this process's device (under torchrun: its local rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device available (use --device cpu)")
        dev = torch.device("cuda", info.local_rank if info.enabled or name == "cuda" else int(name.split(":")[1]))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True      # fixed input size: let cuDNN pick the fastest kernels
        return dev
    return torch.device("cpu")


def default_workers(device: torch.device, info: D.DistInfo) -> int:
    """DataLoader workers per process without --workers: CUDA min(12, cores per GPU - 1), CPU 1."""
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    return max(1, min(12, cores - 1)) if device.type == "cuda" else 1


def resolve_augment_on(name: str, device: torch.device) -> str:
    """--augment-on auto: on the GPU when training there, else in the DataLoader workers."""
    if name == "auto":
        return "device" if device.type == "cuda" else "worker"
    return name


def rng_state() -> dict:
    """torch, CUDA, numpy and Python generator states as tensors and plain values (weights_only loads them)."""
    keys = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys[1].astype(np.int64)), "pos": int(keys[2])},
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"]["keys"].numpy().astype(np.uint32), s["numpy"]["pos"], 0, 0.0))
    random.setstate(s["python"])


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Logger:
    """print + RUN_DIR/train.log on rank 0; silent elsewhere."""

    def __init__(self, run_dir: Path, on: bool) -> None:
        self.path, self.on = run_dir / "train.log", on

    def __call__(self, msg: str) -> None:
        if self.on:
            print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")
