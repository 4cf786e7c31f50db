"""runtime._fastnorm (the fused C preprocessing kernel) against its numpy twin and independent references."""

import math
import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import runtime.preprocess as pp
from benchmarks import cext_cross
from runtime.contract import PreprocessSpec
from runtime.preprocess import normalize_coefficients, preprocess, resize, resize_normalize_into

fastnorm = pp._fastnorm
# The kernels this CPU runs, asked for by name (each falls through to the next when it cannot serve).
KERNELS = ("planar", "tile16", "tile8", "neon", "generic")
CPU_KERNELS = {"avx2": ("planar", "tile16", "tile8", "generic"), "neon": ("neon", "generic"), "generic": ("generic",)}
needs_ext = pytest.mark.skipif(fastnorm is None, reason="runtime._fastnorm not built (no C compiler at install)")

SCALE, BIAS = normalize_coefficients((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ARGS = (tuple(map(float, SCALE)), tuple(map(float, BIAS)))

# (H, W) -> (h, w): shrink both, shrink one / grow the other (COCO's 640x427 -> 448), identity,
# sizes that are not multiples of the 8-wide SIMD tiles, a 1-pixel output, big shrink factors.
SHAPES = [((480, 640), (448, 448)), ((427, 640), (448, 448)), ((640, 427), (64, 64)), ((61, 67), (61, 67)),
          ((97, 203), (19, 45)), ((33, 35), (1, 1)), ((300, 29), (23, 17)), ((1000, 750), (37, 29)),
          ((20, 500), (16, 16)), ((9, 9), (8, 3))]


def _img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _area_mean_f64(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent exact box filter: replicate every pixel w/g times (g = gcd(W, w)) so each
    output column owns exactly W/g of the copies, average those; then the same for rows."""
    H, W = img.shape[:2]
    gx, gy = math.gcd(W, w), math.gcd(H, h)
    x = np.repeat(img.astype(np.float64), w // gx, axis=1).reshape(H, w, W // gx, 3).mean(axis=2)
    return np.repeat(x, h // gy, axis=0).reshape(h, H // gy, w, 3).mean(axis=1)


def _run(src, out_shape, dtype, **kw):
    out = np.full(out_shape, np.nan, dtype)
    fastnorm.resize_normalize(src, out, *ARGS, **kw)
    return out


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_simd_generic_and_numpy_are_bit_identical(shape):
    (H, W), (h, w) = shape
    rng = np.random.default_rng(H * 1000 + W)
    img = _img(rng, H, W)
    for dtype in (np.float32, np.float16):
        simd = _run(img, (3, h, w), dtype)
        generic = _run(img, (3, h, w), dtype, simd=False)
        twin = np.full((3, h, w), np.nan, dtype)
        if (H, W) == (h, w) or H > h or W > w:       # the shapes the area path serves
            resize_normalize_into(img, twin, SCALE, BIAS, use_ext=False)
            np.testing.assert_array_equal(simd.view(np.uint8), twin.view(np.uint8))
        np.testing.assert_array_equal(simd.view(np.uint8), generic.view(np.uint8))
        assert np.isfinite(simd).all()
    # float16 is the float32 result rounded to nearest even, as numpy's astype.
    np.testing.assert_array_equal(_run(img, (3, h, w), np.float32).astype(np.float16).view(np.uint16),
                                  _run(img, (3, h, w), np.float16).view(np.uint16))


# COCO's common widths to 448 (planar kernel, with and without the -128 pixel offset), and a
# 16-byte-aligned destination (numpy's usual alignment for large arrays) for streaming stores;
# camera frames' tap patterns at a quarter of the size (1280x720 and 1920x1080 to 448: the
# same Dx, footprints of 2.9 and 4.3 pixels: NEON's 64-byte windows).
KERNEL_SHAPES = SHAPES + [((480, 640), (448, 448)), ((640, 426), (448, 448)), ((612, 612), (448, 448)),
                          ((375, 500), (448, 448)), ((31, 45), (17, 29)), ((180, 320), (112, 112)),
                          ((270, 480), (112, 112))]


@needs_ext
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_every_kernel_and_store_mode_is_bit_identical_to_the_numpy_twin(shape):
    (H, W), (h, w) = shape
    img = _img(np.random.default_rng(H + W), H, W)
    twin = np.empty((3, h, w), np.float32)
    if not ((H, W) == (h, w) or H > h or W > w):
        return
    resize_normalize_into(img, twin, SCALE, BIAS, use_ext=False)
    used = set()
    for kernel in KERNELS:
        for dtype in (np.float32, np.float16):
            for stream in (False, True):
                for offset in (0, 16 // np.dtype(dtype).itemsize, 1):   # 32-byte aligned, 16, 4/2
                    raw = np.full(3 * h * w + 64, np.nan, dtype)
                    start = (-raw.ctypes.data % 32) // raw.itemsize + offset
                    out = raw[start:start + 3 * h * w].reshape(3, h, w)
                    got = fastnorm.resize_normalize(img, out, *ARGS, stream=stream, kernel=kernel)
                    assert KERNELS.index(got) >= KERNELS.index(kernel)     # falls through, never back
                    used.add(got)
                    ref = twin.astype(dtype)
                    np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))
    assert "generic" in used and used <= set(CPU_KERNELS[fastnorm.simd()])


@needs_ext
def test_each_simd_kernel_of_this_cpu_runs_when_asked_for():
    # Every kernel this CPU has serves COCO's 640x480 -> 448 when asked for by name, so the bit
    # tests above ran each of them (not only the first and the last); on AVX2 CPUs a footprint
    # too wide for planar and tile16 (427 -> 64 columns: Dx = 427) falls through to tile8.
    img = _img(np.random.default_rng(2), 480, 640)
    out = np.empty((3, 448, 448), np.float32)
    kernels = CPU_KERNELS[fastnorm.simd()]
    for kernel in kernels:
        assert fastnorm.resize_normalize(img, out, *ARGS, kernel=kernel) == kernel
    assert fastnorm.resize_normalize(img, out, *ARGS) == kernels[0]
    if fastnorm.simd() == "avx2":
        wide = _img(np.random.default_rng(3), 640, 427)
        small = np.empty((3, 64, 64), np.float32)
        assert [fastnorm.resize_normalize(wide, small, *ARGS, kernel=k) for k in kernels] == ["tile8"] * 3 + ["generic"]


def _twin_cases(tmp_path: Path) -> list[Path]:
    """Harness case files (image + the numpy twin's output): KERNEL_SHAPES' area-path shapes,
    12 random shrinks, and the float16 range edges."""
    rng = np.random.default_rng(11)
    shapes = [s for s in dict.fromkeys(KERNEL_SHAPES) if s[0] == s[1] or s[0][0] > s[1][0] or s[0][1] > s[1][1]]
    for _ in range(12):
        H, W = (int(v) for v in rng.integers(8, 200, 2))
        shapes.append(((H, W), (int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1)))))
    runs = [(shape, SCALE, BIAS) for shape in shapes]
    runs += [(((40, 40), (24, 24)), np.float32([s] * 3), np.float32([b] * 3)) for s, b in F16_EDGES]
    cases = []
    for i, (((H, W), (h, w)), scale, bias) in enumerate(runs):
        img = _img(np.random.default_rng(H + W), H, W)
        twin = np.empty((3, h, w), np.float32)
        resize_normalize_into(img, twin, scale, bias, use_ext=False)
        cases.append(cext_cross.write_case(tmp_path / f"case{i}.bin", img, twin, scale, bias))
    return cases


@pytest.mark.parametrize("target", ["native", "aarch64"])
def test_standalone_kernel_harness_is_bit_identical_to_the_numpy_twin(target, tmp_path):
    # runtime/_cext/harness.c: every kernel x float32/float16 x store mode x alignment, without
    # Python, so it also runs on aarch64 (NEON) under qemu-user. `make test-aarch64` installs the
    # cross tools and sets FN_REQUIRE_AARCH64, which turns the skip into a failure.
    if target == "native":
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler (cc, gcc) on PATH")
        cmd = [str(cext_cross.build_harness(cc, tmp_path / "fn_harness", static=False))]
        expect = set(CPU_KERNELS[fastnorm.simd()] if fastnorm is not None else ("generic",))
    else:
        tools = cext_cross.cross_tools()
        if isinstance(tools, str):
            if os.environ.get("FN_REQUIRE_AARCH64"):
                pytest.fail(tools)
            pytest.skip(tools)
        cc, qemu = tools
        cmd = [qemu, str(cext_cross.build_harness(cc, tmp_path / "fn_harness"))]
        expect = {"neon", "generic"}
    cases = _twin_cases(tmp_path)
    rc, used, out = cext_cross.run_harness(cmd, cases)
    assert rc == 0, out
    assert len(used) == len(cases), out
    assert set().union(*(k for _, k in used)) == expect, out
    assert expect - {"generic"} <= dict(used)[(480, 640, 448, 448)], out    # COCO's shape: every SIMD kernel


def test_harness_builds_with_the_extensions_flags():
    # The bits depend on the flags (-ffp-contract=off): the harness must be built as setup.py builds the extension.
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    for flag in cext_cross.CFLAGS:
        assert f'"{flag}"' in setup_py, flag


@needs_ext
def test_planar_kernel_serves_coco_widths():
    img = _img(np.random.default_rng(2), 480, 640)
    out = np.empty((3, 448, 448), np.float32)
    if fastnorm.simd() == "avx2":
        for H, W in ((480, 640), (640, 480), (427, 640), (426, 640), (612, 612)):
            assert fastnorm.resize_normalize(img[:H, :W] if H <= 480 else _img(np.random.default_rng(3), H, W),
                                             out, *ARGS) == "planar"
    assert fastnorm.resize_normalize(img, out, *ARGS, simd=False) == "generic"
    with pytest.raises(ValueError, match="unknown kernel"):
        fastnorm.resize_normalize(img, out, *ARGS, kernel="fast")


@needs_ext
def test_image_hw_reads_complete_jpeg_and_png_headers_only(tmp_path):
    img = cv2.GaussianBlur(_img(np.random.default_rng(6), 37, 53), (3, 3), 0)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    cases = {"a.jpg": (jpg, (37, 53)), "a.png": (png, (37, 53)), "cut.jpg": (jpg[:-100], None),
             "cut.png": (png[:-5], None), "tail.jpg": (jpg + b"xx", None), "a.bmp": (cv2.imencode(".bmp", img)[1].tobytes(), None),
             "empty.jpg": (b"", None), "soi.jpg": (b"\xff\xd8\xff\xd9", None)}
    for name, (data, hw) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert fastnorm.image_hw(str(tmp_path / name)) == hw, name
    assert fastnorm.image_hw(tmp_path / "a.jpg") == (37, 53)                # os.PathLike
    assert fastnorm.image_hw(str(tmp_path / "missing.jpg")) is None
    assert fastnorm.image_hw(str(tmp_path)) is None                         # a directory


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_an_independent_float64_area_mean(shape):
    (H, W), (h, w) = shape
    img = _img(np.random.default_rng(7), H, W)
    ref = _area_mean_f64(img, h, w)[:, :, ::-1].transpose(2, 0, 1)         # RGB planes
    ref = ref * SCALE.astype(np.float64)[:, None, None] + BIAS.astype(np.float64)[:, None, None]
    np.testing.assert_allclose(_run(img, (3, h, w), np.float32), ref, rtol=0, atol=3e-6)


def test_numpy_twin_matches_the_float64_reference_and_cv2_area():
    # Runs without the extension too. A real photo shrunk on both sides: cv2.INTER_AREA rounds
    # the same area mean to uint8, so the two differ by at most half a grey level.
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(_img(rng, 120, 170), (5, 5), 0)
    out = np.empty((3, 64, 80), np.float32)
    resize_normalize_into(img, out, SCALE, BIAS, use_ext=False)
    mean = (out - BIAS[:, None, None]) / SCALE[:, None, None]               # back to 0..255 units
    np.testing.assert_allclose(mean, _area_mean_f64(img, 64, 80)[:, :, ::-1].transpose(2, 0, 1), atol=2e-4)
    cv = cv2.resize(img, (80, 64), interpolation=cv2.INTER_AREA)[:, :, ::-1].transpose(2, 0, 1)
    assert np.abs(mean - cv).max() <= 0.5 + 1e-3
    # resize() gives the rounded area mean, half to even.
    np.testing.assert_array_equal(resize(img, 64)[..., 0], np.rint(_area_mean_f64(img, 64, 64)[..., 0]))


# (scale, bias) giving subnormal halves, values that round to +-inf, exact ties.
F16_EDGES = [(1e-7, 0.0), (-3e-8, 1e-9), (300.0, -5000.0), (257.0, -65504.0), (1 / 3, -40.0)]


@needs_ext
def test_float16_rounding_at_the_edges_of_the_half_range():
    # The portable converter (generic kernel) and F16C (SIMD kernel) must both round like numpy.
    img = _img(np.random.default_rng(5), 40, 40)
    for scale, bias in F16_EDGES:
        args = ((scale,) * 3, (bias,) * 3)
        ref = np.empty((3, 24, 24), np.float32)
        fastnorm.resize_normalize(img, ref, *args)
        for simd in (True, False):
            h = np.empty((3, 24, 24), np.float16)
            fastnorm.resize_normalize(img, h, *args, simd=simd)
            np.testing.assert_array_equal(h.view(np.uint16), ref.astype(np.float16).view(np.uint16))


@needs_ext
def test_strided_source_and_batch_row_destination():
    img = _img(np.random.default_rng(9), 200, 300)
    crop = img[13:170, 21:290]                                               # row stride 900 bytes
    batch = np.full((3, 3, 48, 48), np.nan, np.float32)
    fastnorm.resize_normalize(crop, batch[1], *ARGS)
    np.testing.assert_array_equal(batch[1], _run(np.ascontiguousarray(crop), (3, 48, 48), np.float32))
    assert np.isnan(batch[0]).all() and np.isnan(batch[2]).all()             # neighbours untouched


@needs_ext
@pytest.mark.parametrize("src,out,match", [
    (np.zeros((10, 10, 4), np.uint8), np.zeros((3, 8, 8), np.float32), "uint8 \\(H, W, 3\\)"),
    (np.zeros((10, 10, 3), np.float32), np.zeros((3, 8, 8), np.float32), "uint8 \\(H, W, 3\\)"),
    (np.zeros((10, 10), np.uint8), np.zeros((3, 8, 8), np.float32), "uint8 \\(H, W, 3\\)"),
    (np.zeros((10, 10, 3), np.uint8)[:, :, ::-1], np.zeros((3, 8, 8), np.float32), "contiguous BGR pixels"),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((4, 8, 8), np.float32), "float32 or float16 \\(3, h, w\\)"),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((3, 8, 8), np.float64), "float32 or float16 \\(3, h, w\\)"),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((8, 8, 3), np.float32), "float32 or float16 \\(3, h, w\\)"),
    (np.zeros((10, 10, 3), np.uint8), np.zeros((3, 0, 8), np.float32), "float32 or float16 \\(3, h, w\\)"),
])
def test_bad_buffers_give_clear_errors(src, out, match):
    with pytest.raises(ValueError, match=match):
        fastnorm.resize_normalize(src, out, *ARGS)


@needs_ext
def test_non_contiguous_or_read_only_out_is_refused():
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises((ValueError, BufferError), match="contiguous"):
        fastnorm.resize_normalize(img, np.zeros((3, 8, 16), np.float32)[:, :, ::2], *ARGS)
    ro = np.zeros((3, 8, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError), match="read-only|writable"):
        fastnorm.resize_normalize(img, ro, *ARGS)
    with pytest.raises(TypeError):
        fastnorm.resize_normalize(img, np.zeros((3, 8, 8), np.float32), (1.0, 2.0), (0.0, 0.0, 0.0))


def _jpegs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = cv2.GaussianBlur(_img(rng, 90 + 13 * i, 140 - 9 * i), (3, 3), 0)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def test_threaded_preprocess_equals_single_threaded_and_the_numpy_path(monkeypatch):
    jpegs = _jpegs(7)
    single = preprocess(jpegs, size=64)
    threaded = preprocess(jpegs, size=64, threads=3)
    np.testing.assert_array_equal(single, threaded)
    half = preprocess(jpegs, size=64, threads=2, dtype=np.float16)
    np.testing.assert_array_equal(half.view(np.uint16), single.astype(np.float16).view(np.uint16))
    monkeypatch.setattr(pp, "_fastnorm", None)                              # as if the build failed
    np.testing.assert_array_equal(preprocess(jpegs, size=64, threads=2), single)


def test_preprocess_out_buffer_validation():
    jpegs = _jpegs(2)
    with pytest.raises(ValueError, match="float32 or float16"):
        preprocess(jpegs, size=32, out=np.zeros((2, 3, 32, 32), np.float64))
    with pytest.raises(ValueError, match=r"\(>= 2, 3, 32, 32\)"):
        preprocess(jpegs, size=32, out=np.zeros((1, 3, 32, 32), np.float32))


def _stalled_share(call) -> float:
    """The longest stretch of call()'s wall time in which another Python thread made no step, as
    a share of it: near 0 when call() releases the GIL, near 1 when it holds it throughout.
    The ticker sleeps between steps (so it needs no spare core, and costs little on a loaded
    machine): it only has to get the GIL back each time, which a GIL-holding call never allows."""
    stamps, done = [], threading.Event()

    def tick():
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    done.set()
    t.join()
    inside = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
    return max(b - a for a, b in zip(inside, inside[1:])) / (t1 - t0)


@needs_ext
def test_kernel_releases_the_gil():
    # One long call (the generic kernel on an 8000x8000 image, ~0.2 s) while a Python thread
    # ticks: it must keep ticking through the call. Not a parallel-speed-up test: on a shared
    # 2-core machine a second core is not guaranteed, while a time slice is (measured at load
    # average 8 on 2 cores: stalled 3-5% of the call; a GIL-holding call: 99%). The same measure
    # on a call known to hold the GIL (sorting Python ints: C code that never yields) must see
    # the ticker stalled, so the test can fail. Up to 3 tries absorb a rare long scheduling delay.
    img = np.zeros((8000, 8000, 3), np.uint8)        # calloc'd zero pages: 192 MB that cost no RAM
    out = np.empty((3, 448, 448), np.float32)
    kernel = 1.0
    for _ in range(3):
        kernel = min(kernel, _stalled_share(lambda: fastnorm.resize_normalize(img, out, *ARGS, simd=False)))
        if kernel < 0.5:
            break
    ints = np.random.default_rng(2).integers(0, 1 << 62, 400_000).tolist()
    held = _stalled_share(lambda: sorted(ints))
    assert held > 0.8, f"the detector missed a GIL-holding call (stalled share {held:.2f})"
    assert kernel < 0.5, f"a Python thread stalled for {kernel:.0%} of the kernel's call: the GIL is held"


def test_spec_interpolation_linear_and_enlarging_use_cv2_linear():
    rng = np.random.default_rng(4)
    small = _img(rng, 30, 40)
    out = np.empty((3, 64, 64), np.float32)
    resize_normalize_into(small, out, SCALE, BIAS)                           # grows both sides
    lin = cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)
    ref = lin[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) * SCALE[:, None, None] + BIAS[:, None, None]
    np.testing.assert_array_equal(out, ref)
    spec = PreprocessSpec(size=32, interpolation="linear")
    big = cv2.imencode(".png", _img(rng, 100, 90))[1].tobytes()
    got = preprocess([big], spec=spec)[0]
    lin = cv2.resize(cv2.imdecode(np.frombuffer(big, np.uint8), cv2.IMREAD_COLOR), (32, 32), interpolation=cv2.INTER_LINEAR)
    ref = lin[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) * SCALE[:, None, None] + BIAS[:, None, None]
    np.testing.assert_array_equal(got, ref)
