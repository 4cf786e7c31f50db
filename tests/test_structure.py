"""One of each: image extensions, network builder, graph-facts reader, and one-way preprocessing imports.

    .venv/bin/python -m pytest -q tests/test_structure.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import PreprocessSpec
from runtime.pipeline import IMAGE_EXTENSIONS, iter_image_paths
from runtime.preprocess import preprocess


def _write(path: Path, seed: int) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def test_export_lists_the_images_probres_infer_reads_tiff_included(tmp_path: Path) -> None:
    """--calib-images and --verify-images take every file probres-infer takes from a directory, in its order."""
    pytest.importorskip("onnx")
    from export.int8 import calibration_paths
    from export.verify import list_images, verification_images

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = [_write(d / n, i) for i, n in enumerate(["a.jpg", "b.tif", "c.TIFF", "sub/d.png", "e.webp"])]
    (d / "notes.txt").write_text("not an image")
    infer_order = [Path(p) for p in iter_image_paths([str(d)])]
    assert sorted(infer_order) == sorted(files) and len(IMAGE_EXTENSIONS) >= 9
    assert calibration_paths(d, 100) == infer_order
    assert calibration_paths(d, 2) == infer_order[:2]
    assert list_images(d, 100) == infer_order

    tiffs = tmp_path / "tiffs"                       # a TIFF-only directory: verified on those images
    tiffs.mkdir()
    only = [_write(tiffs / f"{i}.tiff", 10 + i) for i in range(2)]
    spec = PreprocessSpec(size=32)
    x, where = verification_images(spec, {}, tiffs, n=3)
    assert "2 images from" in where
    assert np.array_equal(x, preprocess([str(only[0]), str(only[1]), str(only[0])], spec=spec))
