"""Training-step throughput and the input pipeline: the real train_step, synthetic and through the real loader.

    python -m benchmarks.train_step --arch resnet101 --image-size 448 --batch-size 64 --steps 30 --ablations --json out.json
    python -m benchmarks.train_step --worker-cpu-only --worker-images 32 --json cpu.json        # the CPU half, one thread
    python -m benchmarks.train_step --arch resnet18 --image-size 64 --batch-size 8 --steps 3 --device cpu   # smoke

Figures (train.engine.train_step: forward, BCE, backward, Adam step, OneCycle step, EMA update):
  synthetic    one in-memory batch already on the device: the compute ceiling (fused Adam,
               channels_last, as probres-train);
  ablations    (--ablations) the same without fused Adam, in NCHW, and under torch.compile:
               what each of the three step optimizations is worth, measured in one run;
  loader       the real pipeline on a generated toy COCO set (decode, the recipe's geometry in
               DataLoader workers; augmentation on the device or in the workers, --augment-on)
               and the share of wall time the step loop waited for data;
  loader_only  the DataLoader alone, batches moved to the device and (device mode) augmented
               there: what the pipeline can supply; the target is >= 1.3x what the step consumes;
  worker_cpu   CPU seconds per image of one worker (one thread, COCO-like photos from
               benchmarks.images): main's worker pipeline before issue 11 (decode, RandomResizedCrop,
               flip, RandAugment, normalize, RandomErasing), the recipes augmented in the worker,
               and what a worker still does with augmentation on the device (decode + geometry).
Targets (ResNet-101 @448, bf16, one H100/H200): loader >= 800 images/s with data wait < 10%,
loader_only >= 1.3x loader; worker_cpu with device augmentation <= 1/3 of main's. Timings
synchronize the GPU at the ends of each timed window only. The JSON is rewritten after every
measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as v2

from runtime.coco import CocoSplit, load_coco_split
from runtime.contract import LabelSet, PreprocessSpec
from runtime.fileio import atomic_write_text
from runtime.preprocess import decode
from train.augment import CROP_SCALE, RECIPES
from train.coco import CocoDataset
from train.distributed import DistInfo
from train.ema import ModelEma
from train.engine import (StepContext, build_optimizer, build_scheduler, make_loader, resolve_amp, to_device,
                          train_step)
from train.losses import build_loss
from train.model import ARCHS, build_model
from train.run_env import resolve_augment_on
from train.toy_coco import make_toy_coco


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepBench:
    """What is timed: the model, the batch, how many steps, and the loader's workers and augmentation."""

    arch: str = "resnet101"
    image_size: int = 448
    batch_size: int = 64
    amp: str = "auto"                   # auto, bf16, fp16, off
    steps: int = 20
    warmup: int = 5
    workers: int = 1
    augment: str = "asl"
    augment_on: str = "worker"          # worker or device (main resolves "auto")


def _context(cfg: StepBench, device: torch.device, num_classes: int, total_steps: int, fused: bool | None = None,
             channels_last: bool = True, compile_: bool = False) -> StepContext:
    model = build_model(cfg.arch, num_classes).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEma.from_epochs(model, 5.2, 100)
    net = torch.compile(model) if compile_ else model
    amp = resolve_amp(cfg.amp, device)
    opt = build_optimizer(model, "adam", 1e-4, 1e-4, cfg.batch_size, fused=fused)
    sched = build_scheduler(opt, 1e-4, 1, total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    return StepContext(net, build_loss("bce"), opt, sched, scaler, ema, device, amp)


def bench_synthetic(cfg: StepBench, device: torch.device, c: int, **variant) -> dict:
    """images/s and ms per step of train_step on one in-memory batch (variant: _context's fused, channels_last,
    compile_)."""
    ctx = _context(cfg, device, c, cfg.warmup + cfg.steps + 1, **variant)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
    targets = (torch.rand(cfg.batch_size, c, generator=g) > 0.95).float()
    images, targets = to_device(images, targets, device)
    if not variant.get("channels_last", True):
        images = images.contiguous()
    for _ in range(max(cfg.warmup, 3 if variant.get("compile_") else 0)):
        train_step(ctx, images, targets)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        loss = train_step(ctx, images, targets)
    _sync(device)
    dt = time.perf_counter() - t0
    assert torch.isfinite(loss)
    return {"images_per_s": cfg.steps * cfg.batch_size / dt, "step_ms": 1000 * dt / cfg.steps}


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


def bench_loader(cfg: StepBench, device: torch.device, root: Path) -> tuple[dict, dict]:
    """The real loader on the toy set at `root`: train steps fed by it (with the share of time waiting for data),
    and the loader alone."""
    split = load_coco_split(root, "train2014")
    ds = CocoDataset(split, PreprocessSpec(size=cfg.image_size), True, cfg.augment, cfg.augment_on)
    aug = ds.augment if cfg.augment_on == "device" else None
    loader = make_loader(ds, cfg.batch_size, cfg.workers, device, DistInfo(), seed=0)
    if len(loader) == 0:
        raise SystemExit(f"error: the toy set has {len(ds)} images, fewer than --batch-size {cfg.batch_size}")
    for _, (x, y, _) in _batches(loader, min(cfg.warmup, 2) or 1):      # workers started, kernels warm
        to_device(x, y, device, aug)
    t0 = time.perf_counter()
    for _, (x, y, _) in _batches(loader, cfg.steps):
        to_device(x, y, device, aug)
    _sync(device)
    only = {"images_per_s": cfg.steps * cfg.batch_size / (time.perf_counter() - t0)}
    ctx = _context(cfg, device, split.targets.shape[1], cfg.warmup + cfg.steps + 1)
    wait, n = 0.0, 0
    for i, (w, (x, y, _)) in enumerate(_batches(loader, cfg.warmup + cfg.steps)):
        if i == cfg.warmup:
            _sync(device)
            t0, wait = time.perf_counter(), 0.0
        x, y = to_device(x, y, device, aug)
        train_step(ctx, x, y)
        if i >= cfg.warmup:
            wait += w
            n += 1
    _sync(device)
    dt = time.perf_counter() - t0
    return ({"images_per_s": n * cfg.batch_size / dt, "data_wait_frac": wait / dt, "workers": cfg.workers,
             "train_images": len(ds), "augment": cfg.augment, "augment_on": cfg.augment_on}, only)


def main_branch_worker_transform(spec: PreprocessSpec) -> v2.Compose:
    """main's training transform before issue 11 ("full"), per image in the worker: the baseline."""
    return v2.Compose([v2.RandomResizedCrop(spec.size, scale=CROP_SCALE, antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandAugment(num_ops=2, magnitude=9), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
                       v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0.0)])


def bench_worker_cpu(size: int, count: int, repeats: int) -> dict:
    """CPU ms per image of one worker thread: main's pipeline, the recipes in the worker, and with device augmentation."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    from benchmarks.images import build_image_set
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_image_set(tmp, count)
        split = CocoSplit("bench", paths, list(range(count)), np.zeros((count, 1), np.uint8),
                          LabelSet.from_categories([(1, "person")]), count, 0, False)
        spec = PreprocessSpec(size=size)
        legacy = main_branch_worker_transform(spec)
        cases = {"main (before issue 11): worker does everything":
                 lambda i: legacy(torch.from_numpy(decode(paths[i])).permute(2, 0, 1)),
                 "decode only": lambda i: decode(paths[i])}
        for recipe in RECIPES:
            for where in ("worker", "device"):
                ds = CocoDataset(split, spec, True, recipe, where)
                cases[f"{recipe}, augmentation on the {where}"] = ds.load
        out = {}
        for name, fn in cases.items():
            fn(0)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.process_time()
                for i in range(count):
                    fn(i)
                best = min(best, (time.process_time() - t0) / count)
            out[name] = {"cpu_ms_per_image": 1000 * best}
            print(f"  worker CPU, one thread, {name}: {1000 * best:.2f} ms/image", flush=True)
    base = out["main (before issue 11): worker does everything"]["cpu_ms_per_image"]
    ratios = {f"{r}_device_vs_main": out[f"{r}, augmentation on the device"]["cpu_ms_per_image"] / base for r in RECIPES}
    return {"image_size": size, "images": count, "repeats": repeats, "threads": 1, "cases": out, "ratios": ratios,
            "target": "asl_device_vs_main <= 1/3"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet101")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    p.add_argument("--augment", choices=RECIPES, default="asl")
    p.add_argument("--augment-on", choices=("auto", "worker", "device"), default="auto",
                   help="auto: device on CUDA, else worker")
    p.add_argument("--ablations", action="store_true", help="also time the step without fused Adam, NCHW, and compiled")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 1, at most 12)")
    p.add_argument("--toy-root", default=None, help="toy COCO root for the loader run (default: generate one)")
    p.add_argument("--toy-images", type=int, default=512, help="images to generate when --toy-root is not given")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--worker-images", type=int, default=0, help="measure worker CPU time on this many photos (0: skip)")
    p.add_argument("--worker-repeats", type=int, default=3)
    p.add_argument("--worker-cpu-only", action="store_true", help="only the worker CPU measurement (no model)")
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
    args.augment_on = resolve_augment_on(args.augment_on, device)
    if args.workers is None:
        args.workers = max(1, min(12, (os.cpu_count() or 2) - 1))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = StepBench(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, amp=args.amp,
                    steps=args.steps, warmup=args.warmup, workers=args.workers, augment=args.augment,
                    augment_on=args.augment_on)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    amp = resolve_amp(args.amp, device)
    result = {"device": name, "torch": str(torch.__version__), "arch": args.arch, "image_size": args.image_size,
              "batch_size": args.batch_size, "amp": str(amp).replace("torch.", "") if amp else "fp32",
              "channels_last": True, "fused_adam": device.type == "cuda", "steps": args.steps}

    def save() -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=1))

    if args.worker_cpu_only:
        args.worker_images = args.worker_images or 32
    else:
        result["synthetic"] = bench_synthetic(cfg, device, 80)
        save()
        print(f"{name}: {args.arch} @ {args.image_size}, batch {args.batch_size}, {result['amp']}: "
              f"synthetic {result['synthetic']['images_per_s']:.1f} images/s", flush=True)
        if not args.skip_loader:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(args.toy_root) if args.toy_root else make_toy_coco(tmp, n_train=args.toy_images, n_val=1)
                result["loader"], result["loader_only"] = bench_loader(cfg, device, root)
            result["loader_only_vs_loader"] = result["loader_only"]["images_per_s"] / result["loader"]["images_per_s"]
            save()
            print(f"  real loader ({args.workers} workers, {args.augment} augmentation on the {args.augment_on}): "
                  f"{result['loader']['images_per_s']:.1f} images/s, waiting for data "
                  f"{100 * result['loader']['data_wait_frac']:.0f}% of the time; loader alone "
                  f"{result['loader_only']['images_per_s']:.1f} images/s ({result['loader_only_vs_loader']:.2f}x)", flush=True)
        if args.ablations:
            result["ablations"] = {}
            variants = {"no fused Adam": {"fused": False}, "NCHW (no channels_last)": {"channels_last": False}}
            if device.type == "cuda":
                variants["torch.compile"] = {"compile_": True}
            for label, kw in variants.items():
                result["ablations"][label] = bench_synthetic(cfg, device, 80, **kw)
                save()
                print(f"  synthetic, {label}: {result['ablations'][label]['images_per_s']:.1f} images/s", flush=True)
    if args.worker_images:
        result["worker_cpu"] = bench_worker_cpu(args.image_size, args.worker_images, args.worker_repeats)
        save()
        print(f"  worker CPU ratios (device augmentation / main's worker): {result['worker_cpu']['ratios']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
