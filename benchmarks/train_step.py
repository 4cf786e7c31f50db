"""Training-step throughput: images/s of the real train_step, synthetic batch and through the real loader.

    python -m benchmarks.train_step --arch resnet101 --image-size 448 --batch-size 64 --steps 30 --json out.json
    python -m benchmarks.train_step --arch resnet18 --image-size 64 --batch-size 8 --steps 3 --device cpu   # smoke

Three figures, same model / optimizer / precision / channels_last as probres-train
(train.engine.train_step: forward, BCE, backward, Adam step, OneCycle step, EMA update):
  synthetic    one in-memory batch already on the device: the compute ceiling;
  loader       the real pipeline on a toy COCO set (OpenCV decode, RandomResizedCrop,
               flip, RandAugment, Cutout in DataLoader workers, pinned memory), with the
               share of wall time the step loop spent waiting for data;
  loader_only  the DataLoader alone (no model): what the workers can supply.
The loader is not the bottleneck when loader_only >> synthetic and the wait share is small.
Timings synchronize the GPU at the ends of the timed window only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from runtime.coco import load_coco_split
from runtime.contract import PreprocessSpec
from runtime.fileio import atomic_write_text
from train.coco import CocoDataset
from train.distributed import DistInfo
from train.ema import ModelEma
from train.engine import (StepContext, build_optimizer, build_scheduler, make_loader, resolve_amp, to_device,
                          train_step)
from train.losses import build_loss
from train.model import ARCHS, build_model
from train.toy_coco import make_toy_coco


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _context(args, device: torch.device, num_classes: int, total_steps: int) -> StepContext:
    model = build_model(args.arch, num_classes).to(device).to(memory_format=torch.channels_last).train()
    if args.compile:
        model = torch.compile(model)
    amp = resolve_amp(args.amp, device)
    opt = build_optimizer(model, "adam", 1e-4, 1e-4)
    sched = build_scheduler(opt, 1e-4, 1, total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ema = ModelEma(model) if not args.compile else None   # EMA of a compiled module: keep the benchmark simple
    return StepContext(model, build_loss("bce"), opt, sched, scaler, ema, device, amp)


def bench_synthetic(args, device: torch.device, c: int) -> dict:
    ctx = _context(args, device, c, args.warmup + args.steps + 1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    targets = (torch.rand(args.batch_size, c, generator=g) > 0.95).float()
    images, targets = to_device(images, targets, device)
    for _ in range(args.warmup):
        train_step(ctx, images, targets)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(ctx, images, targets)
    _sync(device)
    dt = time.perf_counter() - t0
    assert torch.isfinite(loss)
    return {"images_per_s": args.steps * args.batch_size / dt, "step_ms": 1000 * dt / args.steps}


def _batches(loader, n: int):
    """n batches, cycling epochs; yields (wait_s, batch)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            yield time.perf_counter() - t0, b
            n -= 1
            if n == 0:
                return
        epoch += 1


def bench_loader(args, device: torch.device, root: Path) -> tuple[dict, dict]:
    split = load_coco_split(root, "train2014")
    ds = CocoDataset(split, PreprocessSpec(size=args.image_size), train=True)
    loader = make_loader(ds, args.batch_size, args.workers, device, DistInfo(), seed=0)
    if len(loader) == 0:
        raise SystemExit(f"error: the toy set has {len(ds)} images, fewer than --batch-size {args.batch_size}")
    # Loader alone (after the workers have started).
    for _, _ in _batches(loader, min(args.warmup, 2) or 1):
        pass
    t0 = time.perf_counter()
    for _, (x, _, _) in _batches(loader, args.steps):
        x.to(device, non_blocking=True)
    _sync(device)
    only = {"images_per_s": args.steps * args.batch_size / (time.perf_counter() - t0)}
    # Loader + training step.
    ctx = _context(args, device, split.targets.shape[1], args.warmup + args.steps + 1)
    wait, n = 0.0, 0
    for i, (w, (x, y, _)) in enumerate(_batches(loader, args.warmup + args.steps)):
        if i == args.warmup:
            _sync(device)
            t0, wait = time.perf_counter(), 0.0
        x, y = to_device(x, y, device)
        train_step(ctx, x, y)
        if i >= args.warmup:
            wait += w
            n += 1
    _sync(device)
    dt = time.perf_counter() - t0
    return ({"images_per_s": n * args.batch_size / dt, "data_wait_frac": wait / dt, "workers": args.workers,
             "train_images": len(ds)}, only)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet101")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (not what probres-train runs)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 1, at most 12)")
    p.add_argument("--toy-root", default=None, help="toy COCO root for the loader run (default: generate one)")
    p.add_argument("--toy-images", type=int, default=512, help="images to generate when --toy-root is not given")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        p.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.workers is None:
        args.workers = max(1, min(12, (os.cpu_count() or 2) - 1))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    amp = resolve_amp(args.amp, device)
    result = {"device": name, "torch": str(torch.__version__), "arch": args.arch, "image_size": args.image_size,
              "batch_size": args.batch_size, "amp": str(amp).replace("torch.", "") if amp else "fp32",
              "channels_last": True, "compile": args.compile, "steps": args.steps}
    result["synthetic"] = bench_synthetic(args, device, 80)
    print(f"{name}: {args.arch} @ {args.image_size}, batch {args.batch_size}, {result['amp']}: "
          f"synthetic {result['synthetic']['images_per_s']:.1f} images/s", flush=True)
    if not args.skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.toy_root) if args.toy_root else make_toy_coco(tmp, n_train=args.toy_images, n_val=1)
            result["loader"], result["loader_only"] = bench_loader(args, device, root)
        print(f"  real loader ({args.workers} workers): {result['loader']['images_per_s']:.1f} images/s, "
              f"waiting for data {100 * result['loader']['data_wait_frac']:.0f}% of the time; "
              f"loader alone {result['loader_only']['images_per_s']:.1f} images/s")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
