"""probres-train: the ResNet + BCE multi-label trainer for COCO-2014 (also `python -m train`).

    probres-train --coco-root data/coco --out runs/r101 --batch-size 128 --pretrained imagenet   # one GPU
    torchrun --nproc_per_node=8 -m train --coco-root data/coco --out runs/r101 --batch-size 16 --pretrained imagenet
    probres-train --coco-root data/coco --out runs/r101 --resume              # continue RUN_DIR/last.pt
    probres-train --train-csv train.csv --val-csv val.csv --images DIR --out runs/mine ...   # docs/datasets-csv.md

Defaults are ASL's / ML-Decoder's ResNet-101 COCO recipe (resnet101 @ 448, 40 epochs, Adam
lr 1e-4 for a global batch of 128, coupled weight decay 1e-4 off biases/BN on the recipe's
batch-summed loss, OneCycle, AMP, channels_last, an EMA over 5.2 epochs (0.9997 per step at
batch 128), squash to 448 + Cutout + RandAugment). --batch-size is per device: the commands
above keep the reference global batch of 128 (--lr-scale linear scales lr for other batches).
The documented CPU toy configuration is in README ("Training"). Usage errors (a missing
--coco-root, a bad flag, a missing --pretrained file, --resume without last.pt) print one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from runtime.checkpoint import ARCHS      # torch-free (train.model imports torch): --help stays fast
from train.config import RECIPE, TrainConfig, UsageError, resolve_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line, not argparse's usage block
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="probres-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--coco-root", metavar="DIR",
                   help="COCO-2014 root: train2014/, val2014/, annotations/instances_{train,val}2014.json")
    p.add_argument("--train-csv", metavar="FILE", help="instead of --coco-root: training labels as a CSV "
                   "(image,labels or one 0/1 column per label; docs/datasets-csv.md); needs --images")
    p.add_argument("--val-csv", metavar="FILE", help="with --train-csv: the val labels (same form and labels)")
    p.add_argument("--val-frac", type=float, metavar="F", help="with --train-csv, instead of --val-csv: this part "
                   "of the training CSV is the val set (the same images for every --seed; written to RUN_DIR/val.csv)")
    p.add_argument("--images", metavar="DIR", help="with --train-csv: the directory the CSVs' image names are relative to")
    p.add_argument("--out", default="runs/train", metavar="RUN_DIR", help="run directory (default runs/train)")
    p.add_argument("--arch", choices=ARCHS, default=None, help="torchvision ResNet (default resnet101)")
    p.add_argument("--image-size", type=int, default=None, help="train/eval input size (default 448)")
    p.add_argument("--epochs", type=int, default=None, help="default 40")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 64)")
    p.add_argument("--lr", type=float, default=None, help="OneCycle max lr (default 1e-4, ASL's for a global batch of 128)")
    p.add_argument("--lr-scale", choices=("none", "linear"), default=None,
                   help="none: use --lr as given (default); linear: --lr x global batch / 128")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default 1e-4, not on biases/BN; for adam, as on the recipe's batch-summed loss")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=None,
                   help="adam: coupled L2 decay as in ASL's recipe (default); adamw: decoupled (Query2Label: 1e-2)")
    p.add_argument("--loss", choices=("bce", "asl"), default=None, help="bce (default) or asl (Ridnik et al. 2021)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=None,
                   help="auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU")
    p.add_argument("--augment", choices=("asl", "crop", "light"), default=None,
                   help="asl: squash to SxS, Cutout(1/2), RandAugment (ASL/ML-Decoder, default); crop: "
                        "RandomResizedCrop, flip, RandAugment, RandomErasing; light: crop + flip (short toy runs)")
    p.add_argument("--augment-on", choices=("auto", "worker", "device"), default="auto",
                   help="where augmentation runs: device (the GPU, on uint8 batches), worker (DataLoader "
                        "workers); auto: device on CUDA, else worker")
    p.add_argument("--ema-epochs", type=float, default=None,
                   help="EMA averaging horizon in epochs, any batch or GPU count (default 5.2: ASL's 0.9997 at batch 128)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model (Inductor)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count training images that do not decode (default: stop, naming the file)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--keep-empty", action="store_const", const=True, default=None,
                   help="keep images without annotations as all-negative (default: drop them, as published numbers do)")
    p.add_argument("--pretrained", default=None, metavar="imagenet|PATH",
                   help="imagenet: torchvision's best ImageNet-1k weights for --arch, downloaded once into torch's "
                        "hub cache (sha256 checked); PATH: a local torchvision state_dict")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: CUDA min(12, cores per GPU - 1), CPU 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also write last.pt every STEPS optimizer steps, for mid-epoch resume (default: epoch ends only)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    p.add_argument("--holdout-frac", type=float, default=None, metavar="FRAC",
                   help="part of train2014 kept out of training for calibration and thresholds (default 0.05)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip train.calibrate at the end (best.pt stays the raw model: no thresholds, no plots)")
    p.add_argument("--label-dependency", action="store_true",
                   help="calibration also fits the label-dependency layer (train/label_dependency.py)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str], bool]:
    """The flags as (the TrainConfig they ask for, the recipe settings given as flags, --resume)."""
    args = build_parser().parse_args(argv)     # bad flags: one line, exit 2 (_Parser.error)
    given = {k: getattr(args, k) for k in RECIPE if getattr(args, k) is not None}
    cfg = TrainConfig(**given, coco_root=args.coco_root, train_csv=args.train_csv, val_csv=args.val_csv,
                      val_frac=args.val_frac, images=args.images, out=args.out, device=args.device,
                      workers=args.workers, save_every=args.save_every, progress=not args.no_progress,
                      augment_on=args.augment_on, compile=args.compile, skip_bad_images=args.skip_bad_images,
                      calibrate=not args.no_calibrate, label_dependency=args.label_dependency)
    return cfg, frozenset(given), args.resume


def main(argv: list[str] | None = None) -> int:
    cfg, given, resume = parse_args(argv)
    # Imported here, not at the top, so that --help answers without loading torch. (And not from
    # this file: under `python -m train` it runs as __main__, a second copy of its classes.)
    from runtime.coco import CocoDataError
    from train.checkpoint import CheckpointError
    from train.coco import BadImageError
    from train.holdout import HoldoutError
    from train.model import PretrainedWeightsError
    from train.trainer import fit

    try:
        fit(*resolve_config(cfg, given, resume))
    except (UsageError, CocoDataError, CheckpointError, PretrainedWeightsError, BadImageError, HoldoutError) as e:
        print(f"probres-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probres-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
