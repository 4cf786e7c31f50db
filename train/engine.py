"""The training step, the epoch loop and evaluation; the optimizer, schedule, precision and loaders.

    python -m train --coco-root data/toy_coco --out runs/toy ...   (train/__main__.py drives these)

Precision: on CUDA, autocast bf16 where the GPU supports it (no loss scaling needed), else
fp16 with a GradScaler. On CPU plain fp32: measured on this project's 2-core AMD EPYC
(no AMX / avx512_bf16), autocast bf16 made the resnet18 training step ~7x slower
(0.4 vs 2.7 images/s at 224 px), so "auto" never picks it there; --amp bf16 forces it.
Memory format: channels_last for model and inputs (cuDNN's fast NHWC kernels for
tensor cores). On this CPU it was 2.6x faster at 224 px (7.0 vs 2.7 images/s, resnet18,
shared machine) and within noise of NCHW at 64 px, so it is used everywhere.
Evaluation: the backbone under the same autocast, the head (pooled features, fc) in float32
(logits_fp32_head), so val scores carry float32 resolution for tie-aware AP.
Input: with a BatchAugment in the StepContext, batches arrive uint8 and are augmented on the
device (train/augment.py); a row whose image did not decode stops the run with one line
naming the file, or is dropped and counted (--skip-bad-images).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.metrics import multilabel_metrics
from train.augment import BatchAugment
from train.coco import BadImageError, CocoDataset, worker_init
from train.distributed import DistInfo, ResumableSampler, ShardSampler, all_mean, gather_scores
from train.ema import ModelEma

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("adam", "adamw")
# Scalars copied from runtime.metrics.multilabel_metrics into metrics.json / TensorBoard.
METRIC_KEYS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3",
               "OP_top3", "OR_top3", "OF1_top3", "num_images")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """autocast dtype for --amp on `device` (None: fp32)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: not on biases or BatchNorm (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def coupled_decay(weight_decay: float, global_batch: int) -> float:
    """Adam's L2 coefficient on our image-mean loss that equals `weight_decay` on a batch-summed loss.

    The recipe (ASL) sums the loss over the batch: its gradient is global_batch x ours, and
    Adam is invariant to the gradient's scale except against the decay term (train/losses.py).
    """
    return weight_decay / global_batch


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, global_batch: int,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """'adam': Adam with coupled L2 decay, as the published recipe on its sum-reduced loss; 'adamw': decoupled.

    fused: torch's fused multi-tensor kernel (default: on CUDA).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be adam or adamw, got {name!r}")
    if fused is None:
        fused = next(model.parameters()).is_cuda
    kw = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(param_groups(model, coupled_decay(weight_decay, global_batch)), lr=lr, **kw)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, **kw)


def build_scheduler(opt: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int):
    """OneCycleLR(max_lr=lr, pct_start=0.2), stepped after every optimizer step.

    OneCycleLR divides by zero when its warm-up phase is shorter than ~1 step (fewer than 8
    steps in all at pct_start 0.2): tiny runs stretch the warm-up to 1.5 steps; a 1-step
    run keeps a constant lr.
    """
    total = epochs * steps_per_epoch
    if total < 2:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pct = max(0.2, 1.5 / total)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=pct)


def make_loader(ds: CocoDataset, batch_size: int, workers: int, device: torch.device, info: DistInfo,
                seed: int) -> DataLoader:
    """Train loader (shuffled DistributedSampler shard, drop_last) or val loader (ShardSampler, in order)."""
    if ds.train:
        sampler = ResumableSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                   seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(ds), info.rank, info.world_size)
    extra = {}
    if workers > 0:
        # A worker forked while OpenCV's thread pool is live inherits the pool's locks without
        # its threads and hangs in its first cv2 call (seen after make_toy_coco ran in-process).
        # With one thread OpenCV keeps no pool; the parent does no decoding when workers exist.
        cv2.setNumThreads(1)
        extra = {"persistent_workers": True, "prefetch_factor": 4, "worker_init_fn": worker_init}
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=ds.train, **extra)


@dataclass
class StepContext:
    """What one training step needs besides the batch."""

    model: nn.Module                 # possibly DDP-wrapped
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    device: torch.device
    amp_dtype: torch.dtype | None
    augment: BatchAugment | None = None   # set: batches arrive uint8 and are augmented on `device`
    skip_bad_images: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's OptimizedModule and/or DistributedDataParallel."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
              augment: BatchAugment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on `device`, channels_last float32; a uint8 batch is augmented there by `augment`."""
    images = images.to(device, non_blocking=True)
    if augment is not None:
        images = augment(images)                                      # uint8 -> float32 (N, 3, S, S)
    return images.contiguous(memory_format=torch.channels_last), targets.to(device, non_blocking=True)


def drop_bad_images(batch: tuple, dataset: CocoDataset, skip: bool, prog: "EpochProgress | None" = None,
                    processes: int = 1) -> tuple:
    """Remove the rows whose image did not decode (index < 0), or raise BadImageError naming the file.

    With several processes a batch whose every image failed cannot be skipped: this process would
    leave out an optimizer step whose gradient all-reduce the others wait in (a hang, not an error).
    """
    images, targets, index = batch
    bad = index < 0
    if not bool(bad.any()):
        return batch
    first = int(-1 - index[bad][0])
    if not skip:
        raise BadImageError(f"{dataset.bad_image_message(first)} (pass --skip-bad-images to skip and count such files)")
    if processes > 1 and bool(bad.all()):
        raise BadImageError(f"{dataset.bad_image_message(first)}: every image of this process's batch of {len(index)} "
                            f"failed, which --skip-bad-images cannot skip with {processes} processes (the others would "
                            f"wait for its step); remove or fix the files")
    if prog is not None:
        prog.skipped += int(bad.sum())
        prog.skipped_paths = (prog.skipped_paths + [str(dataset.split.image_paths[int(-1 - i)]) for i in index[bad]])[:20]
    keep = ~bad
    return images[keep], targets[keep], index[keep]


def train_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a (N,3,S,S) batch with (N,C) targets; returns the loss (a 0-d tensor, not synced)."""
    with autocast(ctx.device, ctx.amp_dtype):
        logits = ctx.model(images)                                    # (N, C)
    loss = ctx.loss_fn(logits, targets)                               # fp32
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        ctx.optimizer.step()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(unwrap(ctx.model))
    return loss.detach()


@dataclass
class EpochProgress:
    """Running totals of the current epoch (saved in last.pt so a mid-epoch resume keeps them)."""

    steps: int = 0
    batches: int = 0                          # loader batches taken, skipped ones too: where a resume restarts
    loss_sum: float = 0.0
    images: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    skipped: int = 0                          # training images that did not decode (--skip-bad-images)
    skipped_paths: list = field(default_factory=list)   # the first few of them


def train_one_epoch(ctx: StepContext, loader: DataLoader, epoch: int, epochs: int, info: DistInfo,
                    prog: EpochProgress, on_step=None, progress_bar: bool = True) -> EpochProgress:
    """Run the rest of one epoch; `on_step(prog)` after each step (mid-epoch checkpoints)."""
    ctx.model.train()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{epochs}", disable=not (info.is_main and progress_bar),
               dynamic_ncols=True, mininterval=1.0, leave=False)
    losses: list[torch.Tensor] = []   # kept on device; synced every few steps, not every step
    t_last = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            images, targets, _ = drop_bad_images(next(it), loader.dataset, ctx.skip_bad_images, prog, info.world_size)
        except StopIteration:
            break
        prog.batches += 1
        t1 = time.perf_counter()
        if images.shape[0] == 0:     # every image of the batch was unreadable (and skipped)
            continue
        images, targets = to_device(images, targets, ctx.device, ctx.augment)
        losses.append(train_step(ctx, images, targets))
        prog.steps += 1
        prog.images += images.shape[0] * info.world_size
        prog.data_wait_s += t1 - t0
        if len(losses) >= 10 or prog.steps % 10 == 0:
            prog.loss_sum += float(torch.stack(losses).sum())
            losses.clear()
        now = time.perf_counter()
        prog.compute_s += now - t1
        bar.update(1)
        if bar.n % 5 == 0 or bar.n == len(loader):
            synced = prog.steps - len(losses)       # steps whose loss has reached the host (0: show none yet)
            bar.set_postfix(loss=f"{prog.loss_sum / synced:.4f}" if synced else "-",
                            img_s=f"{images.shape[0] * info.world_size / max(now - t_last, 1e-9):.1f}")
        t_last = now
        if on_step is not None:
            if losses:
                prog.loss_sum += float(torch.stack(losses).sum())
                losses.clear()
            on_step(prog)
    if losses:
        prog.loss_sum += float(torch.stack(losses).sum())
    bar.close()
    return prog


def logits_fp32_head(model: nn.Module, images: torch.Tensor, device: torch.device,
                     amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(N, C) float32 logits: the backbone under autocast, the pooled features and fc in float32.

    bf16 logits keep 8 mantissa bits: on 40k val images x 80 classes a class's scores take a
    few hundred distinct values and tie-aware AP loses about 0.001 mAP. The fc layer is
    0.003% of ResNet-101's FLOPs, so running it in float32 costs nothing measurable.
    """
    m = unwrap(model)
    with autocast(device, amp_dtype):
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        x = m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x)))))     # (N, F, 1, 1)
    with torch.autocast(device.type, enabled=False):
        return m.fc(torch.flatten(x, 1).float())


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
            n: int) -> np.ndarray | None:
    """Sigmoid scores (n, C) float32 for the whole val set, gathered on rank 0 (None elsewhere)."""
    model.eval()
    idx, out = [], []
    for batch in loader:
        images, _, index = drop_bad_images(batch, loader.dataset, skip=False)   # val: every image or stop
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        out.append(torch.sigmoid(logits_fp32_head(model, images, device, amp_dtype)).cpu())
        idx.append(index)
    c = unwrap(model).fc.out_features
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    scores = torch.cat(out) if out else torch.zeros(0, c)
    full = gather_scores(indices, scores, n)
    return None if full is None else full.numpy()


def evaluate(model: nn.Module, loader: DataLoader, targets: np.ndarray, device: torch.device,
             amp_dtype: torch.dtype | None) -> dict | None:
    """runtime.metrics.multilabel_metrics over every val image (rank 0; None on other ranks)."""
    scores = predict(model, loader, device, amp_dtype, len(targets))
    if scores is None:
        return None
    return multilabel_metrics(scores, targets)


def summary(metrics: dict) -> dict:
    """The scalar metrics (no per-class AP list) for metrics.json and logs."""
    return {k: metrics[k] for k in METRIC_KEYS if k in metrics}


def epoch_loss(prog: EpochProgress, device: torch.device) -> float:
    """Mean train loss over the epoch's steps, averaged over ranks."""
    return all_mean(prog.loss_sum / max(prog.steps, 1), device)
