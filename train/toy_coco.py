"""A deterministic synthetic multi-label set in exactly the COCO-2014 layout.

    python -m train.toy_coco --out data/toy_coco --train 400 --val 100 --seed 0

Writes ROOT/train2014/COCO_train2014_%012d.jpg, ROOT/val2014/COCO_val2014_%012d.jpg and
ROOT/annotations/instances_{train,val}2014.json (info, licenses, images, annotations with
bbox/area/iscrowd/segmentation, categories). It is the demo's embedded default and the
test data for training, export and runtime.

Each of the 8 classes is a real COCO category with its real id (1, 3, 6, 13, 18, 28, 52,
85: non-contiguous, crossing COCO's gaps) drawn as its own polygon shape AND in its own hue
band (45 degrees wide, jittered in hue, saturation and brightness). Images are textured,
noisy, low-saturation backgrounds with grey distractor blobs; 0-4 objects each, of varied
scale (radius 9-26% of the image's short side), position and partial occlusion (an
object may be covered by later ones, but keeps at least half its area visible); about 10%
of images hold no object and get no annotation. The colour cue alone makes it learnable
from scratch on a CPU in minutes; scale, occlusion, noise and crops keep it from being
trivial. Same seed -> byte-identical files (on the same OpenCV build).

--csv also writes the set as label CSVs (docs/datasets-csv.md): ROOT/train.csv and
ROOT/val.csv, one 0/1 column per label in the COCO-id order (NVIDIA TAO's form), image names
relative to ROOT, listing the images COCO's default policy keeps (those with an object), so
`probres-train --train-csv ROOT/train.csv --val-csv ROOT/val.csv --images ROOT` trains on
exactly the images, labels and label order that `--coco-root ROOT` does.

--cooccur gives the labels a dependency structure, as COCO's "dining table" and "fork"
have: each class of a COOCCUR_PAIRS pair brings its partner along with probability
P_PARTNER (so each appears mostly with the other), and the classes of an EXCLUSIVE_PAIRS
pair never appear together. Without it every class is drawn independently (the files are
the same as before the option existed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.fileio import atomic_write_text

# (COCO id, name, shape). Hue band i is centred at i * 22.5 in OpenCV's 0..180 hue units.
TOY_CLASSES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "circle"),
    (3, "car", "square"),
    (6, "bus", "triangle"),
    (13, "stop sign", "octagon"),
    (18, "dog", "star"),
    (28, "umbrella", "cross"),
    (52, "banana", "diamond"),
    (85, "clock", "arrow"),
)
SUPERCATEGORY = {1: "person", 3: "vehicle", 6: "vehicle", 13: "outdoor", 18: "animal",
                 28: "accessory", 52: "food", 85: "indoor"}
HUE_STEP = 180.0 / len(TOY_CLASSES)
HUE_JITTER = 6.0           # +-6 units (12 degrees) leaves a 10-unit gap between bands
P_EMPTY = 0.1              # probability that an image holds no object
MIN_VISIBLE = 0.5          # an object keeps at least this fraction of its pixels visible
JPEG_QUALITY = 90
# --cooccur: class indices into TOY_CLASSES.
COOCCUR_PAIRS = ((0, 5), (2, 3))      # (person, umbrella), (bus, stop sign)
EXCLUSIVE_PAIRS = ((1, 6),)           # (car, banana)
P_PARTNER = 0.85
MAX_OBJECTS = 5


def _cooccur_classes(rng: np.random.Generator, n: int) -> list[int]:
    """n independently drawn class indices, then partners added and exclusions removed (--cooccur)."""
    classes = [int(c) for c in rng.integers(0, len(TOY_CLASSES), n)]
    for a, b in COOCCUR_PAIRS:
        for have, want in ((a, b), (b, a)):
            if have in classes and want not in classes and len(classes) < MAX_OBJECTS and rng.random() < P_PARTNER:
                classes.append(want)
    for a, b in EXCLUSIVE_PAIRS:
        if a in classes and b in classes:
            drop = b if rng.random() < 0.5 else a
            classes = [c for c in classes if c != drop]
    return classes


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(K, 2) int32 polygon of `shape` with circumradius r, rotated by `angle` radians."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape in ("square", "triangle", "octagon"):
        k = {"square": 4, "triangle": 3, "octagon": 8}[shape]
        t = np.arange(k) * 2 * np.pi / k
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif shape == "cross":
        a, b = 1.0, 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]], dtype=np.float64)
    elif shape == "diamond":
        pts = np.array([[0, -1.0], [0.45, 0], [0, 1.0], [-0.45, 0]])
    elif shape == "arrow":
        pts = np.array([[-1.0, -0.25], [0.2, -0.25], [0.2, -0.7], [1.0, 0], [0.2, 0.7],
                        [0.2, 0.25], [-1.0, 0.25]])
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return np.round(rot * r + [cx, cy]).astype(np.int32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured low-saturation BGR background: a smooth colour field plus pixel noise."""
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    hsv = np.empty((gh, gw, 3), np.uint8)
    hsv[..., 0] = rng.integers(0, 180, (gh, gw))
    hsv[..., 1] = rng.integers(0, 60, (gh, gw))       # low saturation: no class colour
    hsv[..., 2] = rng.integers(40, 230, (gh, gw))
    field = cv2.resize(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), (w, h), interpolation=cv2.INTER_LINEAR)
    noise = rng.integers(-18, 19, (h, w, 1), dtype=np.int16)  # (H, W, 1) grain, same on all channels
    return np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Grey blobs and lines: edges and shapes that carry no label."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(1, 6))):
        g = int(rng.integers(20, 236))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, 80)), int(rng.integers(10, 80)))
        if rng.random() < 0.7:
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, (g, g, g), -1, cv2.LINE_AA)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, centre, end, (g, g, g), int(rng.integers(2, 9)), cv2.LINE_AA)


def _object_colour(rng: np.random.Generator, cls: int) -> tuple[int, int, int]:
    """A BGR colour from class `cls`'s hue band, jittered in hue, saturation and brightness."""
    hue = (cls * HUE_STEP + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 180
    hsv = np.array([[[round(hue) % 180, rng.integers(160, 256), rng.integers(120, 256)]]], np.uint8)
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _rect(poly: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """The polygon's bounding rectangle (x, y, w, h), clipped to the image."""
    x, y, bw, bh = cv2.boundingRect(poly)
    x0, y0 = max(x, 0), max(y, 0)
    return x0, y0, min(x + bw, w) - x0, min(y + bh, h) - y0


def _render(rng: np.random.Generator, cooccur_rng: np.random.Generator | None = None
            ) -> tuple[np.ndarray, list[dict]]:
    """One image (BGR) and its objects [{cls, bbox, area, polygon}]; classes from cooccur_rng when given."""
    w, h = int(rng.integers(480, 721)), int(rng.integers(360, 561))
    img = _background(rng, h, w)
    _distractors(rng, img)
    n = 0 if rng.random() < P_EMPTY else int(rng.integers(1, 5))
    planned = _cooccur_classes(cooccur_rng, n) if cooccur_rng is not None else None
    masks: list[np.ndarray] = []      # (H, W) bool, visible pixels of each placed object
    full: list[int] = []              # full pixel count of each placed object
    objs: list[dict] = []
    short = min(h, w)
    for i in range(n if planned is None else len(planned)):
        cls = int(rng.integers(0, len(TOY_CLASSES))) if planned is None else planned[i]
        for _try in range(20):
            r = short * rng.uniform(0.09, 0.26)
            cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
            poly = _shape_polygon(TOY_CLASSES[cls][2], cx, cy, r, rng.uniform(0, 2 * np.pi))
            m = np.zeros((h, w), np.uint8)
            cv2.fillPoly(m, [poly], 1)
            m = m.astype(bool)
            if m.sum() < 64:
                continue
            # Occlusion allowed, but every earlier object must stay at least half visible.
            if all((prev & ~m).sum() >= MIN_VISIBLE * f for prev, f in zip(masks, full)):
                break
        else:
            continue
        colour = _object_colour(rng, cls)
        cv2.fillPoly(img, [poly], colour, cv2.LINE_AA)
        # Texture on the object: darker speckles, so it is not a flat patch.
        x, y, bw, bh = _rect(poly, w, h)
        crop, mcrop = img[y:y + bh, x:x + bw], m[y:y + bh, x:x + bw]
        crop[mcrop & (rng.random(mcrop.shape) < 0.08)] = (np.asarray(colour) * 0.6).astype(np.uint8)
        masks = [prev & ~m for prev in masks]
        masks.append(m)
        full.append(int(m.sum()))
        objs.append({"cls": cls, "polygon": poly})
    for o, m in zip(objs, masks):
        x, y, bw, bh = _rect(o["polygon"], w, h)   # search the visible pixels inside the shape's box only
        ys, xs = np.nonzero(m[y:y + bh, x:x + bw])
        x0, y0 = x + int(xs.min()), y + int(ys.min())
        o["bbox"] = [float(x0), float(y0), float(x + xs.max() - x0 + 1), float(y + ys.max() - y0 + 1)]
        o["area"] = float(len(ys))
    img = cv2.GaussianBlur(img, (3, 3), 0) if rng.random() < 0.3 else img
    return img, objs


def toy_categories() -> list[dict]:
    """COCO `categories` entries of the toy classes."""
    return [{"id": cid, "name": name, "supercategory": SUPERCATEGORY[cid]} for cid, name, _ in TOY_CLASSES]


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator, image_ids: list[int],
                 ann_id0: int, render: Any = None, categories: list[dict] | None = None,
                 description: str = "probres toy COCO (synthetic)") -> int:
    """Write split's images and json; returns the next free annotation id.

    render(rng) -> (BGR image, [{cls: index into categories, bbox, area, polygon}]); default: the toy shapes.
    """
    render = render or _render
    categories = categories or toy_categories()
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = ann_id0
    for image_id in image_ids[:n]:
        img, objs = render(rng)
        name = f"COCO_{split}_{image_id:012d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        (img_dir / name).write_bytes(buf.tobytes())
        h, w = img.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": w, "height": h, "license": 1,
                       "date_captured": "2014-01-01 00:00:00"})
        for o in objs:
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": categories[o["cls"]]["id"],
                "bbox": o["bbox"], "area": o["area"], "iscrowd": 0,
                "segmentation": [[float(v) for v in o["polygon"].reshape(-1)]],
            })
            ann_id += 1
    doc = {
        "info": {"description": description, "version": "1.0", "year": 2014,
                 "contributor": "probres", "date_created": "2014-01-01"},
        "licenses": [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_text(root / "annotations" / f"instances_{split}.json", json.dumps(doc))
    return ann_id


def make_toy_coco(root: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0, cooccur: bool = False,
                  csv: bool = False, **split_options: Any) -> Path:
    """Write the toy set under `root` (created if needed) and return `root` as a Path.

    cooccur: the --cooccur label dependencies (module docstring). csv: also the --csv label
    files ROOT/train.csv, ROOT/val.csv (module docstring). split_options (render,
    categories, description) go to _write_split: other generators (train.photo_coco) reuse the
    layout, ids and annotation writing with their own images.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError("--train and --val must be >= 1")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Non-contiguous image ids like COCO's; train and val disjoint.
    ids = rng.choice(np.arange(1, 600_000), size=n_train + n_val, replace=False)
    train_ids, val_ids = sorted(int(i) for i in ids[:n_train]), sorted(int(i) for i in ids[n_train:])
    ann = 1                                   # the first annotation id
    for k, split, n, split_ids in ((1, "train2014", n_train, train_ids), (2, "val2014", n_val, val_ids)):
        opts = dict(split_options)
        if cooccur:   # classes drawn from their own stream, so the default set's files stay as they were
            co_rng = np.random.default_rng([seed, k, 7])
            opts["render"] = lambda r, co_rng=co_rng: _render(r, co_rng)
            opts.setdefault("description", "probres toy COCO with co-occurring labels (synthetic)")
        ann = _write_split(root, split, n, np.random.default_rng([seed, k]), split_ids, ann, **opts)
    if csv:
        write_toy_csv(root)
    return root


def write_toy_csv(root: str | Path) -> tuple[Path, Path]:
    """ROOT/train.csv and ROOT/val.csv: the COCO-layout set's default image sets as 0/1 label columns."""
    from runtime.coco import load_coco_split
    from runtime.csv_labels import write_csv

    root = Path(root)
    return tuple(write_csv(root / f"{name}.csv", load_coco_split(root, split), root, form="columns")
                 for name, split in (("train", "train2014"), ("val", "val2014")))


def set_main(argv: list[str] | None, prog: str, description: str, make: Any, what: str, num_classes: int,
             user_errors: tuple[type[Exception], ...] = (), switches: dict[str, str] | None = None) -> int:
    """The command line shared by the COCO-layout set generators: --out, --train, --val, --seed.

    make(root, n_train, n_val, seed, **{switch: bool}) writes the set; `switches` ({"cooccur":
    help}) are a generator's own on/off flags; `user_errors` are printed as one line (exit 2).
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", required=True, help="root directory to write the COCO-2014 layout into")
    p.add_argument("--train", type=int, default=400, help="number of train2014 images")
    p.add_argument("--val", type=int, default=100, help="number of val2014 images")
    p.add_argument("--seed", type=int, default=0)
    for name, text in (switches or {}).items():
        p.add_argument(f"--{name}", action="store_true", help=text)
    a = p.parse_args(argv)
    if a.train < 1 or a.val < 1:
        p.error("--train and --val must be >= 1")
    try:
        root = make(a.out, a.train, a.val, a.seed, **{name: getattr(a, name) for name in switches or {}})
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    on = [f"--{name}" for name in switches or {} if getattr(a, name)]
    print(f"wrote {what} ({a.train} train, {a.val} val, {num_classes} classes{''.join(', ' + f for f in on)}) to {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return set_main(argv, "python -m train.toy_coco", __doc__.split("\n\n")[0], make_toy_coco, "toy COCO",
                    len(TOY_CLASSES), switches={"cooccur": "label dependencies: pairs that mostly appear "
                                                           "together, and a pair that never does",
                                                "csv": "also ROOT/train.csv and ROOT/val.csv (one 0/1 column per "
                                                       "label) for --train-csv/--val-csv --images ROOT"})


if __name__ == "__main__":
    sys.exit(main())
