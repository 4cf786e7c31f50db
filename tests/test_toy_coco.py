"""The toy COCO set: real COCO layout, loadable by pycocotools, deterministic.

    .venv/bin/python -m pytest -q tests/test_toy_coco.py
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from runtime.contract import COCO_CATEGORIES
from train.toy_coco import main, make_toy_coco


def test_pycocotools_loads_it_with_real_noncontiguous_ids(toy_root: Path) -> None:
    for split, n in (("train2014", 48), ("val2014", 24)):
        coco = COCO(str(toy_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) >= 8
        assert cat_ids != list(range(cat_ids[0], cat_ids[0] + len(cat_ids)))   # non-contiguous
        assert max(cat_ids) > 11                                               # crosses COCO's id gaps
        real = dict(COCO_CATEGORIES)
        for c in coco.loadCats(cat_ids):
            assert real[c["id"]] == c["name"] and c["supercategory"]
        empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
        assert 0 < len(empty) < n
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
        assert max(per_image) <= 4
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"] == f"COCO_{split}_{img['id']:012d}.jpg"
        # pycocotools can rasterize the polygon segmentation: area of the mask is close to the
        # visible area (occluded parts are not in "area", so the mask is never much smaller).
        for a in coco.loadAnns(coco.getAnnIds())[:20]:
            assert a["iscrowd"] == 0 and a["area"] > 0
            assert coco.annToMask(a).sum() >= 0.9 * a["area"]


def test_images_are_real_jpegs_of_varied_size_matching_the_json(toy_root: Path) -> None:
    doc = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())
    sizes = set()
    for img in doc["images"]:
        path = toy_root / "val2014" / img["file_name"]
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"                       # JPEG magic
        arr = cv2.imread(str(path))
        assert arr.shape == (img["height"], img["width"], 3)
        assert 480 <= img["width"] <= 720 and 360 <= img["height"] <= 560
        sizes.add((img["width"], img["height"]))
    assert len(sizes) > len(doc["images"]) // 2
    by_id = {i["id"]: i for i in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        im = by_id[a["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["area"] <= w * h


def test_objects_are_coloured_by_their_class(toy_root: Path) -> None:
    """The class hue is really in the pixels: the dominant hue inside each object clusters by class."""
    coco = COCO(str(toy_root / "annotations" / "instances_train2014.json"))
    hues: dict[int, list[int]] = {}
    for a in coco.loadAnns(coco.getAnnIds())[:60]:
        img = cv2.imread(str(toy_root / "train2014" / coco.imgs[a["image_id"]]["file_name"]))
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[coco.annToMask(a) > 0]   # (K, 3) pixels in the polygon
        sat = hsv[hsv[:, 1] > 120]                      # object pixels (background is unsaturated)
        assert len(sat) > 0.3 * a["area"]
        # Dominant hue band of 22.5 units (an occluder may cover up to half the polygon, so not the mean).
        band = np.round(sat[:, 0] / 22.5).astype(int) % 8
        hues.setdefault(a["category_id"], []).append(int(np.bincount(band, minlength=8).argmax()))
    assert len(hues) >= 6
    for c, v in hues.items():
        assert len(set(v)) == 1, (c, v)                 # one class: one hue band
    assert len({v[0] for v in hues.values()}) == len(hues)   # classes: distinct bands


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_toy_coco(tmp_path / "a", n_train=5, n_val=3, seed=7)
    b = make_toy_coco(tmp_path / "b", n_train=5, n_val=3, seed=7)
    c = make_toy_coco(tmp_path / "c", n_train=5, n_val=3, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 5 + 3 + 2
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "annotations/instances_train2014.json").read_bytes() != (c / "annotations/instances_train2014.json").read_bytes()


def test_cli_writes_the_layout(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "t"), "--train", "3", "--val", "2", "--seed", "1"]) == 0
    assert len(list((tmp_path / "t/train2014").glob("COCO_train2014_*.jpg"))) == 3
    assert len(list((tmp_path / "t/val2014").glob("COCO_val2014_*.jpg"))) == 2
    assert "wrote toy COCO" in capsys.readouterr().out


def test_cooccur_option_gives_pairs_that_mostly_co_occur_and_one_that_never_does(tmp_path: Path) -> None:
    from runtime.coco import load_coco_split
    from train.label_dependency import cooccurrence
    from train.toy_coco import COOCCUR_PAIRS, EXCLUSIVE_PAIRS

    make_toy_coco(tmp_path, n_train=120, n_val=4, seed=0, cooccur=True)
    cond = cooccurrence(load_coco_split(tmp_path, "train2014").targets)      # P(j | i)
    for a, b in COOCCUR_PAIRS:
        assert cond[a, b] > 0.6 and cond[b, a] > 0.6
    for a, b in EXCLUSIVE_PAIRS:
        assert cond[a, b] == 0.0
    off = cond[~np.eye(8, dtype=bool)]
    assert np.median(off) < 0.45                                             # the other pairs stay independent-ish
