"""fit(): one training run, from set-up to best.pt, resumable at any checkpoint.

    probres-train --coco-root data/toy_coco --out runs/toy ...   (train/__main__.py resolves the config)

RUN_DIR gets last.pt (every epoch, and every --save-every steps), best.pt (the raw or EMA
weights with the best val mAP so far; at the end, when calibration runs, it becomes the
calibrated model to ship and best_raw.pt keeps the uncalibrated one: train.calibrate),
metrics.json (one entry per epoch, rewritten atomically), train.log and tb/ (TensorBoard). Only rank 0 writes. Checkpoints go through
train.checkpoint.save_checkpoint (temp file + rename): a kill -9 at any moment leaves the
previous complete file.

The steps: setup() (run directory, data, loaders, model, optimizer, schedule), resume() (last.pt's
state), start_log(), then per epoch run_epoch() (train, evaluate) and record_epoch() (rank 0:
best.pt, last.pt via save_last(), metrics.json, TensorBoard), and finish() (calibration).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from runtime.coco import CocoDataError, CocoSplit
from runtime.csv_labels import write_csv
from runtime.contract import ModelContract, PreprocessSpec
from runtime.fileio import atomic_write_text
from train import distributed as D
from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from train.coco import CocoDataset, load_splits
from train.config import TrainConfig, UsageError
from train.ema import WARMUP_FRACTION, ModelEma
from train.holdout import split_train, write_holdout
from train.engine import (EpochProgress, StepContext, build_optimizer, build_scheduler, epoch_loss, evaluate,
                          make_loader, resolve_amp, summary, train_one_epoch)
from train.losses import build_loss
from train.model import build_model
from train.run_env import Logger, default_workers, pick_device, resolve_augment_on, rng_state, seed_all, set_rng_state

# The learning-rate reference: ASL / ML-Decoder train Adam at lr 1e-4 on a global batch of 128.
REF_GLOBAL_BATCH = 128
# Deep ResNets at full resolution are not trained from scratch by any published recipe.
DEEP_ARCHS = ("resnet50", "resnet101", "resnet152")

def selection_note(cfg: TrainConfig) -> str:
    """What best.pt is chosen on, in words, for the log and metrics.json (COCO's val2014, or the CSV's val split)."""
    val = ("val2014" if cfg.coco_root else f"--val-csv {cfg.val_csv}" if cfg.val_csv
           else f"the --val-frac {cfg.val_frac} split of --train-csv")
    return f"best.pt is selected on {val} mAP (raw vs EMA weights), as the published recipes do: not a held-out figure"


def init_note(arch: str, image_size: int, pretrained: str | None, resumed: bool) -> tuple[str, str | None]:
    """(how the weights were initialised, a warning or None) for the first log line."""
    if resumed:
        return "weights: resumed from last.pt", None
    if pretrained:
        return f"weights: ImageNet backbone from {pretrained}, new {arch} head", None
    note = "weights: random initialisation (no --pretrained: training from scratch)"
    if arch in DEEP_ARCHS and image_size >= 224:
        return note, (f"WARNING: {arch} @ {image_size} from scratch: the published COCO recipes all start from "
                      f"ImageNet weights and expect ~0.8 mAP only with them; pass --pretrained imagenet")
    return note, None


def effective_lr(lr: float, global_batch: int, scale: str) -> tuple[float, str]:
    """The lr the schedule peaks at, and the log's sentence saying how it was derived."""
    ref = f"reference: Adam lr 1e-4 at a global batch of {REF_GLOBAL_BATCH} (ASL)"
    if scale == "linear":
        eff = lr * global_batch / REF_GLOBAL_BATCH
        return eff, f"lr {eff:.3g} = --lr {lr:g} x global batch {global_batch} / {REF_GLOBAL_BATCH} (--lr-scale linear; {ref})"
    same = "the reference batch" if global_batch == REF_GLOBAL_BATCH else \
        f"not the reference {REF_GLOBAL_BATCH}: --lr-scale linear would scale it"
    return lr, f"lr {lr:g} at global batch {global_batch}, unscaled ({same}; {ref})"


def fit(cfg: TrainConfig, resume_from: Path | None = None) -> dict:
    """Train per `cfg` (resolved by train/__main__.py), continuing `resume_from` (a last.pt) when given;
    returns the metrics.json document (rank 0)."""
    info = D.env_info()
    device = pick_device(cfg.device, info)
    D.init(info, device)
    try:
        return _fit(cfg, resume_from, info, device)
    finally:
        D.cleanup()


@dataclass
class Run:
    """One training run: what setup() builds, resume() restores and each epoch advances."""

    cfg: TrainConfig
    info: D.DistInfo
    run_dir: Path
    log: Logger
    contract: ModelContract
    train_split: CocoSplit
    val_split: CocoSplit
    held_split: CocoSplit        # the held-out part of train2014: never trained on (train/holdout.py)
    train_loader: DataLoader
    val_loader: DataLoader
    model: torch.nn.Module       # the plain model: EMA, evaluation and checkpoints use it
    ctx: StepContext             # the training step's model (DDP and/or compiled), optimizer, schedule, scaler, EMA
    workers: int
    augment_on: str
    global_batch: int
    lr: float                    # the peak lr the schedule uses (--lr-scale applied)
    notes: tuple[str, str | None, str]   # (init_note's sentence, its warning, effective_lr's sentence)
    resolved: dict = field(default_factory=dict)   # cfg + what this run resolved: the checkpoints' "config"
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"mAP": -1.0, "epoch": 0, "weights": None})
    start_epoch: int = 0
    prog: EpochProgress = field(default_factory=EpochProgress)   # the current epoch's totals
    writer: Any = None           # TensorBoard's SummaryWriter (rank 0)


def _fit(cfg: TrainConfig, resume_from: Path | None, info: D.DistInfo, device: torch.device) -> dict:
    run, ckpt = setup(cfg, info, device, resume_from)
    if ckpt is not None:
        resume(run, ckpt)
    start_log(run, resume_from)
    doc: dict = {}
    for epoch in range(run.start_epoch, cfg.epochs):
        doc = run_epoch(run, epoch) or doc
    finish(run)
    return doc


def prepare_run_dir(cfg: TrainConfig, info: D.DistInfo) -> Path:
    """RUN_DIR, made by rank 0, without the temp files of a run killed while writing."""
    run_dir = Path(cfg.out)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(run_dir.glob(".last.pt.*.tmp")) + list(run_dir.glob(".best.pt.*.tmp")):
            stale.unlink(missing_ok=True)
    return run_dir


def load_data(cfg: TrainConfig, run_dir: Path, info: D.DistInfo) -> tuple[CocoSplit, CocoSplit, CocoSplit]:
    """(train, val, held-out) splits; rank 0 writes val.csv (--val-frac) and holdout.json.

    One image-set policy for training's val and the runtime's probres-eval. --skip-bad-images
    covers training images listed but missing on disk too: dropped, counted, logged.
    """
    try:
        train_split, val_split = load_splits(cfg)     # COCO-2014 or label CSVs (train/coco.py)
    except CocoDataError as e:
        hint = " (pass --skip-bad-images to skip and count such files)" if "image file not found" in str(e) else ""
        raise CocoDataError(f"{e}{hint}") from None
    if info.is_main and cfg.val_frac:       # the val part as a file probres-eval --csv can take
        write_csv(run_dir / "val.csv", val_split, cfg.images)
    # The held-out part of train2014 (train/holdout.py) never reaches the training loader.
    train_split, held_split = split_train(train_split, cfg.holdout_frac, cfg.seed)
    if info.is_main and len(held_split):
        write_holdout(run_dir, held_split, cfg.holdout_frac, cfg.seed)
    return train_split, val_split, held_split


def setup(cfg: TrainConfig, info: D.DistInfo, device: torch.device,
          resume_from: Path | None) -> tuple[Run, Checkpoint | None]:
    """The run's directory, data, loaders, model, optimizer and schedule; and last.pt when resuming."""
    run_dir = prepare_run_dir(cfg, info)
    log = Logger(run_dir, info.is_main)
    seed_all(cfg.seed + info.rank)
    workers = cfg.workers if cfg.workers is not None else default_workers(device, info)
    amp_dtype = resolve_amp(cfg.amp, device)
    train_split, val_split, held_split = load_data(cfg, run_dir, info)
    contract = ModelContract(train_split.labels, PreprocessSpec(size=cfg.image_size))
    ckpt = load_checkpoint(resume_from) if resume_from else None
    if ckpt is not None and ckpt.contract.labels != contract.labels:
        raise UsageError(f"--resume: {resume_from} was trained on other labels than {cfg.data_name} has")
    augment_on = resolve_augment_on(cfg.augment_on, device)
    train_ds = CocoDataset(train_split, contract.preprocess, True, cfg.augment, augment_on)
    val_ds = CocoDataset(val_split, contract.preprocess, False)
    train_loader = make_loader(train_ds, cfg.batch_size, workers, device, info, cfg.seed)
    val_loader = make_loader(val_ds, cfg.batch_size, workers, device, info, cfg.seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} x {info.world_size} processes exceeds the "
                         f"{len(train_ds)} training images (no full batch)")

    init, init_warning = init_note(cfg.arch, cfg.image_size, cfg.pretrained_note or cfg.pretrained, ckpt is not None)
    model = build_model(cfg.arch, contract.labels.num_classes, None if ckpt else cfg.pretrained_file or cfg.pretrained)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = ModelEma.from_epochs(model, cfg.ema_epochs, steps_per_epoch)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    if cfg.compile:
        net = torch.compile(net)      # the training step's forward + backward (Inductor); EMA and eval use `model`
    global_batch = cfg.batch_size * info.world_size
    lr, lr_note = effective_lr(cfg.lr, global_batch, cfg.lr_scale)
    opt = build_optimizer(model, cfg.optimizer, lr, cfg.weight_decay, global_batch)
    sched = build_scheduler(opt, lr, cfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    gpu_aug = train_ds.augment if augment_on == "device" else None
    ctx = StepContext(net, build_loss(cfg.loss), opt, sched, scaler, ema, device, amp_dtype, gpu_aug, cfg.skip_bad_images)
    run = Run(cfg, info, run_dir, log, contract, train_split, val_split, held_split, train_loader, val_loader,
              model, ctx, workers, augment_on, global_batch, lr, (init, init_warning, lr_note))
    return run, ckpt


def resume(run: Run, ckpt: Checkpoint) -> None:
    """Restore last.pt's weights, optimizer, schedule, scaler, EMA, history, epoch progress and rank 0's RNG."""
    x, ctx = ckpt.extra, run.ctx
    if x.get("world_size", 1) != run.info.world_size:
        raise UsageError(f"--resume: the run used {x.get('world_size', 1)} processes, this is {run.info.world_size} "
                         f"(the schedule's steps per epoch would change)")
    run.model.load_state_dict(ckpt.state_dict)
    ctx.optimizer.load_state_dict(x["optimizer"])
    ctx.scheduler.load_state_dict(x["scheduler"])
    if ctx.scaler is not None and x.get("scaler"):
        ctx.scaler.load_state_dict(x["scaler"])
    ctx.ema.load_state_dict(x["ema"])
    run.history, run.best = list(x["history"]), dict(x["best"])
    # A last.pt from before `batches` existed: its steps were its batches unless one was skipped.
    run.start_epoch, run.prog = ckpt.epoch, EpochProgress(**({"batches": x["progress"]["steps"]} | x["progress"]))
    if run.info.is_main:
        set_rng_state(x["rng"])
    else:   # only rank 0's generator state is saved; other ranks get a fresh, distinct stream
        seed_all(run.cfg.seed + run.info.rank + 7919 * x["global_step"])


def start_log(run: Run, resume_from: Path | None) -> None:
    """Log what is about to run, record it in run.resolved and open TensorBoard (rank 0)."""
    cfg, info, ctx, log = run.cfg, run.info, run.ctx, run.log
    init, init_warning, lr_note = run.notes
    steps_per_epoch = len(run.train_loader)
    amp_name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}[ctx.amp_dtype]
    log(f"probres-train: {init}; {cfg.arch} @ {cfg.image_size}, {run.contract.labels.num_classes} labels, {cfg.loss} loss, "
        f"{cfg.augment} augmentation (on the {run.augment_on}), {cfg.epochs} epochs x {steps_per_epoch} steps of "
        f"{cfg.batch_size} x {info.world_size} on {ctx.device.type} ({amp_name}, channels_last"
        f"{', torch.compile' if cfg.compile else ''}), {run.workers} workers/process")
    if init_warning:
        log(init_warning)
        if info.is_main:
            print(f"probres-train: {init_warning}", file=sys.stderr, flush=True)
    if resume_from is not None:
        log(f"resumed from {resume_from}: epoch {run.start_epoch + 1}, step {run.prog.steps}/{steps_per_epoch} of it")
    decay = {"adam": f"Adam, coupled L2 {cfg.weight_decay:g} on a batch-summed loss as the recipe "
                     f"(= {cfg.weight_decay / run.global_batch:.3g} on our image-mean loss)",
             "adamw": f"AdamW, decoupled weight decay {cfg.weight_decay:g}"}[cfg.optimizer]
    ema = ctx.ema
    log(f"{lr_note}; {decay}; EMA over {cfg.ema_epochs:g} epochs ({ema.horizon:.0f} steps: decay "
        f"{ema.decay:.6f} per step, warmed up over the first {ema.horizon / WARMUP_FRACTION:.0f})")
    log(run.train_split.describe())
    log(run.held_split.describe() + " (kept out of training for calibration and thresholds: holdout.json)")
    if run.train_split.missing:
        gone = run.train_split.missing
        log(f"skipped {len(gone)} training images listed in the annotations but not on disk (--skip-bad-images), "
            f"e.g. {gone[0]}")
    log(run.val_split.describe())
    log(selection_note(cfg))
    run.resolved = {**cfg.to_dict(), "workers": run.workers, "world_size": info.world_size, "amp_dtype": amp_name,
                    "steps_per_epoch": steps_per_epoch, "torch": str(torch.__version__), "global_batch": run.global_batch,
                    "lr_effective": run.lr, "ema_decay_per_step": ema.decay, "augment_on_resolved": run.augment_on}
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(run.run_dir / "tb"))


def save_last(run: Run, epoch_done: int, val: dict) -> None:
    """last.pt: raw weights + everything --resume needs. Rank 0 only."""
    ctx = run.ctx
    extra = {"optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
             "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else {}, "ema": ctx.ema.state_dict(),
             "rng": rng_state(), "history": run.history, "best": run.best, "progress": asdict(run.prog),
             "global_step": int(ctx.scheduler.last_epoch), "world_size": run.info.world_size}
    save_checkpoint(run.run_dir / "last.pt", Checkpoint(run.cfg.arch, run.model.state_dict(), run.contract,
                                                        run.resolved, epoch_done, val, "raw", extra))


def run_epoch(run: Run, epoch: int) -> dict | None:
    """Train epoch `epoch` (0-based) from where run.prog stands, evaluate raw and EMA weights on val,
    and (rank 0) record it: returns the metrics.json document (None on other ranks)."""
    cfg, info, ctx = run.cfg, run.info, run.ctx
    steps_per_epoch = len(run.train_loader)

    def on_step(p: EpochProgress) -> None:
        # (the epoch's last step is saved at the epoch end anyway, with its val metrics)
        if info.is_main and ctx.scheduler.last_epoch % cfg.save_every == 0 and p.steps < steps_per_epoch:
            save_last(run, epoch, run.history[-1]["raw"] if run.history else {})

    t0 = time.perf_counter()
    sampler = run.train_loader.sampler
    sampler.set_epoch(epoch)
    sampler.set_start(run.prog.batches * cfg.batch_size)   # past every batch taken, skipped too
    train_one_epoch(ctx, run.train_loader, epoch + 1, cfg.epochs, info, run.prog,
                    on_step if cfg.save_every else None, cfg.progress)
    sampler.set_start(0)
    loss = epoch_loss(run.prog, ctx.device)
    skipped = round(D.all_mean(float(run.prog.skipped), ctx.device) * info.world_size)   # over all ranks
    t_train = time.perf_counter() - t0
    D.broadcast_state(run.model)
    D.broadcast_state(ctx.ema.module)
    raw = evaluate(run.model, run.val_loader, run.val_split.targets, ctx.device, ctx.amp_dtype)
    ema_m = evaluate(ctx.ema.module, run.val_loader, run.val_split.targets, ctx.device, ctx.amp_dtype)
    prog, run.prog = run.prog, EpochProgress()
    if not info.is_main:
        return None
    return record_epoch(run, epoch, prog, loss, skipped, t0, t_train, raw, ema_m)


def record_epoch(run: Run, epoch: int, prog: EpochProgress, loss: float, skipped: int, t0: float, t_train: float,
                 raw: dict, ema_m: dict) -> dict:
    """Rank 0 after epoch `epoch`: history, best.pt when val mAP improved, last.pt, metrics.json,
    TensorBoard and the log line. Returns the metrics.json document."""
    entry = {"epoch": epoch + 1, "train_loss": loss, "lr": run.ctx.scheduler.get_last_lr()[0], "steps": prog.steps,
             "train_images_per_s": prog.images / max(prog.data_wait_s + prog.compute_s, 1e-9),
             "data_wait_s": prog.data_wait_s, "data_wait_frac": prog.data_wait_s / max(prog.data_wait_s + prog.compute_s, 1e-9),
             "epoch_time_s": time.perf_counter() - t0, "raw": summary(raw), "ema": summary(ema_m),
             "skipped_images": skipped, "skipped_paths": prog.skipped_paths}
    run.history.append(entry)
    sel, sel_m = ("ema", ema_m) if ema_m["mAP"] > raw["mAP"] else ("raw", raw)
    improved = sel_m["mAP"] > run.best["mAP"]
    if improved:
        run.best = {"mAP": sel_m["mAP"], "epoch": epoch + 1, "weights": sel}
        weights = run.ctx.ema.module.state_dict() if sel == "ema" else run.model.state_dict()
        save_checkpoint(run.run_dir / "best.pt", Checkpoint(run.cfg.arch, weights, run.contract, run.resolved,
                                                            epoch + 1, sel_m, sel))
    save_last(run, epoch + 1, raw)
    doc = {"selection": selection_note(run.cfg), "best": run.best, "config": run.resolved, "epochs": run.history}
    atomic_write_text(run.run_dir / "metrics.json", json.dumps(doc, indent=1))
    for k in ("train_loss", "lr", "train_images_per_s", "data_wait_frac"):
        run.writer.add_scalar(f"train/{k}", entry[k], epoch + 1)
    for w, m in (("raw", raw), ("ema", ema_m)):
        for k, v in summary(m).items():
            run.writer.add_scalar(f"val_{w}/{k}", v, epoch + 1)
    run.writer.flush()
    best = run.best
    run.log(f"epoch {epoch + 1}/{run.cfg.epochs}: loss {loss:.4f}, lr {entry['lr']:.2e}, "
            f"{entry['train_images_per_s']:.1f} img/s, data wait {entry['data_wait_s']:.1f} s "
            f"({100 * entry['data_wait_frac']:.0f}% of {t_train:.1f} s) | val mAP raw {raw['mAP']:.4f} "
            f"ema {ema_m['mAP']:.4f} on {raw['num_images']} images | best {best['mAP']:.4f} "
            f"(epoch {best['epoch']}, {best['weights']}){' -> best.pt' if improved else ''}"
            f"{f' | skipped {skipped} unreadable training images' if skipped else ''}")
    return doc


def finish(run: Run) -> None:
    """Close TensorBoard, wait for every rank, and (rank 0) calibrate best.pt on the held-out split."""
    if run.writer is not None:
        run.writer.close()
    D.barrier()
    cfg = run.cfg
    if run.info.is_main and cfg.calibrate and len(run.held_split) and (run.run_dir / "best.pt").is_file():
        from train.calibrate import calibrate_run     # best.pt becomes the calibrated model, best_raw.pt the raw one
        calibrate_run(run.run_dir, label_dependency=cfg.label_dependency, device=run.ctx.device,
                      batch_size=cfg.batch_size, log=run.log)
