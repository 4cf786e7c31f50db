"""Training augmentation on uint8 batches (N, 3, S, S), with per-sample random parameters, on any device.

    python -c "import torch; from train.augment import BatchAugment; from runtime.contract import PreprocessSpec as P; \
print(BatchAugment(P(size=64), 'asl')(torch.zeros(4, 3, 64, 64, dtype=torch.uint8)).shape)"

Split in two so the expensive half can leave the CPU (train/coco.py does the first half):
  worker (CPU):   decode -> geometry to S x S, uint8: "asl" squashes the whole image
                  (Resize((S, S)), no crop, ASL #30); "crop"/"light" RandomResizedCrop
  BatchAugment:   uint8 (N, 3, S, S) -> float32 normalized (N, 3, S, S), on the GPU (the
                  batch goes there as uint8, 4x fewer bytes than float32) or, on machines
                  without one, in the DataLoader worker on a batch of 1. Same code either way.
Recipes (ASL / ML-Decoder train.py for "asl"):
  asl    Cutout on every image (a square of half the image side, random colour, centre
         anywhere, clipped: ASL's CutoutPIL(cutout_factor=0.5)) -> RandAugment(2, 9)
  crop   flip -> RandAugment(2, 9) -> normalize -> RandomErasing(p=0.5, 2-25% area, value 0)
  light  flip only (short from-scratch CPU runs: heavy regularization needs many steps)

Why our own batching over torchvision.transforms.v2 rather than kornia.augmentation: v2 on a
batched tensor draws ONE set of parameters for the whole batch, and so does kornia's
RandAugment (kornia 0.9: it picks the n operations once per forward call; only the sign of
the magnitude varies per row). Per-sample RandAugment therefore has to be grouped by hand
either way, and on this project's 2-core CPU torchvision's ops on a uint8 batch were also the
faster: RandAugment(2, 9) on (16, 3, 448, 448), one thread, median of 6, 7.4 ms per image grouped
as below vs 30.1 for kornia 0.9's batched RandAugment on float (a one-off measurement on a
shared machine while choosing; kornia is not a dependency). So each sample draws its own
operations exactly as v2.RandAugment does (uniformly, with replacement, from torchvision's
own table, the sign of a signed magnitude a coin flip), the batch is grouped by (round,
operation, sign), and each group runs torchvision's own implementation of that operation
(RandAugment._apply_image_or_video_transform) on its sub-batch: at most 2 x 14 x 2 calls
per batch, whatever its size. tests/test_augment.py checks every sample against
torchvision applying the same operations to that image alone.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F

from runtime.contract import PreprocessSpec

RECIPES = ("asl", "crop", "light")
CROP_SCALE = (0.5, 1.0)          # a crop keeps every label, so no ImageNet-style tiny crops
CUTOUT_FACTOR = 0.5              # ASL's cutout_factor: the square's side is half the image's
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.5, (0.02, 0.25), (0.3, 3.3)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"--augment must be one of {', '.join(RECIPES)}, got {recipe!r}")


def worker_geometry(spec: PreprocessSpec, recipe: str) -> v2.Transform:
    """The worker's half: uint8 (3, H, W) -> uint8 (3, S, S)."""
    check_recipe(recipe)
    if recipe == "asl":
        return v2.Resize((spec.size, spec.size), antialias=True)       # squash: every object stays in
    return v2.RandomResizedCrop(spec.size, scale=CROP_SCALE, antialias=True)


class BatchAugment:
    """uint8 (N, 3, S, S) -> float32 (N, 3, S, S) normalized, per-sample random augmentation.

    Random numbers come from torch's default CPU generator (seeded per DataLoader worker, or
    by the trainer's seed in the main process); only indices and small tensors move to the
    batch's device.
    """

    def __init__(self, spec: PreprocessSpec, recipe: str = "asl", num_ops: int = 2, magnitude: int = 9) -> None:
        check_recipe(recipe)
        self.spec, self.recipe = spec, recipe
        self.rand_augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude) if recipe != "light" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment takes uint8 (N, 3, S, S), got {x.dtype} {tuple(x.shape)}")
        if self.recipe in ("crop", "light"):
            x = self.flip(x)
        if self.recipe == "asl":
            x = self.cutout(x)
        if self.rand_augment is not None:
            x = self.randaugment(x)
        out = F.normalize(F.to_dtype(x, torch.float32, scale=True), list(self.spec.mean), list(self.spec.std))
        return self.erase(out) if self.recipe == "crop" else out

    @staticmethod
    def flip(x: torch.Tensor) -> torch.Tensor:
        """Horizontal flip of each sample with probability 0.5."""
        idx = torch.nonzero(torch.rand(x.shape[0]) < 0.5).flatten().to(x.device)
        x = x.clone()
        x[idx] = x[idx].flip(-1)
        return x

    @staticmethod
    def cutout(x: torch.Tensor) -> torch.Tensor:
        """ASL's CutoutPIL(0.5) on every sample: a (S/2 x S/2) box, centre uniform, clipped, random colour."""
        n, _, h, w = x.shape
        ch, cw = int(CUTOUT_FACTOR * h + 0.5), int(CUTOUT_FACTOR * w + 0.5)
        yc, xc = torch.randint(0, h, (n,)), torch.randint(0, w, (n,))
        y0, y1 = (yc - ch // 2).clamp(0, h), (yc + ch // 2).clamp(0, h)
        x0, x1 = (xc - cw // 2).clamp(0, w), (xc + cw // 2).clamp(0, w)
        colour = torch.randint(0, 256, (n, 3, 1, 1), dtype=torch.uint8)
        ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        box = ((ys >= y0.view(n, 1, 1)) & (ys < y1.view(n, 1, 1)) & (xs >= x0.view(n, 1, 1)) & (xs < x1.view(n, 1, 1)))
        return torch.where(box.unsqueeze(1).to(x.device), colour.to(x.device), x)   # (N, 1, S, S) mask

    def sample_ops(self, n: int, height: int, width: int) -> list[list[tuple[str, float]]]:
        """Per sample, per round: (operation, signed magnitude), drawn as v2.RandAugment.forward draws them."""
        ra = self.rand_augment
        space = list(ra._AUGMENTATION_SPACE.items())
        rounds = []
        for _ in range(ra.num_ops):
            ids = torch.randint(len(space), (n,)).tolist()
            signs = (torch.rand(n) <= 0.5).tolist()
            row = []
            for i, s in zip(ids, signs):
                name, (mag_fn, signed) = space[i]
                mags = mag_fn(ra.num_magnitude_bins, height, width)
                mag = 0.0 if mags is None else float(mags[ra.magnitude])
                row.append((name, -mag if (signed and s) else mag))
            rounds.append(row)
        return rounds

    def randaugment(self, x: torch.Tensor, ops: list[list[tuple[str, float]]] | None = None) -> torch.Tensor:
        """RandAugment with each sample's own operations (`ops` from sample_ops, drawn here if None)."""
        ra = self.rand_augment
        ops = self.sample_ops(x.shape[0], x.shape[-2], x.shape[-1]) if ops is None else ops
        for row in ops:
            groups: dict[tuple[str, float], list[int]] = {}
            for i, key in enumerate(row):
                if key[0] != "Identity":
                    groups.setdefault(key, []).append(i)
            for (name, mag), idx in groups.items():
                def op(t: torch.Tensor) -> torch.Tensor:
                    return ra._apply_image_or_video_transform(t, name, mag, interpolation=ra.interpolation, fill=ra._fill)
                if len(idx) == x.shape[0]:       # the whole batch (always, for a worker's batch of one)
                    x = op(x)
                else:
                    sel = torch.tensor(idx, device=x.device)
                    x = x.index_copy(0, sel, op(x[sel]))
        return x

    @staticmethod
    def erase(x: torch.Tensor) -> torch.Tensor:
        """v2.RandomErasing's rectangle (value 0, i.e. the mean colour), drawn per sample."""
        params = v2.RandomErasing(p=1.0, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0.0)
        for k in torch.nonzero(torch.rand(x.shape[0]) < ERASE_P).flatten().tolist():
            p = params.make_params([x[k]])
            if p["v"] is not None:
                x[k] = F.erase(x[k], p["i"], p["j"], p["h"], p["w"], p["v"].to(x.device))
        return x
