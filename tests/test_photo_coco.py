"""The real-photo COCO-layout set: loads with the runtime's COCO reader, deterministic, clear error without its sources.

    .venv/bin/python -m pytest -q tests/test_photo_coco.py
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("skimage", reason="scikit-image (dev extra) ships the photographs")

from runtime.coco import load_coco_split  # noqa: E402
from train import photo_coco  # noqa: E402


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_photo_set_layout_labels_and_determinism(tmp_path):
    a = photo_coco.make_photo_coco(tmp_path / "a", n_train=6, n_val=12, seed=3)
    b = photo_coco.make_photo_coco(tmp_path / "b", n_train=6, n_val=12, seed=3)
    assert _digest(a) == _digest(b)
    split = load_coco_split(str(a), "val2014", keep_empty=True)
    assert [c for c, *_ in photo_coco.PHOTO_CLASSES] == list(split.labels.category_ids)
    assert len(split) == 12 and split.targets.sum() >= 12      # 0-3 objects per image, ~90% non-empty
    import cv2
    img = cv2.imread(str(split.image_paths[0]))
    assert img is not None and img.std() > 20                 # a photograph, not a flat fill


def test_missing_source_is_one_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(photo_coco, "BACKGROUNDS", (("skimage", "no_such_photo.png"),))
    assert photo_coco.main(["--out", str(tmp_path / "x"), "--train", "2", "--val", "2"]) == 2
    err = capsys.readouterr().err
    assert "no_such_photo.png" in err and len(err.strip().splitlines()) == 1
