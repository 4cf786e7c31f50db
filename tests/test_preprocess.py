"""runtime.preprocess: the tensor the model sees, for every kind of image file users have."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime.contract import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from runtime.preprocess import ImageDecodeError, decode, preprocess, preprocess_one


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _left_white(h: int = 40, w: int = 80) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = 255
    return a


def test_matches_an_independent_float64_reference(tmp_path):
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (7, 7), 0)
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg(rgb))
    out = preprocess([str(path), path.read_bytes()], size=448)
    assert out.shape == (2, 3, 448, 448) and out.dtype == np.float32
    # Reference: cv2.imread (another decode entry point), cv2's INTER_AREA on float64 (the
    # exact box mean when both sides shrink; on uint8 cv2 would round the mean), float64 math.
    ref = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    ref = cv2.resize(ref.astype(np.float64), (448, 448), interpolation=cv2.INTER_AREA) / 255.0
    ref = ((ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0], ref, atol=2e-6)
    np.testing.assert_array_equal(out[0], out[1])          # path and bytes give the same tensor


def test_threads_and_preallocated_buffer_give_the_same_tensor(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(_jpeg(rng.integers(0, 256, (100 + 7 * i, 120, 3), dtype=np.uint8)))
        paths.append(p)
    single = preprocess(paths, size=64)
    buf = np.full((8, 3, 64, 64), np.nan, np.float32)
    threaded = preprocess(paths, size=64, threads=2, out=buf)
    np.testing.assert_array_equal(single, threaded)
    assert threaded.base is buf or threaded is buf[:5] or np.shares_memory(threaded, buf)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_png_modes_come_out_as_rgb(mode):
    img = Image.fromarray(_left_white()).convert(mode)
    rgb = decode(_png(img))
    assert rgb.shape == (40, 80, 3) and rgb.dtype == np.uint8
    assert rgb[20, 10].min() > 200 and rgb[20, 70].max() < 50


def test_16bit_png_is_scaled_to_8bit():
    g16 = np.full((20, 30), 40000, np.uint16)
    ok, enc = cv2.imencode(".png", g16)
    rgb = decode(enc.tobytes())
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert abs(int(rgb[0, 0, 0]) - 40000 // 257) <= 1


def test_cmyk_jpeg_decodes_to_the_right_colours():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)                                 # left half red
    b = io.BytesIO()
    Image.fromarray(a).convert("CMYK").save(b, "JPEG", quality=95)
    rgb = decode(b.getvalue())
    assert rgb.shape == (40, 80, 3)
    r, g, bl = rgb[20, 10].astype(int)
    assert r > 200 and g < 60 and bl < 60


def test_exif_orientation_is_applied():
    # Stored 80 wide x 40 tall, white on the left; Orientation=6 means "rotate 90 CW to view":
    # the viewer sees 40 wide x 80 tall, white on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = decode(_jpeg(_left_white(), exif=exif.tobytes()))
    assert rgb.shape == (80, 40, 3)
    assert rgb[10, 20].min() > 200 and rgb[70, 20].max() < 50


@pytest.mark.parametrize("payload,match", [
    (b"", "empty file"),
    (b"this is not an image", "not a decodable image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not a decodable image"),
])
def test_undecodable_input_names_the_file(tmp_path, payload, match):
    p = tmp_path / "broken.jpg"
    p.write_bytes(payload)
    with pytest.raises(ImageDecodeError, match=match) as e:
        preprocess_one(p, PreprocessSpec(size=32))
    assert str(p) in str(e.value)


def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.jpg: cannot read"):
        preprocess_one(tmp_path / "nope.jpg")
    d = tmp_path / "dir.jpg"
    d.mkdir()
    with pytest.raises(ImageDecodeError, match="is a directory"):
        preprocess_one(d)


def test_truncated_jpeg_is_an_error_or_a_full_size_image():
    # libjpeg pads a truncated scan with grey and warns; either outcome must be an
    # image of the right size or a clear error, never a crash.
    data = _jpeg(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    try:
        rgb = decode(data[: len(data) // 2], name="half.jpg")
        assert rgb.shape == (200, 300, 3)
    except ImageDecodeError as e:
        assert "half.jpg" in str(e)


def test_decompression_bomb_header_is_refused_without_allocating():
    import struct
    import zlib

    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match="bomb.png: image too large"):
        decode(png, name="bomb.png")


def test_area_interpolation_does_not_alias_on_large_downscales():
    # 1-pixel black/white stripes shrunk 3.3x (a camera frame): an anti-aliased filter
    # gives nearly flat grey; INTER_LINEAR interpolates between 2 neighbouring source columns
    # only and turns the stripes into a strong low-frequency moire (aliasing).
    stripes = np.zeros((1480, 1480, 3), np.uint8)
    stripes[:, ::2] = 255
    ok, enc = cv2.imencode(".png", stripes)
    area = preprocess([enc.tobytes()], size=448)[0, 0]
    linear = preprocess([enc.tobytes()], size=448, interpolation="linear")[0, 0]
    assert area.std() < 0.5 * linear.std()          # measured: 0.33 vs 1.26 (normalized units)


def test_paths_give_the_same_tensor_as_bytes_for_every_kind_of_file(tmp_path):
    # Paths to complete JPEG/PNG files are decoded by cv2.imread into a reused buffer, the rest
    # (and bytes) by cv2.imdecode: the tensors, and the errors, must not depend on which.
    rng = np.random.default_rng(8)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (5, 5), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"a.jpg": _jpeg(rgb), "rot6.jpg": _jpeg(rgb, exif=exif.tobytes()), "b.png": _png(Image.fromarray(rgb)),
             "p.png": _png(Image.fromarray(rgb).convert("P")), "tail.jpg": _jpeg(rgb) + b"trailing bytes",
             "big.jpg": _jpeg(cv2.resize(rgb, (900, 700)))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / n for n in files] * 2                     # the buffer is reused across sizes
    for threads in (1, 2):
        got = preprocess(paths, size=64, threads=threads)
        ref = preprocess([p.read_bytes() for p in paths], size=64)
        np.testing.assert_array_equal(got, ref)
    assert preprocess([tmp_path / "rot6.jpg"], size=64).shape == (1, 3, 64, 64)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_jpeg(rgb)[:-200])                             # imread would pad it; imdecode refuses
    with pytest.raises(ImageDecodeError, match="cut.jpg: not a decodable image"):
        preprocess([paths[0], cut, paths[1]], size=32, threads=2)
