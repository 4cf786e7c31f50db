"""The torch Dataset over a runtime.coco.CocoSplit: training augmentation, or exactly runtime's preprocessing.

    python -c "from runtime.coco import load_coco_split as L; from runtime.contract import PreprocessSpec as P; \
from train.coco import CocoDataset as D; print(D(L('data/toy_coco', 'val2014'), P(size=224), train=False)[0][0].shape)"

Eval mode is runtime.preprocess.preprocess_one(path, spec) -> torch.from_numpy and nothing
else, so the val mAP the trainer reports is measured on the very tensors the deployed model
receives (tests/test_coco_data.py checks the equality).

Train mode (train/augment.py has the recipes): decode with OpenCV (runtime.preprocess.decode:
EXIF-rotated, 3-channel RGB uint8) -> uint8 tensor (3, H, W) -> the recipe's geometry to
S x S (squash for "asl", RandomResizedCrop for "crop"/"light"). Then either
  augment_on="device": the item stays uint8 (3, S, S); the trainer runs train.augment.BatchAugment
                       on the whole batch on the GPU (what a worker still does: decode + resize);
  augment_on="worker": BatchAugment runs here on a batch of one (machines without a GPU),
                       and the item is float32 (3, S, S) normalized.
A file that does not decode does not raise in the worker (that would surface as a DataLoader
traceback): the item's index comes back as -1 - i and the trainer either stops with one
line naming the file (BadImageError) or, with --skip-bad-images, drops it and counts it.

load_splits(cfg: TrainConfig) gives the (train, val) splits of a run's data source: a COCO-2014 root
(--coco-root) or label CSVs (--train-csv with --val-csv or --val-frac, --images;
runtime/csv_labels.py, docs/datasets-csv.md).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.coco import CocoSplit, load_coco_split
from runtime.contract import LabelSet
from runtime.contract import PreprocessSpec
from runtime.preprocess import ImageDecodeError, decode, preprocess_one
from train.augment import BatchAugment, worker_geometry
from train.config import TrainConfig

AUGMENT_ON = ("worker", "device")


VAL_FRAC_STREAM = 50000      # --val-frac's split: its own random stream, the same for every --seed


def load_splits(cfg: TrainConfig, labels: LabelSet | None = None) -> tuple[CocoSplit, CocoSplit]:
    """(train, val) of the run's data: ROOT's train2014/val2014, or the CSVs (train/holdout.py then
    takes the held-out part out of train). With --val-frac, val is a stratified part of the
    training CSV drawn independently of --seed, so runs with other seeds are measured on the
    same images. labels: index targets by this label set (default: the training data's own).
    """
    keep = cfg.keep_empty
    if cfg.coco_root:
        train = load_coco_split(cfg.coco_root, "train2014", keep_empty=keep, labels=labels,
                                missing="drop" if cfg.skip_bad_images else "error")
        return train, load_coco_split(cfg.coco_root, "val2014", keep_empty=keep, labels=train.labels)
    from runtime.csv_labels import load_csv_split
    from train.holdout import split_train

    train = load_csv_split(cfg.train_csv, cfg.images, keep, labels)
    if cfg.val_csv:
        return train, load_csv_split(cfg.val_csv, cfg.images, keep, train.labels)
    return split_train(train, float(cfg.val_frac), 0, stream=VAL_FRAC_STREAM,
                       held_name=f"{train.split} val part (--val-frac)")


class BadImageError(ValueError):
    """A listed image file does not decode; the message names it."""


class CocoDataset(Dataset):
    """Item i -> (image (3, S, S), target (C,) float32 multi-hot, index i; -1 - i if image i is unreadable).

    The index lets distributed validation put every rank's scores back in order.
    """

    def __init__(self, split: CocoSplit, spec: PreprocessSpec, train: bool, augment: str = "asl",
                 augment_on: str = "worker") -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {', '.join(AUGMENT_ON)}, got {augment_on!r}")
        self.split, self.spec, self.train = split, spec, train
        self.augment_on = augment_on if train else "worker"
        self.geometry = worker_geometry(spec, augment) if train else None
        self.augment = BatchAugment(spec, augment) if train else None    # run here only for "worker"
        self.targets = torch.from_numpy(split.targets.astype(np.float32))   # (N, C)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def item_dtype(self) -> torch.dtype:
        return torch.uint8 if self.augment_on == "device" else torch.float32

    def load(self, i: int) -> torch.Tensor:
        """The item's image for image i: (3, S, S), uint8 or float32 per `item_dtype`."""
        path = self.split.image_paths[i]
        if not self.train:
            return torch.from_numpy(preprocess_one(path, self.spec))
        rgb = torch.from_numpy(decode(path)).permute(2, 0, 1)            # (3, H, W) uint8
        x = self.geometry(rgb)                                           # (3, S, S) uint8
        if self.augment_on == "device":
            return x.contiguous()
        return self.augment(x[None])[0].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        try:
            return self.load(i), self.targets[i], i
        except ImageDecodeError:
            s = self.spec.size
            return torch.zeros(3, s, s, dtype=self.item_dtype), self.targets[i], -1 - i

    def bad_image_message(self, i: int) -> str:
        """Why image i failed, re-read in the calling process (workers cannot hand back an exception cleanly)."""
        path = self.split.image_paths[i]
        try:
            decode(path)
        except ImageDecodeError as e:
            return str(e)
        return f"{path}: failed to decode in a DataLoader worker"


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one OpenCV and one torch thread per worker.

    Forked workers plus OpenCV's own thread pool oversubscribe the cores (or deadlock,
    pytorch #45198); parallelism comes from the workers themselves.
    """
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
