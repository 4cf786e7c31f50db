"""The torch Dataset over a runtime.coco.CocoSplit: training augmentation, or exactly runtime's preprocessing.

    python -c "from runtime.coco import load_coco_split as L; from train.coco import CocoDataset as D; \
print(D(L('data/toy_coco', 'val2014'), size=224, train=False)[0][0].shape)"

Eval mode is runtime.preprocess.preprocess_one(path, spec) -> torch.from_numpy and nothing
else, so the val mAP the trainer reports is measured on the very tensors the deployed model
receives (tests/test_coco_data.py checks the equality).

Train mode (the multi-label COCO recipe of ASL / ML-Decoder, on torchvision.transforms.v2):
decode with OpenCV (runtime.preprocess.decode: EXIF-rotated, 3-channel RGB uint8) ->
uint8 tensor (3, H, W) -> RandomResizedCrop(size, scale=(0.5, 1), antialias) ->
RandomHorizontalFlip -> RandAugment(2 ops, magnitude 9) -> float (x/255 - mean)/std ->
Cutout. Working in uint8 until the end keeps the resize and RandAugment on the fast paths.
RandomResizedCrop's scale floor is 0.5, not ImageNet's 0.08: a crop keeps every label of
the image, so tiny crops would train on labels whose objects were cut away.
Cutout is v2.RandomErasing(p=0.5, area 2-25%, value 0) on the normalized tensor, i.e. a
rectangle of the mean colour; ASL's CutoutPIL (cutout_factor 0.5: a square of up to half
the side, so up to 25% of the area) fills a random colour instead. The difference is
immaterial to the regularizer, and RandomErasing is maintained, tested torchvision code.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as v2
from torch.utils.data import Dataset

from runtime.coco import CocoSplit
from runtime.contract import PreprocessSpec
from runtime.preprocess import decode, preprocess_one

CROP_SCALE = (0.5, 1.0)


AUGMENTS = ("full", "light")


def train_transform(spec: PreprocessSpec, augment: str = "full") -> v2.Compose:
    """uint8 (3, H, W) RGB tensor -> float32 (3, S, S) normalized, augmented.

    "full" is the recipe; "light" (crop + flip only) is for very short from-scratch runs
    such as the CPU toy configuration, where RandAugment's colour operations (solarize,
    equalize, autocontrast) and Cutout regularize more than a few hundred steps can use.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    full = augment == "full"
    return v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        *([v2.RandAugment(num_ops=2, magnitude=9)] if full else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
        *([v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0.0)] if full else []),
    ])


class CocoDataset(Dataset):
    """Item i -> (image (3, S, S) float32, target (C,) float32 multi-hot, index i).

    The index lets distributed validation put every rank's scores back in order.
    """

    def __init__(self, split: CocoSplit, spec: PreprocessSpec, train: bool, augment: str = "full") -> None:
        self.split = split
        self.spec = spec
        self.train = train
        self.transform = train_transform(spec, augment) if train else None
        self.targets = torch.from_numpy(split.targets.astype(np.float32))   # (N, C)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, i: int) -> torch.Tensor:
        """The model input for image i, (3, S, S) float32."""
        path = self.split.image_paths[i]
        if not self.train:
            return torch.from_numpy(preprocess_one(path, self.spec))
        rgb = decode(path)                                     # (H, W, 3) uint8
        return self.transform(torch.from_numpy(rgb).permute(2, 0, 1))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.load(i), self.targets[i], i


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one OpenCV and one torch thread per worker.

    Forked workers plus OpenCV's own thread pool oversubscribe the cores (or deadlock,
    pytorch #45198); parallelism comes from the workers themselves.
    """
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
