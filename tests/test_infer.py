"""probres-infer end to end: output formats, top-k, input order, the bad-file corpus, exit codes.

    .venv/bin/python -m pytest -q tests/test_infer.py

The model is a tiny hand-built ONNX graph (channel means -> linear -> sigmoid) carrying the toy
label set's contract, so every expected probability can be computed independently with numpy.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.infer import main
from runtime.decode import check_header
from runtime.headers import header_size
from runtime.pipeline import iter_image_paths
from runtime.preprocess import ImageDecodeError, decode_bgr, load_source, preprocess

S = 32


def tiny_onnx(path: Path, contract: ModelContract, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """probs (N, C) = sigmoid(mean over pixels of each channel (N, 3) @ W (3, C) + b): returns (W, b)."""
    import onnx
    from onnx import TensorProto, helper

    c = contract.labels.num_classes
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(3, c)).astype(np.float32), rng.normal(scale=0.3, size=c).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["l"]),
             helper.make_node("Sigmoid", ["l"], ["probs"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, S, S])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", c])],
                          [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel().tolist()),
                           helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.tolist())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="probres.contract", value=contract.to_json())
    onnx.save(m, str(path))
    return w, b


def expected_probs(paths, spec, w, b) -> np.ndarray:
    x = preprocess([str(p) for p in paths], spec=spec).astype(np.float64)
    return 1 / (1 + np.exp(-(x.mean(axis=(2, 3)) @ w + b)))


@pytest.fixture(scope="module")
def model(tmp_path_factory, toy_root):
    cats = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    contract = ModelContract(LabelSet.from_categories(cats), PreprocessSpec(size=S))
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    w, b = tiny_onnx(path, contract)
    return path, contract, w, b


def run(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def body(out: str) -> list[str]:
    """The lines after the provenance header (runtime.provenance), which must come first."""
    lines = out.splitlines()
    assert lines and lines[0].startswith(('{"probres": ', "# probres: ")), out[:200]
    return lines[1:]


# ------------------------------------------------------------------------------------ good inputs

def test_jsonl_one_line_per_image_in_sorted_order(model, toy_root, tmp_path, capsys):
    path, contract, w, b = model
    val = toy_root / "val2014"
    images = sorted(val.glob("*.jpg"))
    rc, out, err = run(["--engine", path, val, "--batch-size", 5, "--threads", 2], capsys)
    assert rc == 0
    lines = body(out)
    assert len(lines) == len(images) == 24
    records = [json.loads(line) for line in lines]
    assert [r["image"] for r in records] == [str(p) for p in images]
    p = expected_probs(images, contract.preprocess, w, b)
    for r, row in zip(records, p):
        probs = [x["probability"] for x in r["predictions"]]
        assert probs == sorted(probs, reverse=True) and all(x >= 0.5 for x in probs)
        assert {x["category_id"] for x in r["predictions"]} == {
            contract.labels.category_ids[k] for k in np.flatnonzero(row >= 0.5)}
    assert "24 classified, 0 failed" in err


def test_top_k_all_lists_every_label_with_its_probability(model, toy_root, capsys):
    path, contract, w, b = model
    images = sorted((toy_root / "val2014").glob("*.jpg"))[:7]
    rc, out, _ = run(["--engine", path, *images, "--top-k", "all", "--batch-size", 3], capsys)
    assert rc == 0
    want = expected_probs(images, contract.preprocess, w, b)
    for line, row in zip(body(out), want):
        preds = json.loads(line)["predictions"]
        assert len(preds) == contract.labels.num_classes == 8
        got = {x["label"]: x["probability"] for x in preds}
        for k, name in enumerate(contract.labels.names):
            assert abs(got[name] - row[k]) < 2e-6
        assert [x["label"] for x in preds] == [contract.labels.names[k] for k in np.argsort(-row, kind="stable")]
    rc, out, _ = run(["--engine", path, images[0], "--top-k", "2", "--threshold", "0.99"], capsys)
    row = want[0]                                           # top-k keeps only labels that pass the threshold
    assert [x["label"] for x in json.loads(body(out)[0])["predictions"]] == [
        contract.labels.names[k] for k in np.argsort(-row, kind="stable")[:2] if row[k] >= 0.99]


def test_csv_table_and_atomic_output(model, toy_root, tmp_path, capsys):
    path, contract, w, b = model
    images = sorted((toy_root / "val2014").glob("*.jpg"))[:4]
    out_csv = tmp_path / "res" / "out.csv"
    rc, out, _ = run(["--engine", path, *images, "--format", "csv", "--top-k", 3, "--output", out_csv], capsys)
    assert rc == 0 and out == ""
    rows = list(csv.DictReader(io.StringIO("\n".join(body(out_csv.read_text())))))
    assert len(rows) == 12 and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert rows[0]["image"] == str(images[0]) and rows[0]["error"] == ""
    assert sorted(os.listdir(out_csv.parent)) == ["out.csv"]       # no temp file left behind
    rc, out, _ = run(["--engine", path, images[0], "--format", "table", "--top-k", 2], capsys)
    lines = body(out)
    assert lines[0] == str(images[0]) and lines[1].split() == ["class", "probability"]
    want = expected_probs(images[:1], contract.preprocess, w, b)[0]
    top = np.argsort(-want, kind="stable")[:2]
    assert [ln.strip().rsplit(None, 1) for ln in lines[2:4]] == [
        [contract.labels.names[k], f"{want[k]:.4f}"] for k in top]


def test_console_script_runs(model, toy_root):
    exe = Path(sys.executable).parent / "probres-infer"
    r = subprocess.run([str(exe), "--engine", str(model[0]), str(toy_root / "val2014")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(body(r.stdout)) == 24 and "\r" not in r.stderr     # no progress bar off a terminal


# ------------------------------------------------------------------------------------ the bad-file corpus

def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (8-bit RGB) followed by a tiny IDAT: a decompression-bomb header."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An asymmetric RGB uint8 image (gradients + a blob), so rotations and channel swaps show."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 5.0 + rng.random())], axis=2)
    img[: h // 3, : w // 4] = (250, 20, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("corpus")
    rgb = smooth_image(48, 64)
    good, bad = [], []

    def save(name, data, ok):
        (d / name).write_bytes(data)
        (good if ok else bad).append(str(d / name))

    enc = lambda ext, img: cv2.imencode(ext, img)[1].tobytes()   # noqa: E731
    bgr = rgb[:, :, ::-1].copy()
    save("a_good.jpg", enc(".jpg", bgr), True)
    save("b_gray.png", enc(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)), True)
    save("c_rgba.png", enc(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)), True)
    save("d_16bit.png", enc(".png", bgr.astype(np.uint16) * 257), True)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    save("e_cmyk.jpg", cmyk.getvalue(), True)
    save("f_exif6.jpg", jpeg_with_orientation(rgb, 6), True)
    save("g_good.bmp", enc(".bmp", bgr), True)
    save("h_good.webp", enc(".webp", bgr), True)
    save("i_good.tiff", enc(".tiff", bgr), True)
    full = enc(".jpg", bgr)
    save("j_empty.jpg", b"", False)
    save("k_truncated.jpg", full[: len(full) // 2], False)
    save("l_random.jpg", np.random.default_rng(0).bytes(5000), False)
    save("m_bomb.png", png_header(100000, 100000), False)
    (d / "n_dir.jpg").mkdir()
    bad.append(str(d / "n_dir.jpg"))
    (d / "notes.txt").write_text("not an image\n")                     # skipped by the walk...
    (d / "sub").mkdir()
    save("sub/o_nested.png", enc(".png", bgr), True)
    return d, good, bad


def test_corpus_bad_files_get_error_records_good_ones_results(model, corpus, capsys):
    path = model[0]
    d, good, bad = corpus
    text = str(d / "notes.txt")                     # ...but tried when named explicitly
    missing = str(d / "missing.jpg")
    rc, out, err = run(["--engine", path, d, text, missing, "--batch-size", 4], capsys)
    assert rc == 1
    records = [json.loads(line) for line in body(out)]
    assert [r["image"] for r in records] == sorted(good + bad) + [text, missing]
    failed = {r["image"]: r["error"] for r in records if "error" in r}
    assert set(failed) == set(bad) | {text, missing}
    for r in records:
        assert ("predictions" in r) != ("error" in r)
    assert "empty file" in failed[str(d / "j_empty.jpg")]
    assert "too large (100000x100000" in failed[str(d / "m_bomb.png")]
    assert "is a directory" in failed[str(d / "n_dir.jpg")]
    err_lines = [ln for ln in err.splitlines() if ln.startswith("probres-infer: ") and "classified" not in ln]
    assert len(err_lines) == len(failed) and "Traceback" not in err
    assert all(any(p in ln for ln in err_lines) for p in failed)
    assert f"{len(good)} classified, {len(failed)} failed" in err


def test_exif_orientation_is_applied(tmp_path):
    rgb = smooth_image(40, 80)                      # h=40, w=80: rotated it is 80 x 40
    exif = tmp_path / "exif6.jpg"
    exif.write_bytes(jpeg_with_orientation(rgb, 6))
    assert decode_bgr(str(exif)).shape == (80, 40, 3)
    raw = cv2.imdecode(np.fromfile(exif, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw.shape == (40, 80, 3)
    rotated = tmp_path / "rotated.png"              # the same pixels turned 90 degrees clockwise, lossless
    cv2.imwrite(str(rotated), cv2.rotate(raw, cv2.ROTATE_90_CLOCKWISE))
    unrotated = tmp_path / "unrotated.png"
    cv2.imwrite(str(unrotated), raw)
    spec = PreprocessSpec(size=S)
    a, b, c = (np.empty((3, S, S), np.float32) for _ in range(3))
    load_source(str(exif), a, spec)
    load_source(str(rotated), b, spec)
    load_source(str(unrotated), c, spec)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.5                # the orientation matters for this image


def test_headers_report_true_sizes_and_bombs_are_refused_before_decoding(tmp_path):
    img = smooth_image(37, 53)[:, :, ::-1].copy()
    for ext in (".png", ".jpg", ".bmp", ".webp", ".tiff"):
        assert header_size(cv2.imencode(ext, img)[1].tobytes()) == (53, 37), ext
    assert header_size(jpeg_with_orientation(img, 6)) == (53, 37)          # EXIF APP1 before SOF
    assert header_size(b"GIF89a....") is None and header_size(b"") is None
    jpg = bytearray(cv2.imencode(".jpg", img)[1].tobytes())
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    bmp = bytearray(cv2.imencode(".bmp", img)[1].tobytes())
    bmp[18:26] = struct.pack("<ii", 50000, -50000)
    # A real bomb: 20000 x 20000 all-black 1-bit PNG, 30 KB on disk, 1.2 GB once decoded by OpenCV.
    row = b"\0" + b"\0" * (20000 // 8)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa
    real = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * 20000, 9)) + chunk(b"IEND", b"")
    assert len(real) < 100_000
    for name, data in (("j.jpg", jpg), ("b.bmp", bmp), ("bomb.png", png_header(100000, 100000)), ("real.png", real)):
        (tmp_path / name).write_bytes(bytes(data))
        with pytest.raises(ImageDecodeError, match="too large .*claimed by its header"):
            load_source(str(tmp_path / name), np.empty((3, S, S), np.float32), PreprocessSpec(size=S))
    check_header(cv2.imencode(".png", img)[1].tobytes(), "ok.png")          # a normal image passes


def test_walk_order_and_extensions(tmp_path):
    for name in ("b/2.png", "b/1.JPG", "a.webp", "c.txt", "b/z/0.tif", "d.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    got = [os.path.relpath(p, tmp_path) for p in iter_image_paths([str(tmp_path)])]
    assert got == ["a.webp", "b/1.JPG", "b/2.png", "b/z/0.tif", "d.jpeg"]


# ------------------------------------------------------------------------------------ usage / model errors

def test_usage_and_model_errors_exit_2_with_one_line(model, tmp_path, toy_root, capsys):
    img = str(sorted((toy_root / "val2014").glob("*.jpg"))[0])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    (tmp_path / "empty").mkdir()
    cases = [(["--engine", tmp_path / "nope.onnx", img], "no such model file"),
             (["--engine", tmp_path / "model.h5", img], "unknown model type"),
             (["--engine", corrupt, img], "not a loadable ONNX model"),
             (["--engine", model[0], tmp_path / "empty"], "no images found")]
    for args, msg in cases:
        rc, out, err = run(args, capsys)
        assert rc == 2 and out == "" and msg in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for bad in (["--top-k", "0"], ["--threshold", "1.5"], ["--batch-size", "-3"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as e:
            main(["--engine", str(model[0]), img, *bad])
        assert e.value.code == 2
        capsys.readouterr()


def test_contract_thresholds_decide_and_each_record_says_which_applied(model, toy_root, tmp_path, capsys):
    import onnx

    path, contract, w, b = model
    images = sorted((toy_root / "val2014").glob("*.jpg"))[:6]
    p = expected_probs(images, contract.preprocess, w, b)
    thr = np.clip(np.median(p, axis=0), 0.01, 0.99)            # per label: about half the images pass
    m = onnx.load(str(path))
    for prop in m.metadata_props:
        if prop.key == "probres.contract":
            prop.value = contract.with_thresholds(thr.tolist()).to_json()
    with_thr = tmp_path / "thr.onnx"
    onnx.save(m, str(with_thr))
    rc, out, _ = run(["--engine", with_thr, *images], capsys)
    assert rc == 0 and len(body(out)) == len(images)
    for line, row in zip(body(out), p):
        r = json.loads(line)
        assert r["threshold"] == "contract"
        want = [k for k in np.argsort(-row, kind="stable") if row[k] >= thr[k]]
        assert [x["label"] for x in r["predictions"]] == [contract.labels.names[k] for k in want]
        assert [x["threshold"] for x in r["predictions"]] == [round(float(thr[k]), 6) for k in want]
    # --top-k with a threshold: the K most probable of the labels that pass it.
    rc, out, _ = run(["--engine", with_thr, *images, "--top-k", "1", "--threshold", "contract"], capsys)
    assert rc == 0 and len(body(out)) == len(images)     # else the loops below check nothing
    for line, row in zip(body(out), p):
        want = [k for k in np.argsort(-row, kind="stable") if row[k] >= thr[k]][:1]
        assert [x["label"] for x in json.loads(line)["predictions"]] == [contract.labels.names[k] for k in want]
    rc, out, _ = run(["--engine", with_thr, *images, "--threshold", "0.3"], capsys)
    assert rc == 0 and len(body(out)) == len(images)
    for line, row in zip(body(out), p):
        r = json.loads(line)
        assert r["threshold"] == 0.3 and len(r["predictions"]) == int((row >= 0.3).sum())
    # A model without thresholds behaves as before: 0.5 for every label.
    rc, out, _ = run(["--engine", path, images[0]], capsys)
    r = json.loads(body(out)[0])
    assert r["threshold"] == 0.5 and len(r["predictions"]) == int((p[0] >= 0.5).sum())


def _undecodable_name_tree(toy_root: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """DIR with one image under a file name that is not UTF-8 (b'caf\\xe9.jpg') and the same bytes as plain.jpg."""
    src = sorted((toy_root / "val2014").iterdir())[0]
    d = tmp_path / "names"
    d.mkdir()
    odd = os.path.join(os.fsencode(d), b"caf\xe9.jpg")
    with open(odd, "wb") as f:
        f.write(src.read_bytes())
    (d / "plain.jpg").write_bytes(src.read_bytes())
    return d, os.fsdecode(odd), str(d / "plain.jpg")


def test_a_file_name_that_is_not_utf8_is_classified_and_recoverable_from_its_record(model, toy_root, tmp_path):
    """cv2.imread crashes the process on a str it cannot encode (os.fsdecode's surrogates); run in a subprocess.

    The record is plain UTF-8 JSON (no lone surrogate "\\udce9", which jq turns into U+FFFD): "image" is
    readable, "image_base64" the name's raw bytes, and --resume recognises the file from them."""
    d, odd, plain = _undecodable_name_tree(toy_root, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "runtime.infer", "--engine", str(model[0]), str(d), "--top-k", "all"],
                       capture_output=True, timeout=120, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    text = r.stdout.decode("utf-8")                          # strict: every byte is valid UTF-8
    assert "\\ud" not in text                                 # no escaped lone surrogate
    recs = {rec["image"]: rec for rec in map(json.loads, body(text))}
    assert set(recs) == {odd.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), plain}
    raw = [rec for rec in recs.values() if "image_base64" in rec]
    assert len(raw) == 1 and base64.b64decode(raw[0]["image_base64"]) == os.fsencode(odd)    # the exact name
    assert "image_base64" not in recs[plain]                 # only when the name is not UTF-8
    probs = lambda rec: sorted((p["label"], p["probability"]) for p in rec["predictions"])  # noqa: E731
    assert probs(raw[0]) == probs(recs[plain])
    out = tmp_path / "r.jsonl"                               # --resume finds both names already done
    out.write_bytes(r.stdout)
    r = subprocess.run([sys.executable, "-m", "runtime.infer", "--engine", str(model[0]), str(d), "--resume",
                        "--output", str(out), "--top-k", "all"], capture_output=True, timeout=120, env=env)
    assert r.returncode == 0 and b"(2 already in" in r.stderr and out.read_bytes().count(b"\n") == 3, r.stderr


def test_csv_and_table_write_a_non_utf8_file_name_escaped(model, toy_root, tmp_path, capsys):
    """Not a UnicodeEncodeError traceback that throws the whole output away: the name's bytes as \\xNN."""
    d, odd, plain = _undecodable_name_tree(toy_root, tmp_path)
    for fmt in ("csv", "table"):
        out = tmp_path / f"r.{fmt}"
        rc, _, err = run(["--engine", model[0], d, "--format", fmt, "--output", out], capsys)
        assert rc == 0 and "Traceback" not in err, err
        text = out.read_text(encoding="utf-8")
        assert "caf\\xe9.jpg" in text and plain in text
    rc, stdout, err = run(["--engine", model[0], d / "nowhere", odd, "--format", "csv"], capsys)
    assert rc == 1 and "caf\\xe9.jpg" in stdout and "Traceback" not in err, err     # error rows too


def test_an_unlistable_directory_gets_an_error_record_naming_it(model, toy_root, tmp_path, capsys, monkeypatch):
    """The record's "image" is the directory, not the walk's internal "DIR\\0reason" token."""
    d = tmp_path / "tree"
    (d / "locked").mkdir(parents=True)
    (d / "a.jpg").write_bytes(sorted((toy_root / "val2014").iterdir())[0].read_bytes())
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(d / "locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    rc, out, err = run(["--engine", model[0], d], capsys)
    recs = [json.loads(line) for line in body(out)]
    assert rc == 1 and [r["image"] for r in recs] == [str(d / "a.jpg"), str(d / "locked")], out
    assert "cannot list directory (Permission denied)" in recs[1]["error"]


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(model, toy_root, monkeypatch, capsys):
    import runtime.infer as infer

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(infer, "open_backend", interrupted)
    image = sorted((toy_root / "val2014").iterdir())[0]
    try:
        rc, out, err = run(["--engine", model[0], image], capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a traceback, exit 1)")
    assert rc == 130 and "interrupted while loading" in err and out == "", err
