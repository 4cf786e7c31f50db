"""Distributed set-up for `torchrun --nproc_per_node=G -m train ...`, and the samplers.

    torchrun --nproc_per_node=2 -m train --coco-root data/toy_coco --out runs/ddp --device cpu

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT); without them this is
one process, rank 0 of 1, and nothing is initialised. Backend: nccl on CUDA, gloo on CPU.

Training shards with DistributedSampler (drop_last, so every rank runs the same number of
steps); ResumableSampler lets a run killed mid-epoch skip the batches it already did.
Validation must score every val image exactly once: DistributedSampler pads the last
shard with duplicates, so validation uses ShardSampler (rank r takes r, r+G, ...; shards
differ by at most one image), and gather_scores() puts the pieces back in image order.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank/world from torchrun's environment (rank 0 of 1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """Start the process group (no-op for one process)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=30), **kwargs)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks (the value itself for one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


@torch.no_grad()
def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank.

    DDP keeps parameters in sync, but each rank's last forward updates its own BatchNorm
    running statistics (and each rank's EMA averages its own), so before evaluating or
    saving, every rank takes rank 0's state: then every shard of the val set is scored
    by the same weights, the ones written to the checkpoint.
    """
    if dist.is_initialized():
        for t in module.state_dict().values():
            if t.is_contiguous():
                dist.broadcast(t, src=0)
            else:   # channels_last weights: collectives want a dense standard layout
                tmp = t.contiguous()
                dist.broadcast(tmp, src=0)
                t.copy_(tmp)


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose next epoch can start `start` samples into its shard."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Indices rank, rank + G, rank + 2G, ... of range(n): every index on exactly one rank, no padding."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def gather_scores(indices: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor | None:
    """Assemble (k,) dataset indices and (k, C) scores from every rank into (n, C) on rank 0.

    Returns None on other ranks. Checks that every index 0..n-1 arrived exactly once.
    """
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        # Objects, not tensors: shards differ in length, and nccl would need CUDA tensors.
        dist.gather_object((indices.cpu(), scores.cpu()), parts if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            return None
        indices = torch.cat([p[0] for p in parts])
        scores = torch.cat([p[1] for p in parts])
    if len(indices) != n or not torch.equal(torch.sort(indices).values, torch.arange(n)):
        raise RuntimeError(f"validation gathered {len(indices)} scores for {n} images (duplicates or gaps)")
    out = torch.empty_like(scores)
    out[indices] = scores
    return out
