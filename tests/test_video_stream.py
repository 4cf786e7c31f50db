"""Classifier.stream against probres-infer's video route: the same records, frame for frame.

    .venv/bin/python -m pytest -q tests/test_video_stream.py

The reference is probres-infer's JSONL for the same generated clip and selection (its
provenance header dropped): every stream() Prediction's to_json() must be the identical line,
and its raw probabilities within 1e-6 of test_video's own decode-and-classify of that frame
(OpenCV's frames, preprocessed and run with onnxruntime here). Clips are 64x48 MJPG .avi and
mp4v .mp4 (cv2.VideoWriter); the live case reads test_video's loopback MJPEG camera.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime import Classifier
from runtime.errors import ImageError, UsageError
from runtime.infer import main as infer_main
from runtime.provenance import parse_header
from runtime.video_frames import LiveStats
from test_video import CONTRACT, MJPEGCamera, level_of, opencv_frames, reference_probs, write_clip
from test_infer import tiny_onnx


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    tiny_onnx(path, CONTRACT, seed=3)
    return path


def infer_lines(capsys, *args) -> list[str]:
    """probres-infer's output lines past the provenance header."""
    capsys.readouterr()
    infer_main([str(a) for a in args])
    return [line for line in capsys.readouterr().out.splitlines() if parse_header(line) is None]


CASES = [                                 # (stream keywords, the same as probres-infer flags)
    ({"every": 3}, ["--every", 3]),
    ({"fps": 4, "start": 0.55, "top_k": "all"}, ["--fps", 4, "--start", 0.55, "--top-k", "all"]),
    ({"start": 1.0, "end": 2.0, "threshold": 0.3}, ["--start", 1.0, "--end", 2.0, "--threshold", 0.3]),
    ({"smooth": 3, "top_k": 2, "threshold": "contract"}, ["--smooth", 3, "--top-k", 2, "--threshold", "contract"]),
]


@pytest.mark.parametrize("fourcc,ext", [("MJPG", "avi"), ("mp4v", "mp4")])
def test_stream_records_are_probres_infers_video_records(model, tmp_path, capsys, fourcc, ext):
    clip = write_clip(tmp_path / f"clip.{ext}", 30, fourcc)
    ref = reference_probs(model, opencv_frames(clip))
    with Classifier.open(model, device="cpu") as clf:
        for kw, flags in CASES:
            want = infer_lines(capsys, "--engine", model, clip, *flags, "--batch-size", 4)
            preds = list(clf.stream(clip, batch_size=5, **kw))          # another batch size: the same records
            assert [p.to_json() for p in preds] == want, kw
            assert len(preds) >= 4 and all(p.ok and p.source == str(clip) for p in preds)
            if "smooth" not in kw:                                      # raw, unrounded: the frame's own pixels
                assert max(np.abs(p.probabilities - ref[p.frame]).max() for p in preds) <= 1e-6
            assert [p.time_s for p in preds] == pytest.approx([p.frame / 10.0 for p in preds], abs=1e-6)


def test_a_broken_video_ends_with_probres_infers_error_record(model, tmp_path, capsys):
    whole = write_clip(tmp_path / "whole.avi", 25, "MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) * 7 // 10])   # frames, then the error
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"not a video at all" * 50)
    with Classifier.open(model, device="cpu") as clf:
        for bad in (cut, junk):
            want = infer_lines(capsys, "--engine", model, bad, "--every", 2)
            preds = list(clf.stream(bad, every=2))
            assert [p.to_json() for p in preds] == want
            assert not preds[-1].ok and preds[-1].frame is None and str(bad) in preds[-1].error
            assert all(p.ok for p in preds[:-1])
            with pytest.raises(ImageError, match=str(bad)):
                list(clf.stream(bad, every=2, raise_errors=True))
        for kw in ({"every": 0}, {"fps": -1}, {"start": 2, "end": 1}, {"smooth": 0.5}, {"batch_size": 0}):
            with pytest.raises(UsageError):
                next(clf.stream(whole, **kw))


def test_stream_on_a_live_camera_yields_its_frames_and_counts(model):
    cam = MJPEGCamera(per_connection=15, interval_s=0.02, connections=1)
    try:
        stats = LiveStats()
        with Classifier.open(model, device="cpu") as clf:
            preds = list(clf.stream(cam.url, reconnect=0, top_k="all", stats=stats))
    finally:
        cam.close()
    frames = [p.frame for p in preds]
    assert preds and all(p.ok for p in preds) and frames == sorted(set(frames)) and frames[-1] < 15
    assert all(level_of(p.probabilities, model) == p.frame for p in preds)      # each is the frame it names
    assert stats.end_reason and 0 < stats.read <= 15
    assert stats.skipped == stats.read - len(preds)          # every frame read was classified or counted skipped


def test_breaking_out_of_a_live_stream_stops_its_capture(model):
    cam = MJPEGCamera(per_connection=None, interval_s=0.02)          # never ends by itself
    try:
        with Classifier.open(model, device="cpu") as clf:
            for i, p in enumerate(clf.stream(cam.url)):
                if i == 2:
                    break
            deadline = time.monotonic() + 15
            while any(t.name == "probres-capture" for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(t.name == "probres-capture" for t in threading.enumerate())
    finally:
        cam.close()
