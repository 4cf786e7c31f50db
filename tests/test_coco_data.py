"""COCO reading (runtime.coco) and the training Dataset (train.coco).

    .venv/bin/python -m pytest -q tests/test_coco_data.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.coco import CocoDataError, load_coco_split
from runtime.contract import LabelSet, PreprocessSpec
from runtime.preprocess import preprocess
from train.coco import CocoDataset


def _reference(root: Path, split: str) -> tuple[list[int], list[int], dict[int, set[int]], list[int]]:
    """All image ids, ids with annotations, id -> category ids, sorted category ids: straight from the json."""
    doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    cats: dict[int, set[int]] = {}
    for a in doc["annotations"]:
        cats.setdefault(a["image_id"], set()).add(a["category_id"])
    ids = sorted(i["id"] for i in doc["images"])
    return ids, [i for i in ids if i in cats], cats, sorted(c["id"] for c in doc["categories"])


@pytest.mark.parametrize("keep_empty", [False, True])
def test_targets_and_counts_match_the_json(toy_root: Path, keep_empty: bool) -> None:
    ids, with_objects, cats, cat_ids = _reference(toy_root, "val2014")
    s = load_coco_split(toy_root, "val2014", keep_empty=keep_empty)
    assert s.num_with_objects == len(with_objects) and s.num_empty == len(ids) - len(with_objects) > 0
    assert s.image_ids == (ids if keep_empty else with_objects)
    assert len(s) == len(s.image_ids) == len(s.image_paths) == s.targets.shape[0]
    assert s.targets.dtype == np.uint8 and s.targets.shape[1] == len(cat_ids)
    assert list(s.labels.category_ids) == cat_ids
    for row, image_id in enumerate(s.image_ids):
        expected = [int(c in cats.get(image_id, set())) for c in cat_ids]
        assert s.targets[row].tolist() == expected
        assert s.image_paths[row].name == f"COCO_val2014_{image_id:012d}.jpg"
    assert (s.targets.sum(1) == 0).sum() == (s.num_empty if keep_empty else 0)
    fate = "kept as all-negative" if keep_empty else "dropped"
    assert s.describe() == (f"val2014: {len(ids)} images, {len(with_objects)} with objects, "
                            f"{len(ids) - len(with_objects)} without ({fate})")


def test_given_label_set_must_match(toy_root: Path) -> None:
    s = load_coco_split(toy_root, "val2014")
    assert load_coco_split(toy_root, "val2014", labels=s.labels).labels == s.labels
    with pytest.raises(CocoDataError, match="label set"):
        load_coco_split(toy_root, "val2014", labels=LabelSet.coco())


@pytest.fixture
def toy_copy(toy_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "coco"
    shutil.copytree(toy_root / "annotations", dst / "annotations")
    shutil.copytree(toy_root / "val2014", dst / "val2014")
    return dst


def test_missing_annotation_file(toy_copy: Path) -> None:
    (toy_copy / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(CocoDataError, match=r"instances_val2014\.json: annotation file not found"):
        load_coco_split(toy_copy, "val2014")


def test_missing_image_dir(toy_copy: Path) -> None:
    with pytest.raises(CocoDataError, match=r"train2014: image directory not found"):
        load_coco_split(toy_copy, "train2014")


@pytest.mark.parametrize("text, why", [
    ('{"images": [', "malformed json"),
    ("[1, 2]", "not a COCO instances file"),
    ('{"images": [], "annotations": []}', "missing list 'categories'"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": '
     '[{"id": 1, "image_id": 2, "category_id": 1}], "categories": [{"id": 1, "name": "person"}]}', "unknown image_id 2"),
])
def test_malformed_json_is_a_clear_error(toy_copy: Path, text: str, why: str) -> None:
    path = toy_copy / "annotations" / "instances_val2014.json"
    path.write_text(text)
    with pytest.raises(CocoDataError, match=why) as e:
        load_coco_split(toy_copy, "val2014")
    assert str(path) in str(e.value)


def test_missing_image_file_is_reported_up_front(toy_copy: Path) -> None:
    everything = load_coco_split(toy_copy, "val2014", keep_empty=True)
    with_obj = [p for p, t in zip(everything.image_paths, everything.targets) if t.sum() > 0]
    empty = [p for p, t in zip(everything.image_paths, everything.targets) if t.sum() == 0]
    with_obj[3].unlink()
    with pytest.raises(CocoDataError, match="image file not found") as e:
        load_coco_split(toy_copy, "val2014")
    assert str(with_obj[3]) in str(e.value)
    # An empty image is dropped by default, so its file is not needed; with keep_empty it is.
    shutil.copy(empty[0], with_obj[3])
    empty[0].unlink()
    assert len(load_coco_split(toy_copy, "val2014")) == everything.num_with_objects
    with pytest.raises(CocoDataError, match=empty[0].name):
        load_coco_split(toy_copy, "val2014", keep_empty=True)


def test_eval_transform_is_exactly_runtime_preprocessing(toy_root: Path) -> None:
    split = load_coco_split(toy_root, "val2014", keep_empty=True)
    for spec in (PreprocessSpec(size=64), PreprocessSpec(size=448), PreprocessSpec(size=100, interpolation="linear")):
        ds = CocoDataset(split, spec, train=False)
        ref = preprocess([str(p) for p in split.image_paths[:6]], spec=spec)       # (6, 3, S, S) runtime batch
        got = torch.stack([ds[i][0] for i in range(6)]).numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(got, ref)                                           # bit-exact
        x, t, i = ds[2]
        assert i == 2 and t.dtype == torch.float32 and t.tolist() == split.targets[2].tolist()


def test_train_transform_shapes_and_statistics(toy_root: Path) -> None:
    split = load_coco_split(toy_root, "train2014")
    spec = PreprocessSpec(size=96)
    ds = CocoDataset(split, spec, train=True)
    torch.manual_seed(0)
    xs = torch.stack([ds[i % 4][0] for i in range(16)])       # (16, 3, 96, 96)
    assert xs.shape == (16, 3, 96, 96) and xs.dtype == torch.float32
    # Augmentation: the same image gives different tensors; values stay in the normalized range.
    assert not torch.equal(xs[0], xs[4])
    lo = (0 - np.array(spec.mean)) / np.array(spec.std)
    hi = (1 - np.array(spec.mean)) / np.array(spec.std)
    for c in range(3):
        assert lo[c] - 1e-5 <= xs[:, c].min() and xs[:, c].max() <= hi[c] + 1e-5
    # Normalized: roughly zero-mean per channel over the set, not raw 0..255 or 0..1 scale.
    assert xs.mean().abs() < 1.0 and 0.3 < xs.std() < 2.0
