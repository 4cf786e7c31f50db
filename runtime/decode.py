"""The one decode path: a path or encoded bytes -> a checked BGR uint8 image, every caller's.

    python -c "from runtime.decode import decode_source; print(decode_source('img.jpg').shape)"

`decode_source` is what probres-infer, probres-eval, probres-serve, the Triton preprocessing
model, export's verification and calibration images and training's evaluation all decode with:
a path is stat-checked (a regular file, at most MAX_FILE_BYTES), a complete JPEG/PNG within the
pixel limit is decoded by cv2.imread into this thread's reused buffer (decode_path_reusing), and
anything else is read, its header's claimed size checked against MAX_IMAGE_PIXELS before OpenCV
allocates the pixels (runtime.headers), and decoded by cv2.imdecode (decode_bgr). Bytes take the
last two steps. Every failure is one ImageDecodeError naming the input. runtime.preprocess turns
the image into the model's input; runtime.pipeline streams batches of them.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Union

# Refuse images over this many pixels before OpenCV allocates them: its decoders check
# the header against OPENCV_IO_MAX_IMAGE_PIXELS (default 2^30 pixels, 3 GiB of BGR). 2^28
# (16384 x 16384) is still far beyond any camera frame and keeps one bad file from costing
# gigabytes. OpenCV reads the variable when it loads, so it only takes effect when this
# module is the first to import cv2 (as in probres-infer); the checks below hold the same
# limit either way.
MAX_IMAGE_PIXELS = 1 << 28
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

from runtime.errors import ImageError  # noqa: E402
from runtime.headers import header_size  # noqa: E402

MAX_FILE_BYTES = 256 << 20     # no camera image is this big; refuse before reading it into memory

try:  # the fused C kernel (runtime/_cext/fastnorm.c), built by `pip install -e .`; also reads JPEG/PNG headers
    from runtime import _fastnorm
except ImportError:  # not built (no compiler): decode_bgr decodes everything, same pixels
    _fastnorm = None

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class ImageDecodeError(ImageError, ValueError):
    """An input could not be turned into an image; the message names the input."""


def _name(src: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src)


def read_bytes(src: ImageSource, name: str | None = None) -> np.ndarray:
    """The encoded bytes of `src` as a uint8 array (a path is read from disk)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(src, dtype=np.uint8)
    else:
        path = os.fspath(src)
        try:
            buf = np.fromfile(path, dtype=np.uint8)
        except IsADirectoryError:
            raise ImageDecodeError(f"{_name(src, name)}: is a directory, not an image") from None
        except OSError as e:
            raise ImageDecodeError(f"{_name(src, name)}: cannot read file ({e.strerror or e})") from None
    if buf.size == 0:
        raise ImageDecodeError(f"{_name(src, name)}: empty file")
    return buf


def check_header(buf: bytes | memoryview, name: str) -> None:
    """ImageDecodeError when the header claims more than MAX_IMAGE_PIXELS pixels."""
    size = header_size(buf)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{name}: image too large ({size[0]}x{size[1]} pixels claimed by its header, "
                               f"limit {MAX_IMAGE_PIXELS} pixels): refusing to decode")


def decode_bgr(src: ImageSource, name: str | None = None) -> np.ndarray:
    """cv2.imdecode to a 3-channel BGR uint8 HxWx3 array, the right way up (decode_source's last step).

    IMREAD_COLOR gives 3 channels and 8 bits whatever the file holds: grayscale is
    replicated, palette expanded, alpha dropped, 16-bit scaled to 8, CMYK JPEG converted,
    and the EXIF orientation applied (IMREAD_IGNORE_ORIENTATION is not set).
    """
    buf = read_bytes(src, name)
    if buf[:4].tobytes() == b"GIF8":   # OpenCV 5 (.venv) decodes GIF, 4.x (.venv-serve) not: one answer for both
        raise ImageDecodeError(f"{_name(src, name)}: GIF is not a supported format (JPEG, PNG, BMP, WebP, TIFF)")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:
        if "MAX_IMAGE_PIXELS" in str(e):  # the header claims more pixels than the limit
            raise ImageDecodeError(f"{_name(src, name)}: image too large (header claims more than {MAX_IMAGE_PIXELS} pixels)") from None
        raise ImageDecodeError(f"{_name(src, name)}: cannot decode image (OpenCV decoder error)") from None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ImageDecodeError(f"{_name(src, name)}: not a decodable image (corrupt, truncated or unsupported format)")
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{_name(src, name)}: image too large ({img.shape[1]}x{img.shape[0]} pixels)")
    return img


# A path is decoded into a buffer each thread keeps: a fresh ~1 MB array per image costs page
# faults whenever the allocator has handed the last one back to the kernel (up to 1 ms per
# 640x480 image here, more than the resize), and the reused buffer is still in cache. cv2.imread
# (the only decoder call that takes a destination) gets it; only files that end as a complete
# JPEG or PNG do (the C helper checks EOI / IEND), since imread pads a truncated file where
# imdecode (decode_bgr) refuses it, and the two must not disagree. Everything else, and any
# failure, goes to decode_bgr, which decides (and words the error).
SCRATCH_MAX_BYTES = 32 << 20      # larger images (over ~11 Mpixel) get an array of their own
_SCRATCH = threading.local()
_SENTINEL = b"probres:imread-wrote-nothing:v1"          # 31 bytes


def decode_path_reusing(path: str) -> np.ndarray | None:
    """Decode a complete JPEG/PNG file into this thread's reusable buffer (valid until this thread's
    next call); None when the file is anything else, larger than MAX_IMAGE_PIXELS by its header, or
    anything fails, or the C extension is missing: decode_bgr then decides (and words the error)."""
    if _fastnorm is None:
        return None
    try:
        path.encode("utf-8")       # cv2.imread segfaults on a str it cannot encode: an undecodable
    except UnicodeEncodeError:     # file name (os.fsdecode's surrogates); read_bytes opens those fine
        return None
    try:
        hw = _fastnorm.image_hw(path)                       # (h, w) from the header, None if not complete
    except (TypeError, ValueError):                         # e.g. an embedded NUL: decode_bgr says
        return None
    if hw is None or not 11 <= hw[0] * hw[1] <= MAX_IMAGE_PIXELS or hw[0] * hw[1] * 3 > SCRATCH_MAX_BYTES:
        return None
    nbytes = hw[0] * hw[1] * 3
    raw = getattr(_SCRATCH, "buf", None)
    if raw is None or raw.size < nbytes:
        raw = _SCRATCH.buf = np.empty(nbytes, np.uint8)
    dst = raw[:nbytes].reshape(hw[0], hw[1], 3)
    # imread(path, dst) returns dst untouched when it fails before decoding, and does not say so:
    # a decode overwrites these bytes (an image that happens to start with them is decoded again).
    raw[:31] = np.frombuffer(_SENTINEL, np.uint8)
    try:
        img = cv2.imread(path, dst, cv2.IMREAD_COLOR)      # EXIF orientation applied, as imdecode
    except Exception:                                       # cv2.error (a header imread refuses...)
        return None
    if img is dst:
        return None if raw[:31].tobytes() == _SENTINEL else img
    ok = isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and img.size
    return img if ok else None                              # rotated by EXIF: a new array


def check_path(path: str, name: str | None = None) -> str:
    """The checks a path passes before it is read (ImageDecodeError in probres-infer's words); its label.

    Also used by probres-batch's read tasks (runtime.batch_fs), so that an input's error record is
    the same whichever command read it."""
    if "\0" in path:              # runtime.pipeline's walk marks a directory it could not list "dir\0reason"
        d, why = path.split("\0", 1)
        raise ImageDecodeError(f"{d}: cannot list directory ({why})")
    label = path if name is None else name
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageDecodeError(f"{label}: cannot read file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(f"{label}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(f"{label}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{label}: file too large ({st.st_size} bytes, limit {MAX_FILE_BYTES})")
    return label


def decode_source(src: ImageSource, name: str | None = None) -> np.ndarray:
    """A path or encoded bytes -> BGR uint8 HxWx3, through every check above; ImageDecodeError naming it.

    The array may be this thread's reused decode buffer: use it before this thread decodes again
    (preprocessing writes it into the model's input at once). `name` replaces the input's name in
    errors (a path's, or "<N bytes>").
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = _name(src, name)
        check_header(src, label)
        return decode_bgr(src, label)
    path = os.fspath(src)
    label = check_path(path, name)
    img = decode_path_reusing(path)
    if img is not None:
        return img
    buf = read_bytes(path, label)
    check_header(buf.data, label)
    return decode_bgr(buf.data, label)


def decode(src: ImageSource, name: str | None = None) -> np.ndarray:
    """decode_source as RGB uint8 HxWx3, an array of its own (for training-time augmentation)."""
    return cv2.cvtColor(decode_source(src, name), cv2.COLOR_BGR2RGB)
