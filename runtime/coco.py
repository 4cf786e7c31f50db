"""COCO-2014 multi-label data: (image path, multi-hot target) pairs, shared by training and probres-eval.

    python -c "from runtime.coco import load_coco_split; print(load_coco_split('data/coco', 'val2014').describe())"

Reads ROOT/<split>/ and ROOT/annotations/instances_<split>.json with pycocotools. Every
annotation of an image (crowd ones included, as ASL and ML-GCN do) sets that image's bit for
its category; the label set maps category ids to indices in ascending id order.

Image-set policy, one function for both training's evaluation and the runtime's, so their
numbers describe the same images: images without any annotation are dropped by default
(what published COCO multi-label numbers use: ASL, ML-GCN, CSRA), or kept as all-negative
rows with keep_empty=True (Query2Label's choice). describe() says which.

Bad data fails here, up front and naming the file: a missing or malformed annotation json
(validated before pycocotools sees it, since pycocotools would crash with a bare KeyError)
and missing image files (checked before any DataLoader worker starts). numpy + pycocotools
only: this ships with the runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.contract import LabelSet
from runtime.errors import UsageError


class CocoDataError(UsageError, ValueError):
    """The COCO tree is incomplete or an annotation file is malformed; the message names the file."""


@dataclass
class CocoSplit:
    """One split as (image path, multi-hot target) rows, ordered by image id."""

    split: str
    image_paths: list[Path]
    image_ids: list[int]
    targets: np.ndarray            # (N, C) uint8 multi-hot, columns in labels' order
    labels: LabelSet
    num_with_objects: int          # images in the json that have >= 1 annotation
    num_empty: int                 # images in the json without annotation
    keep_empty: bool
    missing: list[Path] = field(default_factory=list)   # listed files not on disk, dropped (missing="drop")

    def __len__(self) -> int:
        return len(self.image_paths)

    def describe(self) -> str:
        """One log line, e.g. 'val2014: 24 images, 21 with objects, 3 without (dropped)'."""
        fate = "kept as all-negative" if self.keep_empty else "dropped"
        return (f"{self.split}: {self.num_with_objects + self.num_empty} images, {self.num_with_objects} with objects, "
                f"{self.num_empty} without ({fate})")


def annotation_path(root: str | os.PathLike[str], split: str) -> Path:
    """ROOT/annotations/instances_<split>.json."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def _read_json(path: Path) -> dict:
    """Parse and validate the parts of an instances json that we (and pycocotools) rely on."""
    if not path.is_file():
        raise CocoDataError(f"{path}: annotation file not found (expected the COCO-2014 layout "
                            f"ROOT/annotations/instances_<split>.json)")
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoDataError(f"{path}: malformed json ({e})") from None
    except OSError as e:
        raise CocoDataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(doc, dict):
        raise CocoDataError(f"{path}: not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise CocoDataError(f"{path}: not a COCO instances file (missing list '{key}')")
    needs = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id"),
             "categories": ("id", "name")}
    for key, fields in needs.items():
        for i, entry in enumerate(doc[key]):
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise CocoDataError(f"{path}: {key}[{i}] lacks one of {', '.join(fields)}")
    image_ids = {e["id"] for e in doc["images"]}
    cat_ids = {e["id"] for e in doc["categories"]}
    if len(image_ids) != len(doc["images"]):
        raise CocoDataError(f"{path}: duplicate image ids")
    for i, a in enumerate(doc["annotations"]):
        if a["image_id"] not in image_ids:
            raise CocoDataError(f"{path}: annotations[{i}] refers to unknown image_id {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise CocoDataError(f"{path}: annotations[{i}] refers to unknown category_id {a['category_id']}")
    return doc


def _index(doc: dict):
    """A pycocotools COCO index over an already-validated document (its prints silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_split(
    root: str | os.PathLike[str],
    split: str = "val2014",
    keep_empty: bool = False,
    labels: LabelSet | None = None,
    missing: str = "error",
) -> CocoSplit:
    """Read ROOT/<split>/ and its instances json into a CocoSplit.

    labels: the label set the targets are indexed by (e.g. a checkpoint's contract); by
    default the json's own categories. Its category ids must be exactly the json's.
    Raises CocoDataError naming the file for a missing/malformed json or missing images;
    missing="drop" drops listed images that are not on disk instead (in CocoSplit.missing).
    """
    root = Path(root)
    ann_path = annotation_path(root, split)
    img_dir = root / split
    if not img_dir.is_dir():
        raise CocoDataError(f"{img_dir}: image directory not found (expected the COCO-2014 layout ROOT/{split}/)")
    doc = _read_json(ann_path)
    json_labels = LabelSet.from_categories(doc["categories"])
    if labels is None:
        labels = json_labels
    elif set(labels.category_ids) != set(json_labels.category_ids):
        extra = sorted(set(json_labels.category_ids) - set(labels.category_ids))
        lacking = sorted(set(labels.category_ids) - set(json_labels.category_ids))
        raise CocoDataError(f"{ann_path}: categories do not match the model's label set "
                            f"(json only: {extra[:10]}, model only: {lacking[:10]})")
    coco = _index(doc)
    col = labels.index_of()
    ids = sorted(coco.getImgIds())
    with_objects = [i for i in ids if coco.imgToAnns.get(i)]
    kept = ids if keep_empty else with_objects
    targets = np.zeros((len(kept), labels.num_classes), dtype=np.uint8)
    paths: list[Path] = []
    missing_files: list[Path] = []
    for row, image_id in enumerate(kept):
        for a in coco.imgToAnns.get(image_id, ()):
            targets[row, col[a["category_id"]]] = 1
        p = img_dir / coco.imgs[image_id]["file_name"]
        paths.append(p)
        if not p.is_file():
            missing_files.append(p)
    if missing_files and missing != "drop":
        more = f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""
        raise CocoDataError(f"{missing_files[0]}: image file not found{more}; listed in {ann_path}")
    if missing_files:
        on_disk = [i for i, p in enumerate(paths) if p not in set(missing_files)]
        paths, kept, targets = [paths[i] for i in on_disk], [kept[i] for i in on_disk], targets[on_disk]
    return CocoSplit(split=split, image_paths=paths, image_ids=kept, targets=targets, labels=labels,
                     num_with_objects=len(with_objects), num_empty=len(ids) - len(with_objects),
                     keep_empty=keep_empty, missing=missing_files)
