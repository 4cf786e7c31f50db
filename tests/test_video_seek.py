"""--start seeks in video files instead of decoding from the first frame, and gives the same frames.

    .venv/bin/python -m pytest -q tests/test_video_seek.py

The reference is the same clip decoded from its first frame: probres-infer's records with
--start must equal its records without --start for the frames at or after that time (same
frame indices, times and probabilities), for MJPG .avi and mp4v .mp4. That a seek happened is
counted on the capture (grab() calls), and a capture that seeks to the wrong frame while
claiming the right one must fall back to decoding from the first frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.infer import main
from runtime.video_sources import Selector, iter_file_frames, open_capture
from test_video import model, opencv_frames, records, write_clip  # noqa: F401  (model: the fixture)

N = 60                                  # frames of each clip, at FPS (10/s): 6 s


def infer_records(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return list(records(capsys.readouterr().out.splitlines()))


class CountingCapture:
    """An OpenCV capture that counts grab() calls; with `lie`, a frame seek lands `lie` frames later
    while the capture still reports the frame asked for (what an inexact seek looks like)."""

    def __init__(self, path: str, lie: int = 0) -> None:
        self.cap, self.grabs, self.lie = open_capture(path), 0, lie
        self.asked: int | None = None

    def grab(self) -> bool:
        self.grabs += 1
        return self.cap.grab()

    def set(self, prop: int, value: float) -> bool:
        if prop == cv2.CAP_PROP_POS_FRAMES:
            self.asked = int(value)
            value += self.lie
        return self.cap.set(prop, value)

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_POS_FRAMES and self.asked is not None and self.lie:
            return float(self.asked)
        return self.cap.get(prop)

    def __getattr__(self, name: str):
        return getattr(self.cap, name)


@pytest.mark.parametrize("fourcc,ext", [("MJPG", "avi"), ("mp4v", "mp4")])
def test_start_records_equal_the_same_frames_decoded_from_the_first(model, tmp_path, capsys, fourcc, ext):  # noqa: F811
    clip = write_clip(tmp_path / f"clip.{ext}", N, fourcc, seed=5)
    whole = infer_records(capsys, "--engine", model, clip, "--top-k", "all")
    assert [r["frame"] for r in whole] == list(range(N))
    for start, end, every in ((3.05, None, 1), (2.0, 4.0, 4), (4.95, None, 1), (0.35, 1.0, 1)):
        flags = ["--start", start, "--every", every] + (["--end", end] if end else [])
        got = infer_records(capsys, "--engine", model, clip, "--top-k", "all", *flags)
        kept = [r for r in whole if r["time_s"] >= start - 1e-9 and (end is None or r["time_s"] < end)]
        assert got == kept[::every] and got, flags


@pytest.mark.parametrize("fourcc,ext", [("MJPG", "avi"), ("mp4v", "mp4")])
def test_start_seeks_instead_of_decoding_from_the_first_frame(tmp_path, fourcc, ext):
    clip = str(write_clip(tmp_path / f"clip.{ext}", N, fourcc, seed=6))
    ref = opencv_frames(clip)
    caps = []

    def opener(path: str, lie: int = 0) -> CountingCapture:
        caps.append(CountingCapture(path, lie))
        return caps[-1]

    frames = list(iter_file_frames(clip, Selector(start=4.0), opener))
    assert [f.index for f in frames] == list(range(40, N))
    assert all(np.array_equal(f.image, ref[f.index]) for f in frames)
    assert len(caps) == 1 and caps[0].grabs <= N - 40 + 3         # not the 40 frames before --start

    caps.clear()                                                  # a seek that lands 5 frames late, unreported
    frames = list(iter_file_frames(clip, Selector(start=4.0), lambda p: opener(p, lie=5 if not caps else 0)))
    assert [f.index for f in frames] == list(range(40, N))        # caught by the clock: decoded from frame 0
    assert all(np.array_equal(f.image, ref[f.index]) for f in frames)
    assert len(caps) == 2 and caps[1].grabs >= N
