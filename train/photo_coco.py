"""A small multi-label set of real photographs in the COCO-2014 layout, from images installed packages ship.

    python -m train.photo_coco --out data/photo_coco --train 400 --val 100 --seed 0

Writes the same tree as train.toy_coco (train2014/, val2014/, annotations/instances_*.json,
through its writer), but each image is a crop of a real photograph used as background with
0-3 crops of real photographs of COCO objects pasted on it (scaled, flipped, jittered in
brightness and contrast, possibly overlapping): its labels are the pasted photos' categories.
Sources (no download; the packages are in the `dev` extra):
  person      scikit-image astronaut.png, camera.png; matplotlib grace_hopper.jpg
  motorcycle  scikit-image motorcycle_left.png, motorcycle_right.png
  cat         scikit-image chelsea.png
  cup         scikit-image coffee.png
  clock       scikit-image clock_motion.png
  background  scikit-learn china.jpg, flower.jpg; scikit-image brick/grass/gravel.png, rocket.jpg
What it is for: quantization and export checks on natural-image statistics (real textures,
colours, edges), which the synthetic toy set lacks. Few distinct photos repeat, so a model
trained on it learns those photos: it measures fidelity to PyTorch, not generalization.
bbox is the pasted rectangle clipped to the image, area its full size (occlusion ignored).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from train.toy_coco import make_toy_coco, set_main

# (COCO id, name, supercategory, [(package, file)])
PHOTO_CLASSES: tuple[tuple[int, str, str, tuple[tuple[str, str], ...]], ...] = (
    (1, "person", "person", (("skimage", "astronaut.png"), ("skimage", "camera.png"),
                             ("matplotlib", "grace_hopper.jpg"))),
    (4, "motorcycle", "vehicle", (("skimage", "motorcycle_left.png"), ("skimage", "motorcycle_right.png"))),
    (17, "cat", "animal", (("skimage", "chelsea.png"),)),
    (47, "cup", "kitchen", (("skimage", "coffee.png"),)),
    (85, "clock", "indoor", (("skimage", "clock_motion.png"),)),
)
BACKGROUNDS = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("skimage", "brick.png"),
               ("skimage", "grass.png"), ("skimage", "gravel.png"), ("skimage", "rocket.jpg"))
P_EMPTY = 0.1
MAX_OBJECTS = 3


class PhotoSourceError(RuntimeError):
    """A source photo is missing: the package that ships it is not installed."""


def source_path(package: str, name: str) -> Path:
    """Where an installed package keeps one of its sample images."""
    try:
        if package == "skimage":
            import skimage
            return Path(skimage.__file__).parent / "data" / name
        if package == "sklearn":
            import sklearn
            return Path(sklearn.__file__).parent / "datasets" / "images" / name
        import matplotlib
        return Path(matplotlib.get_data_path()) / "sample_data" / name
    except ImportError:
        raise PhotoSourceError(f"{package} is not installed (it ships {name}); install the dev extra") from None


def load_sources() -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """(per-class lists of BGR photos, background BGR photos); grey images become 3-channel."""
    def read(package: str, name: str) -> np.ndarray:
        p = source_path(package, name)
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise PhotoSourceError(f"{p}: missing or unreadable (package {package})")
        return img
    return [[read(*s) for s in srcs] for *_, srcs in PHOTO_CLASSES], [read(*s) for s in BACKGROUNDS]


def _crop(rng: np.random.Generator, img: np.ndarray, frac: float) -> np.ndarray:
    """A random crop keeping `frac` of each side."""
    h, w = img.shape[:2]
    ch, cw = max(8, int(h * frac)), max(8, int(w * frac))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return img[y:y + ch, x:x + cw]


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Brightness/contrast jitter and a random horizontal flip."""
    out = cv2.convertScaleAbs(img, alpha=float(rng.uniform(0.75, 1.25)), beta=float(rng.uniform(-25, 25)))
    return out[:, ::-1] if rng.random() < 0.5 else out


def make_renderer(classes: list[list[np.ndarray]], backgrounds: list[np.ndarray]):
    """render(rng) -> (BGR image, objects) in train.toy_coco's object format."""
    def render(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
        w, h = int(rng.integers(240, 321)), int(rng.integers(180, 241))
        bg = _crop(rng, backgrounds[int(rng.integers(0, len(backgrounds)))], float(rng.uniform(0.4, 1.0)))
        img = np.ascontiguousarray(cv2.resize(_jitter(rng, bg), (w, h), interpolation=cv2.INTER_AREA))
        n = 0 if rng.random() < P_EMPTY else int(rng.integers(1, MAX_OBJECTS + 1))
        objs = []
        for _ in range(n):
            cls = int(rng.integers(0, len(classes)))
            photos = classes[cls]
            obj = _jitter(rng, _crop(rng, photos[int(rng.integers(0, len(photos)))], float(rng.uniform(0.7, 1.0))))
            side = float(rng.uniform(0.3, 0.6)) * min(h, w)       # longer side of the pasted photo
            s = side / max(obj.shape[:2])
            ow, oh = max(8, int(obj.shape[1] * s)), max(8, int(obj.shape[0] * s))
            obj = cv2.resize(obj, (ow, oh), interpolation=cv2.INTER_AREA)
            x, y = int(rng.integers(-ow // 4, w - 3 * ow // 4)), int(rng.integers(-oh // 4, h - 3 * oh // 4))
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + ow, w), min(y + oh, h)
            img[y0:y1, x0:x1] = obj[y0 - y:y1 - y, x0 - x:x1 - x]
            poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.int32)
            objs.append({"cls": cls, "polygon": poly, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float(ow * oh)})
        return img, objs
    return render


def make_photo_coco(root: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> Path:
    """Write the photo set under `root`; PhotoSourceError when a source package is missing."""
    classes, backgrounds = load_sources()
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup, _ in PHOTO_CLASSES]
    return make_toy_coco(root, n_train, n_val, seed, render=make_renderer(classes, backgrounds),
                         categories=categories, description="probres photo COCO (real photographs composited)")


def main(argv: list[str] | None = None) -> int:
    return set_main(argv, "python -m train.photo_coco", __doc__.split("\n\n")[0], make_photo_coco, "photo COCO",
                    len(PHOTO_CLASSES), user_errors=(PhotoSourceError,))


if __name__ == "__main__":
    sys.exit(main())
