"""A deterministic COCO-like benchmark image set built from real photos that installed packages ship.

    python -m benchmarks.images OUT_DIR [--count 32]

There are no real photos in the repo and no internet, so this re-uses three real photographs:
scikit-learn's china.jpg and flower.jpg (640x427) and matplotlib's grace_hopper.jpg (512x600).
COCO-2014 images are JPEGs of about 640 px on the long side (640x480, 640x427, 480x640...),
about 160 KB each; we make the same shapes by flips, crops and mild rescales of those photos
and re-encode at JPEG quality 90. Same inputs -> byte-identical files on every run (given
the same OpenCV build), so timings compare across commits.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from runtime.pipeline import is_image_name

# (width, height) of the outputs, cycling: COCO's commonest landscape and portrait shapes.
SHAPES = ((640, 480), (640, 427), (480, 640), (640, 426), (427, 640), (612, 612))


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (sklearn takes seconds to import)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def source_photos() -> list[tuple[str, np.ndarray]]:
    """The real photos available offline, as (name, BGR uint8) pairs. Raises if none are found."""
    files = []
    sk, mpl = _package_dir("sklearn"), _package_dir("matplotlib")
    if sk:
        files += [sk / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    if mpl:
        files.append(mpl / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    found = [(p.name, cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in files if p.is_file()]
    found = [(n, im) for n, im in found if im is not None]
    if not found:
        raise RuntimeError("no sample photos found: install scikit-learn or matplotlib (the dev/train extras)")
    return found


def make_variant(img: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
    """One COCO-shaped variant of `img`: maybe flipped, a random crop of the target aspect, resized."""
    w, h = SHAPES[i % len(SHAPES)]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    ih, iw = img.shape[:2]
    # Largest crop of the target aspect, then shrink it by up to 15% and place it at random.
    a = w / h
    cw, ch = (iw, int(round(iw / a))) if iw / ih < a else (int(round(ih * a)), ih)
    f = rng.uniform(0.85, 1.0)
    cw, ch = max(16, int(cw * f)), max(16, int(ch * f))
    x0, y0 = int(rng.integers(0, iw - cw + 1)), int(rng.integers(0, ih - ch + 1))
    crop = np.ascontiguousarray(img[y0 : y0 + ch, x0 : x0 + cw])
    interp = cv2.INTER_AREA if cw > w else cv2.INTER_CUBIC
    return cv2.resize(crop, (w, h), interpolation=interp)


def build_image_set(out_dir: str | os.PathLike, count: int = 32, quality: int = 90, seed: int = 0) -> list[Path]:
    """Write `count` COCO-like JPEGs into out_dir (created) and return their paths, sorted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = source_photos()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        name, img = photos[i % len(photos)]
        var = make_variant(img, i, rng)
        ok, enc = cv2.imencode(".jpg", var, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        p = out / f"{i:03d}_{Path(name).stem}.jpg"
        p.write_bytes(enc.tobytes())
        paths.append(p)
    return paths


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files (runtime.pipeline's extensions) directly in `folder`, sorted."""
    return sorted(p for p in Path(folder).iterdir() if is_image_name(p.name) and p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args(argv)
    if args.count < 1:
        print("--count must be >= 1", file=sys.stderr)
        return 2
    paths = build_image_set(args.out_dir, args.count, args.quality)
    sizes = [p.stat().st_size for p in paths]
    print(f"wrote {len(paths)} images to {args.out_dir} (mean {np.mean(sizes) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
