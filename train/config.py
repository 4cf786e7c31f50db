"""TrainConfig: one training run's settings, typed, with their defaults in one place.

    python -c "from train.config import TrainConfig; print(TrainConfig(coco_root='data/coco'))"

probres-train (train/__main__.py) builds one from its flags, resolve_config checks it (or reads
the run to continue from last.pt) and train.trainer.fit runs it; from Python the same:
    fit(*resolve_config(TrainConfig(coco_root="data/coco", out="runs/r18", arch="resnet18")))
A checkpoint stores it as a plain dict (dataclasses.asdict, plus the facts fit() resolved:
world_size, steps_per_epoch, ...), so checkpoints stay readable without this module
(runtime.checkpoint, export/); TrainConfig.from_dict reads such a dict back, old ones too.
No torch here: `probres-train --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from runtime.errors import UsageError as _RuntimeUsageError
from train.holdout import MAX_FRAC


class UsageError(_RuntimeUsageError, ValueError):
    """Bad command-line input (flags, --out, --resume): one line on stderr, exit code 2."""


# The recipe: the settings that define a run. On --resume they come from last.pt, and a flag
# giving one a different value is refused (it would silently change the run being continued).
RECIPE = ("arch", "image_size", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "loss", "amp",
          "ema_epochs", "seed", "keep_empty", "pretrained", "augment", "lr_scale", "holdout_frac")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are ASL's / ML-Decoder's ResNet-101 COCO recipe (train/__main__.py)."""

    # The recipe (RECIPE).
    arch: str = "resnet101"
    image_size: int = 448
    epochs: int = 40
    batch_size: int = 64                 # per process
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    loss: str = "bce"
    amp: str = "auto"
    ema_epochs: float = 5.2
    seed: int = 0
    keep_empty: bool = False
    pretrained: str | None = None        # "imagenet", a path, or None (from scratch)
    augment: str = "asl"
    lr_scale: str = "none"
    holdout_frac: float = 0.05
    # The data: a COCO-2014 root, or label CSVs (train_csv with val_csv or val_frac, images).
    coco_root: str | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    val_frac: float | None = None
    images: str | None = None
    # How this process runs it (free to change on --resume).
    out: str = "runs/train"
    device: str = "auto"
    workers: int | None = None           # None: train.run_env.default_workers
    save_every: int = 0                  # optimizer steps between mid-epoch last.pt writes (0: epoch ends only)
    progress: bool = True
    augment_on: str = "auto"
    compile: bool = False
    skip_bad_images: bool = False
    calibrate: bool = True
    label_dependency: bool = False
    # --pretrained resolved to a file, and the words the log uses for it (train.pretrained).
    pretrained_file: str | None = None
    pretrained_note: str | None = None

    @property
    def data_name(self) -> str:
        """The run's data source in words, for messages: the COCO root or the training CSV."""
        return str(self.coco_root) if self.coco_root else str(self.train_csv)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a checkpoint and metrics.json store."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainConfig:
        """A stored config (a checkpoint's "config") as a TrainConfig, from any probres version.

        The rule: keys that are fields are read; every other key is dropped, for it is either a
        fact fit() resolved for that process (workers as resolved, world_size, steps_per_epoch,
        lr_effective, torch, ...: fit() records them again) or a retired setting (ema_decay, the
        per-step decay before --ema-epochs: not carried over). Fields it lacks take their
        defaults, except holdout_frac: a run from before the held-out split had none (0.0).
        The old recipe name augment "full" reads as "crop".
        """
        names = {f.name for f in fields(cls)}
        kept = {"holdout_frac": 0.0} | {k: v for k, v in saved.items() if k in names}
        if kept.get("augment") == "full":
            kept["augment"] = "crop"
        return cls(**kept)

    def check(self) -> None:
        """Raise UsageError naming the flag of the first value out of its range."""
        rules = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("image_size", 32 <= self.image_size <= 4096, "in 32..4096"), ("lr", self.lr > 0, "> 0"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"), ("ema_epochs", self.ema_epochs > 0, "> 0"),
                 ("holdout_frac", 0 <= self.holdout_frac <= MAX_FRAC, f"in [0, {MAX_FRAC}]")]
        for key, ok, what in rules:
            if not ok:
                raise UsageError(f"--{key.replace('_', '-')} must be {what}, got {getattr(self, key)}")


# The rest: the data (it may have moved) and how this process runs, which a resumed run takes from
# the command line; and RESOLVED, which it keeps from last.pt (--pretrained is not fetched again).
RESOLVED = ("pretrained_file", "pretrained_note")
RUN_OPTIONS = tuple(f.name for f in fields(TrainConfig) if f.name not in RECIPE + RESOLVED)


def check_data_source(cfg: TrainConfig) -> None:
    """The run's data, checked: a COCO root, or a training CSV with --val-csv or --val-frac and --images."""
    csv_flags = {"--train-csv": cfg.train_csv, "--val-csv": cfg.val_csv, "--val-frac": cfg.val_frac,
                 "--images": cfg.images}
    given = [f for f, v in csv_flags.items() if v is not None]
    if cfg.coco_root is not None:
        if given:
            raise UsageError(f"--coco-root and {given[0]}: give either a COCO root or CSV labels, not both")
        if not Path(cfg.coco_root).is_dir():
            raise UsageError(f"--coco-root {cfg.coco_root}: no such directory")
        return
    if cfg.train_csv is None:
        raise UsageError(f"{given[0]} needs --train-csv" if given else
                         "give --coco-root DIR, or --train-csv FILE with --images DIR and --val-csv FILE or --val-frac F")
    if cfg.images is None:
        raise UsageError("--train-csv needs --images DIR (the directory its image names are relative to)")
    if (cfg.val_csv is None) == (cfg.val_frac is None):
        raise UsageError("--train-csv needs exactly one of --val-csv FILE and --val-frac F")
    if cfg.val_frac is not None and not 0 < cfg.val_frac <= MAX_FRAC:
        raise UsageError(f"--val-frac must be in (0, {MAX_FRAC}], got {cfg.val_frac}")
    for flag, path in (("--train-csv", cfg.train_csv), ("--val-csv", cfg.val_csv)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if not Path(cfg.images).is_dir():
        raise UsageError(f"--images {cfg.images}: no such directory")


def resolve_config(cfg: TrainConfig, given: frozenset[str] = frozenset(),
                   resume: bool = False) -> tuple[TrainConfig, Path | None]:
    """The run to start (`cfg`, checked) or, with `resume`, to continue: last.pt's recipe, refusing any of
    `given` (the recipe settings given as flags) that differs from it; and the last.pt to continue from."""
    check_data_source(cfg)
    if cfg.workers is not None and cfg.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {cfg.save_every}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a directory (--out names the run directory)")
    last = run_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UsageError(f"--resume: {last} not found (no run to continue in --out {run_dir}; drop --resume to start one)")
        from train.checkpoint import load_checkpoint
        saved = TrainConfig.from_dict(load_checkpoint(last).config)
        for k in sorted(given, key=RECIPE.index):
            if getattr(saved, k) != getattr(cfg, k):
                raise UsageError(f"--resume: --{k.replace('_', '-')} {getattr(cfg, k)} differs from the run's "
                                 f"{getattr(saved, k)} (a resumed run keeps its recipe; start a new --out to change it)")
        cfg = replace(saved, **{k: getattr(cfg, k) for k in RUN_OPTIONS})
    elif last.exists():
        raise UsageError(f"--out {run_dir} already holds a run ({last}); pass --resume to continue it or choose another --out")
    cfg.check()
    if not resume and cfg.pretrained is not None:   # imagenet: fetched (or found in the hub cache) before any work
        from train.pretrained import resolve_pretrained
        file, note = resolve_pretrained(cfg.pretrained, cfg.arch)
        cfg = replace(cfg, pretrained_file=str(file), pretrained_note=note)
    return cfg, (last if resume else None)
