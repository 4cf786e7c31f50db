"""Video sources for probres-infer: files frame by frame, and live cameras/streams where the newest frame wins.

    python -c "from runtime.video_sources import iter_file_frames, Selector; \
print([f.index for f in iter_file_frames('clip.mp4', Selector(every=10))])"

Files (whatever OpenCV's FFmpeg backend reads) give every selected frame, in order (`Selector`:
--every N, or --fps F by timestamp, within [--start, --end) seconds). --start seeks to just
before it (checked against the stream's clock; an inexact seek falls back to decoding from the
first frame); from there frames are decoded in order (grab() skips the pixels of unselected
ones), so `frame` is the frame's index in the file and `time_s` its presentation time
(CAP_PROP_POS_MSEC).
Live sources (a camera index, /dev/videoN, rtsp/rtmp/http(s)/udp URLs, a GStreamer pipeline)
are read by their own thread (`LiveSource`), which keeps only the newest frame: the consumer
never works through a stale backlog, and each frame replaced before it was taken counts as
skipped. A source that fails or ends is reopened with exponential backoff up to `reconnect`
times in a row (a frame read resets the count); then the source ends with a reason.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import cv2
import numpy as np

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                              ".m2ts", ".wmv", ".flv", ".3gp", ".ogv"})
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "udp://", "tcp://", "srt://")
BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
OPEN_TIMEOUT_S, STALL_S = 10.0, 10.0    # a network source that sends nothing this long has dropped


class VideoError(ValueError):
    """A video or stream that cannot be read: one line naming it (it becomes that source's error record)."""


@dataclass
class Frame:
    """One decoded frame: where it came from, its index and time in the source, when it was captured."""

    source: str
    index: int
    time_s: float
    image: np.ndarray | None       # BGR uint8 (H, W, 3); dropped once preprocessed
    captured: float                # time.perf_counter() when decoded (live latency is measured from it)


def describe_error(e: BaseException) -> str:
    """An exception in one line: its class and the last line of its message (OpenCV's are multi-line)."""
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[-1] if lines else 'failed'}"


def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def is_gstreamer(text: str) -> bool:
    """A GStreamer pipeline ("v4l2src ! videoconvert ! appsink"): elements joined by '!', not a file."""
    return " ! " in text and not os.path.exists(text)


def is_live(text: str) -> bool:
    """A camera device, a network stream or a GStreamer pipeline (read with the latest-frame-wins policy)."""
    return is_url(text) or is_gstreamer(text) or re.fullmatch(r"/dev/video\d+", text) is not None


def open_capture(source: str | int) -> cv2.VideoCapture:
    """cv2.VideoCapture with the backend each kind needs: GStreamer for a pipeline string, the
    platform's camera API for an index or /dev/videoN, FFmpeg for files and URLs (a URL that sends
    nothing for STALL_S seconds reads as ended, so LiveSource reconnects instead of waiting for ever)."""
    if isinstance(source, int):
        return cv2.VideoCapture(source)
    if is_gstreamer(source):
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER)
    if source.startswith("/dev/video"):
        return cv2.VideoCapture(source)
    # OpenCV's own warning on a file FFmpeg cannot open repeats what our error record says (FFmpeg's
    # line about the file, which says why, still shows).
    log = cv2.utils.logging
    level = log.getLogLevel()
    log.setLogLevel(min(level, log.LOG_LEVEL_ERROR))
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(OPEN_TIMEOUT_S * 1000),
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(STALL_S * 1000)] if is_url(source) else []
    try:
        return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
    finally:
        log.setLogLevel(level)


class Selector:
    """Which frames to classify: every `every`-th from the first at or after `start`, or with `fps`, the
    first frame at or after each tick start + k/fps; nothing at or after `end` (seconds)."""

    def __init__(self, every: int = 1, fps: float | None = None, start: float = 0.0, end: float | None = None):
        if every < 1 or (fps is not None and fps <= 0) or start < 0 or (end is not None and end <= start):
            raise ValueError("every >= 1, fps > 0, 0 <= start < end")
        self.every, self.fps, self.start, self.end = every, fps, start, end
        self._first: int | None = None
        self._tick = start

    def done(self, time_s: float) -> bool:
        """True from the first frame at or after `end` (files are in time order: stop decoding)."""
        return self.end is not None and time_s >= self.end

    def __call__(self, index: int, time_s: float) -> bool:
        if time_s < self.start:
            return False
        if self._first is None:
            self._first = index
        if self.fps is None:
            return (index - self._first) % self.every == 0
        if time_s < self._tick - 1e-6:          # timestamps are rounded to the stream's time base
            return False
        while self._tick <= time_s + 1e-6:
            self._tick += 1.0 / self.fps
        return True


def iter_file_frames(path: str, select: Selector | None = None,
                     opener: Callable[[str], cv2.VideoCapture] = open_capture) -> Iterator[Frame]:
    """The selected frames of a video file, in order; VideoError (after the frames that did decode) when
    it cannot be opened, has no frame, or ends more than one frame before its container's frame count.
    With select.start, the file is first seeked to just before it (`_seek`)."""
    select = select or Selector()
    if not os.path.isfile(path):
        raise VideoError(f"{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    cap = opener(path)
    try:
        if not cap.isOpened():
            raise VideoError(f"{path}: cannot open as a video (corrupt, truncated, or a format OpenCV's "
                             f"FFmpeg backend does not read)")
        fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
        index = _seek(cap, select.start, fps, count)
        if index is None:                         # the seek missed: decode from the first frame instead
            cap.release()
            cap, index = opener(path), 0
        while cap.grab():
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            t = ms / 1000.0 if ms > 0 or index == 0 or not fps > 0 else index / fps
            if select.done(t):
                return
            if select(index, t):
                ok, img = cap.retrieve()
                if not ok or img is None:
                    raise VideoError(f"{path}: frame {index} cannot be decoded")
                yield Frame(path, index, t, img, time.perf_counter())
            index += 1
        if index == 0:
            raise VideoError(f"{path}: no frame could be decoded")
        if count > 0 and index + 1 < count:
            raise VideoError(f"{path}: truncated or corrupt: decoding stopped at frame {index} of {count:.0f}")
    finally:
        cap.release()


def _seek(cap: cv2.VideoCapture, start: float, fps: float, count: float) -> int | None:
    """Seek `cap` to two frames before `start` seconds and grab that frame (the Selector drops what is
    before `start`); return the index of the frame the next grab() gives: 0 when no seek is needed,
    None when the seek missed.

    The seek is checked against the stream's own clock: the frame it lands on must carry the time its
    index says (within half a frame), else the seek was inexact for this codec or file and the caller
    decodes from the first frame (the same frames, only slower). MJPG .avi and mp4v .mp4 seek exactly
    with OpenCV's FFmpeg backend (tests/test_video_seek.py)."""
    target = int(start * fps) - 2 if fps > 0 else 0
    if target <= 0 or not target < count - 1:
        return 0
    if not cap.set(cv2.CAP_PROP_POS_FRAMES, target) or int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != target:
        return None
    if not cap.grab() or abs(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 - target / fps) > 0.5 / fps:
        return None
    return target + 1


class LiveSource:
    """A camera or stream read by a background thread that keeps only the newest frame.

    take() returns the newest frame not yet taken (waiting for one), or None once the source
    has ended (`end_reason` says why). `skipped` counts frames replaced before anyone took them;
    `latest` is the index of the newest frame read. Use as a context manager (stops the thread).
    """

    def __init__(self, source: str | int, name: str | None = None, every: int = 1, reconnect: int = 0,
                 backoff_s: float = BACKOFF_S, opener: Callable[[str | int], cv2.VideoCapture] = open_capture):
        self.source, self.name = source, name or str(source)
        self.every, self.reconnect, self.backoff_s, self._open = every, reconnect, backoff_s, opener
        self.latest, self.read, self.skipped, self.reconnects = -1, 0, 0, 0
        self.end_reason: str | None = None
        self._slot: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._t0: float | None = None
        self._thread = threading.Thread(target=self._run, name="probres-capture", daemon=True)

    def __enter__(self) -> "LiveSource":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the capture thread (it notices within one frame read or one backoff wait)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _publish(self, img: np.ndarray) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        with self._cond:
            self.latest = self.read
            if self.read % self.every == 0:
                if self._slot is not None:
                    self.skipped += 1        # never taken: the consumer was busy with an older frame
                self._slot = Frame(self.name, self.read, now - self._t0, img, now)
                self._cond.notify_all()
            self.read += 1

    def _run(self) -> None:
        failures, why = 0, "ended"
        try:
            while not self._stop.is_set():
                cap = self._open(self.source)
                try:
                    if cap.isOpened():
                        while not self._stop.is_set():
                            ok, img = cap.read()
                            if not ok or img is None:
                                why = "the stream ended or dropped its connection"
                                break
                            failures = 0
                            self._publish(img)
                    else:
                        why = "cannot open it"
                finally:
                    cap.release()
                if self._stop.is_set():
                    why = "stopped"
                    break
                if failures >= self.reconnect:
                    if self.reconnect:
                        why += f"; gave up after {failures} failed reconnect{'s' * (failures > 1)} in a row " \
                               f"(--reconnect {self.reconnect})"
                    break
                failures += 1
                self.reconnects += 1
                self._stop.wait(min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))
        except Exception as e:                        # an OpenCV error: still this source's end, worded
            why = describe_error(e)
        with self._cond:
            self.end_reason = why
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> Frame | None:
        """The newest untaken frame (blocking), or None when the source has ended (or after `timeout` s)."""
        with self._cond:
            self._cond.wait_for(lambda: self._slot is not None or self.end_reason is not None, timeout)
            frame, self._slot = self._slot, None
            return frame
