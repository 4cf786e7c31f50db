"""probres-infer's environment (.venv, OpenCV 5.x) and probres-serve's (.venv-serve, OpenCV 4.11) decode
the same corpus identically: the same pixels, the same tensors, the same refusals (issue 24, row 11).

    make serve-env && .venv/bin/python -m pytest -q tests/test_decode_envs.py

The corpus holds what the two OpenCV builds could disagree on: an animated and a still GIF
(OpenCV 5 decodes GIF, 4.11 does not: runtime.preprocess refuses GIF in both), a 16-bit PNG,
a CMYK JPEG, EXIF-rotated JPEGs (orientations 3 and 6), grayscale and RGBA PNGs, WebP, TIFF, BMP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from serve_env import ROOT, needs_serve_env, serve_py

PIL = pytest.importorskip("PIL.Image", reason="Pillow writes the GIF, CMYK and EXIF files of the corpus")

# Each environment decodes every file with runtime.preprocess (the code both commands run) and
# reports the decoded array's shape and bytes digest, the 32-px tensor's digest, or the error.
DECODE = """
import glob, hashlib, json, os, sys
import cv2
from runtime.contract import PreprocessSpec
from runtime.preprocess import ImageDecodeError, decode_bgr, preprocess
out = {}
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*"))):
    try:
        img = decode_bgr(p)
        x = preprocess([p], spec=PreprocessSpec(size=32))
        out[os.path.basename(p)] = [list(img.shape), hashlib.sha256(img.tobytes()).hexdigest(),
                                    hashlib.sha256(x.tobytes()).hexdigest()]
    except ImageDecodeError as e:
        out[os.path.basename(p)] = "error: " + str(e).split(": ", 1)[1]
print(json.dumps({"opencv": cv2.__version__, "decoded": out}))
"""


def write_corpus(d: Path) -> None:
    from PIL import Image

    y, x = np.mgrid[0:40, 0:56]
    base = np.stack([(x * 4) % 256, (y * 6) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    frames = [Image.fromarray(np.roll(base, 5 * k, axis=1)) for k in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(d / "still.gif")
    noise = np.random.default_rng(0).integers(0, 200, base.shape).astype(np.uint16)
    cv2.imwrite(str(d / "deep16.png"), (base.astype(np.uint16) * 257 + noise)[:, :, ::-1])
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    for orientation in (3, 6):
        im = Image.fromarray(base)
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(d / f"exif{orientation}.jpg", exif=exif, quality=95)
    cv2.imwrite(str(d / "gray.png"), base[:, :, 0])
    cv2.imwrite(str(d / "rgba.png"), np.dstack([base[:, :, ::-1], np.full(base.shape[:2], 128, np.uint8)]))
    for ext in ("png", "webp", "tif", "bmp"):
        cv2.imwrite(str(d / f"plain.{ext}"), base[:, :, ::-1])


@needs_serve_env
def test_both_environments_decode_the_corpus_identically(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    here = subprocess.run([sys.executable, "-c", DECODE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    serve = serve_py("-c", DECODE, str(tmp_path), timeout=120)
    assert here.returncode == 0 and serve.returncode == 0, (here.stderr[-2000:], serve.stderr[-2000:])
    a, b = json.loads(here.stdout), json.loads(serve.stdout)
    assert a["opencv"] != b["opencv"]                # two OpenCV builds really are compared (5.x and 4.11 today)
    assert a["decoded"] == b["decoded"]
    decoded = a["decoded"]
    assert len(decoded) == 12
    assert decoded["anim.gif"] == decoded["still.gif"] == \
        "error: GIF is not a supported format (JPEG, PNG, BMP, WebP, TIFF)"
    assert decoded["exif6.jpg"][0] == [56, 40, 3] and decoded["exif3.jpg"][0] == [40, 56, 3]   # rotated upright
    assert all(isinstance(v, list) for k, v in decoded.items() if not k.endswith(".gif"))
