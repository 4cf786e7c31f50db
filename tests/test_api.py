"""runtime.Classifier against probres-infer: every input kind gives the record probres-infer writes.

    .venv/bin/python -m pytest -q tests/test_api.py

The reference is probres-infer's own JSONL for the same image files (test_golden.py pins that
against main before the library existed): a path must give the identical line; bytes, arrays
(RGB, BGR, grayscale, RGBA) and PIL images the identical record but for the "image" key, and
raw probabilities within 1e-6 of the rounded ones. The memory test streams 10,000 paths
through predict_iter in a subprocess and checks both how far the input is read ahead of the
results and the growth of peak RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import runtime
from golden_cases import build
from runtime import Classifier, ProbresError
from runtime.errors import ImageError, ModelError, UsageError
from runtime.infer import main as infer_main
from runtime.provenance import parse_header


@pytest.fixture(scope="module")
def work(tmp_path_factory, toy_root):
    """The golden model (contract thresholds) and images, plus a grayscale and an RGBA PNG of the first."""
    d = tmp_path_factory.mktemp("api")
    paths = build(d, toy_root)
    first = sorted(paths["images"].glob("COCO_*.jpg"))[0]
    bgr = cv2.imread(str(first))
    extra = d / "extra"
    extra.mkdir()
    cv2.imwrite(str(extra / "gray.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = np.arange(bgr.shape[1], dtype=np.uint8)[None, :]        # a real alpha channel (dropped)
    cv2.imwrite(str(extra / "rgba.png"), bgra)
    cv2.imwrite(str(extra / "color.png"), bgr)
    return paths


def infer_records(capsys, *args) -> list[dict]:
    capsys.readouterr()
    infer_main([str(a) for a in args])
    return [json.loads(line) for line in record_lines(capsys.readouterr().out)]


def record_lines(text: str) -> list[str]:
    """probres-infer's JSONL lines, its provenance header (runtime.provenance) dropped."""
    return [line for line in text.splitlines() if parse_header(line) is None]


def same_record(pred, ref: dict) -> None:
    """pred's record equals probres-infer's but for the image name; its raw probabilities agree to 1e-6."""
    got = pred.to_dict()
    assert {**got, "image": None} == {**ref, "image": None}
    names = list(pred._label_set.names)
    for p in ref["predictions"]:
        assert abs(pred.probabilities[names.index(p["label"])] - p["probability"]) <= 1e-6


def test_paths_and_directories_give_probres_infers_lines(work, capsys):
    model, images = work["model"], work["images"]
    capsys.readouterr()
    infer_main(["--engine", str(model), str(images), "--batch-size", "3"])
    ref_lines = record_lines(capsys.readouterr().out)
    with Classifier.open(model) as clf:
        preds = clf.predict(str(images), batch_size=5)
        assert [p.to_json() for p in preds] == ref_lines                # byte for byte, the error record too
        files = sorted(images.iterdir())
        single = [clf.predict(f)[0] for f in files[:2]]               # one PathLike at a time
        assert [p.to_json() for p in single] == ref_lines[:2]
        # A directory expands in place, between the inputs around it.
        mixed = clf.predict([files[3], images, str(files[0])], batch_size=4)
        assert [p.source for p in mixed] == [str(files[3]), *map(str, files), str(files[0])]
    ok = [p for p in preds if p.ok]
    assert len(ok) == 8 and preds[-1].error and preds[-1].probabilities is None
    for p in ok:
        assert p.probabilities.dtype == np.float32 and p.probabilities.shape == (len(clf.labels),)
        assert p.labels == sorted(p.labels, key=lambda n: -p.scores[n])
        thr = dict(zip(clf.labels, p.thresholds))
        assert all(p.scores[n] >= thr[n] for n in p.labels)
        assert all(p.probabilities[i] < thr[n] for i, n in enumerate(clf.labels) if n not in p.labels)


def test_bytes_arrays_and_pil_images_give_the_same_records(work, capsys):
    model, extra = work["model"], work["images"].parent / "extra"
    files = sorted(work["images"].glob("COCO_*.jpg"))[:4]
    refs = infer_records(capsys, "--engine", model, *files)
    ref_png = {r["image"]: r for r in infer_records(capsys, "--engine", model, *sorted(extra.iterdir()))}
    bgr = [cv2.imread(str(f)) for f in files]
    with Classifier.open(model) as clf:
        as_bytes = clf.predict([f.read_bytes() for f in files])
        as_rgb = clf.predict([cv2.cvtColor(b, cv2.COLOR_BGR2RGB) for b in bgr], batch_size=3)
        as_bgr = clf.predict(bgr, color="bgr")
        as_stack = clf.predict(np.stack([cv2.cvtColor(bgr[0], cv2.COLOR_BGR2RGB)] * 3))    # N x H x W x 3
        one = clf.predict(memoryview(files[0].read_bytes()))
        gray = clf.predict(cv2.imread(str(extra / "gray.png"), cv2.IMREAD_GRAYSCALE))
        gray1 = clf.predict(cv2.imread(str(extra / "gray.png"), cv2.IMREAD_GRAYSCALE)[..., None])
        rgba = cv2.cvtColor(cv2.imread(str(extra / "rgba.png"), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
        four = clf.predict(rgba)
        from PIL import Image
        pil = clf.predict([Image.open(extra / "color.png"), Image.open(extra / "rgba.png")])
    for got in (as_bytes, as_rgb, as_bgr):
        assert len(got) == len(refs)
        for p, r in zip(got, refs):
            same_record(p, r)
    assert len(as_stack) == 3
    for p in as_stack:
        same_record(p, refs[0])
    assert [p.source for p in as_bytes] == [f"<bytes #{i}>" for i in range(4)]
    assert as_rgb[0].source == "<array #0>" and pil[1].source == "<image #1>"
    same_record(one[0], refs[0])
    same_record(gray[0], ref_png[str(extra / "gray.png")])
    same_record(gray1[0], ref_png[str(extra / "gray.png")])
    same_record(four[0], ref_png[str(extra / "rgba.png")])
    same_record(pil[0], ref_png[str(extra / "color.png")])
    same_record(pil[1], ref_png[str(extra / "rgba.png")])
    # The PNG of the first JPEG's pixels: the same probabilities as the JPEG (no decoder difference).
    assert ref_png[str(extra / "color.png")]["predictions"] == refs[0]["predictions"]


@pytest.mark.parametrize("flags,kwargs", [(["--top-k", "3"], {"top_k": 3}), (["--threshold", "0.3"], {"threshold": 0.3}),
                                          (["--top-k", "2", "--threshold", "contract"], {"top_k": 2, "threshold": "contract"}),
                                          (["--top-k", "all"], {"top_k": "all"})])
def test_the_decision_is_probres_infers(work, capsys, flags, kwargs):
    files = sorted(work["images"].glob("COCO_*.jpg"))
    refs = infer_records(capsys, "--engine", work["model"], *files, *flags)
    with Classifier.open(work["model"]) as clf:
        got = clf.predict([f.read_bytes() for f in files], **kwargs)
    for p, r in zip(got, refs):
        same_record(p, r)


def test_classifier_attributes_come_from_the_contract(work):
    from runtime.backends import open_backend
    be = open_backend(work["model"])
    c = be.contract
    with Classifier.open(work["model"], threads=1) as clf:
        assert clf.labels == list(c.labels.names) and clf.category_ids == list(c.labels.category_ids)
        assert clf.contract == c and np.array_equal(clf.thresholds, c.thresholds)
        assert clf.describe() == be.describe() and "onnxruntime" in clf.describe()
    with Classifier.open(work["model"], threshold=0.25) as clf:
        assert np.array_equal(clf.thresholds, np.full(len(c.labels.names), 0.25))
        p = clf.predict(work["images"] / sorted(p.name for p in work["images"].iterdir())[0])[0]
        assert p.decided_by == 0.25 and p.labels == [n for n in p.labels if p.scores[n] >= 0.25]
    be.close()


def test_a_bad_input_in_a_list_gets_its_error_and_the_others_go_on(work, tmp_path):
    files = sorted(work["images"].glob("COCO_*.jpg"))[:2]
    good = [f.read_bytes() for f in files]
    items = [good[0], b"junk", np.zeros((4, 4), np.float32), object(), str(tmp_path / "missing.jpg"),
             np.zeros((0, 5, 3), np.uint8), b"", good[1]]
    with Classifier.open(work["model"]) as clf:
        got = clf.predict(items, batch_size=3)
        alone = [clf.predict(g)[0] for g in good]
        assert [p.ok for p in got] == [True] + [False] * 6 + [True]
        assert got[1].error.startswith("<bytes #1>: ") and "decodable" in got[1].error
        assert got[2].error.startswith("<array #2>: expected a uint8 array") and "float32" in got[2].error
        assert got[3].error.startswith("input #3: cannot classify a object")
        assert got[4].error.startswith(str(tmp_path / "missing.jpg"))
        assert got[5].error.startswith("<array #5>") and got[6].error.startswith("<bytes #6>: empty")
        for p in got:
            assert p.error is None or "\n" not in p.error
        for p, a in ((got[0], alone[0]), (got[7], alone[1])):
            assert p.to_dict() == {**a.to_dict(), "image": p.source}
            assert np.array_equal(p.probabilities, a.probabilities)
        with pytest.raises(ProbresError, match=r"^<bytes #1>: ") as e:
            clf.predict(items, raise_errors=True)
        assert isinstance(e.value, ImageError)
        with pytest.raises(UsageError, match="batch_size"):
            clf.predict(good, batch_size=0)
        with pytest.raises(UsageError, match="top_k"):
            clf.predict(good, top_k=0)


def test_model_errors_are_probres_errors_naming_the_file(tmp_path):
    with pytest.raises(ModelError, match="missing.onnx"):
        Classifier.open(tmp_path / "missing.onnx")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ProbresError, match="m.txt"):
        Classifier.open(tmp_path / "m.txt")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="bad.onnx"):
        Classifier.open(tmp_path / "bad.onnx")
    with pytest.raises(UsageError, match="threshold"):
        Classifier.open(tmp_path / "bad.onnx", threshold=2)


def test_import_runtime_loads_no_engine_or_opencv():
    code = ("import sys, runtime; bad = [m for m in ('cv2', 'onnxruntime', 'torch', 'runtime.api') if m in sys.modules]; "
            "print(bad); assert not bad; assert runtime.Classifier.__module__ == 'runtime.api'; "
            "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert issubclass(runtime.UsageError, ProbresError)


STREAM = """
import resource, sys
from runtime import Classifier
from runtime.chunks import READ_AHEAD
from runtime.pipeline import IN_FLIGHT
model, paths, n, batch = sys.argv[1], sys.argv[2:18], int(sys.argv[18]), 32
pulled = 0
def source(count):
    global pulled
    for i in range(count):
        pulled += 1
        yield paths[i % len(paths)]
with Classifier.open(model, threads=2) as clf:
    for _ in clf.predict_iter(source(500), batch_size=batch):
        pass
    rss_500 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pulled, seen, lead = 0, 0, 0
    for p in clf.predict_iter(source(n), batch_size=batch):
        assert p.ok, p.error
        seen += 1
        lead = max(lead, pulled - seen)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seen, lead, batch * (READ_AHEAD + IN_FLIGHT + 6), rss_500, rss)
"""


def test_predict_iter_streams_10000_paths_in_bounded_memory(tmp_path):
    from test_pipeline_memory import tiny_onnx, write_images

    model = tiny_onnx(tmp_path / "tiny.onnx")                       # 64 px: 10,000 images' pixels = 491 MB
    paths = write_images(tmp_path / "imgs", 16, size=64)
    r = subprocess.run([sys.executable, "-c", STREAM, str(model), *paths, "10000"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    seen, lead, bound, rss_500, rss = map(int, r.stdout.split())
    print(f"10,000 paths: read at most {lead} ahead (bound {bound}); peak RSS {rss_500 / 1024:.0f} MiB after 500, "
          f"{rss / 1024:.0f} MiB after 10,000")
    assert seen == 10000
    assert lead <= bound                       # the input is read a few batches ahead, never listed whole
    assert rss - rss_500 < 48 * 1024           # KiB; keeping the pixels would add ~490 MB, the predictions ~10 MB


def test_api_speed_benchmark_runs(work, tmp_path):
    from benchmarks.api_speed import main as bench
    out = tmp_path / "speed.json"
    assert bench(["--engine", str(work["model"]), "--count", "16", "--rounds", "1", "--threads", "2",
                  "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["count"] == 16 and rep["ratio"] > 0 and len(rep["classifier_img_s"]) == 1


def test_the_readme_example_prints_probres_infers_labels_and_probabilities(work, toy_root, tmp_path, capsys):
    import ast
    import os
    import re
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5
    demo = tmp_path / "demo_out"                        # what make demo leaves, with the tiny model
    demo.mkdir()
    (demo / "model.onnx").symlink_to(work["model"])
    (demo / "toy_coco").symlink_to(toy_root)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    first = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    ref = infer_records(capsys, "--engine", work["model"], first)[0]
    want = {p["label"]: p["probability"] for p in ref["predictions"]}
    assert len(lines) == 3 and want
    for line, source in zip(lines, ["demo_out/toy_coco/val2014/" + first.name, "<array #1>", "<bytes #2>"]):
        name, _, scores = line.partition(" {")
        scores = ast.literal_eval("{" + scores)
        assert name == source and list(scores) == list(want)
        assert max(abs(scores[k] - want[k]) for k in want) <= 1e-6


def test_every_error_probres_reports_is_a_probres_error_of_its_kind():
    from runtime.backends import BackendError
    from runtime.checkpoint import CheckpointError
    from runtime.coco import CocoDataError
    from runtime.contract import ContractError
    from runtime.inputs import InputError
    from runtime.onnx_meta import OnnxMetaError
    from runtime.outputs import OutputError
    from runtime.preprocess import ImageDecodeError
    from runtime.trt_manifest import ManifestError, ManifestMismatch
    kinds = {UsageError: (InputError, OutputError, CocoDataError), ImageError: (ImageDecodeError,),
             ModelError: (BackendError, CheckpointError, ContractError, OnnxMetaError, ManifestError, ManifestMismatch)}
    for kind, classes in kinds.items():
        for cls in classes:
            assert issubclass(cls, kind) and issubclass(cls, ProbresError), cls
    # What callers caught before still catches them.
    assert issubclass(ImageDecodeError, ValueError) and issubclass(BackendError, RuntimeError)
    assert issubclass(ContractError, ValueError) and issubclass(CheckpointError, ValueError)
