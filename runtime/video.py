"""Classify video files, cameras and network streams frame by frame: probres-infer's video route.

    probres-infer --engine model.onnx clip.mp4 --every 10
    probres-infer --engine model.onnx --camera 0 --smooth 5 --format table
    probres-infer --engine model.onnx rtsp://192.168.1.10/stream --reconnect 5 -o live.jsonl

Frames go through the image path's preprocessing (runtime.preprocess.preprocess_array_into on
the decoded BGR array, straight into the backend's own buffers), so a frame's probabilities are
those of the same pixels classified as an image. Two policies (runtime.video_sources):
files give every selected frame in order, in batches, decode (one thread) overlapping
preprocessing (a pool) and inference (batch k+1 submitted before k is waited for); live
sources give the newest frame, one at a time, so a record is about one decode plus one
inference behind the camera. Memory is fixed by --batch-size x 4 buffers, whatever the length.
Records carry "frame" and "time_s"; --smooth K reports an exponential moving average of each
label's probability over about K frames (alpha 2/(K+1)), and decides on it.
probres-infer sends a run here when it names a video, a stream or --camera, sets a video flag,
or names a directory holding a video (found by extension); images in the run are classified
as usual, in order with the videos.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from runtime.backends import BackendError, backend_options, open_backend
from runtime.inputs import InputError, peek
from runtime.outputs import OutputError, ResultFile, check_outputs, model_inputs
from runtime.pipeline import classify, is_image_name, iter_image_paths
from runtime.preprocess import STREAM_BYTES, preprocess_array_into
from runtime.report import Writer
from runtime.video_sources import (Frame, LiveSource, Selector, VideoError, is_live, is_video_name,
                                   iter_file_frames)

if TYPE_CHECKING:
    from runtime.backends.base import Backend

FIELDS = ("frame", "time_s")
BUFFERS = 4                    # one filling, one ready, two with the engine (submit k+1 before wait k)
_END = object()


def is_media_name(name: str) -> bool:
    return is_image_name(name) or is_video_name(name)


# ---------------------------------------------------------------------------------------------- smoothing

class Smoother:
    """Exponential moving average of each label's probability over about `k` frames (alpha = 2 / (k + 1))."""

    def __init__(self, k: float) -> None:
        if k < 1:
            raise ValueError("--smooth K needs K >= 1")
        self.alpha, self.state = 2.0 / (k + 1.0), None

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        """(C,) probabilities of the next frame -> (C,) smoothed, float32."""
        p = np.asarray(probs, dtype=np.float64)
        self.state = p.copy() if self.state is None else self.state + self.alpha * (p - self.state)
        return self.state.astype(np.float32)


# ---------------------------------------------------------------------------------------------- classifying frames

@dataclass
class LiveStats:
    """What a live source did: frames read, skipped (replaced before inference took them), reconnects, why it ended."""

    read: int = 0
    skipped: int = 0
    reconnects: int = 0
    end_reason: str | None = None


class FrameClassifier:
    """Classifies frames (and images) with one backend, in input buffers (the backend's own) allocated
    once per run and reused by every source, so memory does not grow with the number of sources."""

    def __init__(self, backend: "Backend", batch_size: int = 16, threads: int = 2) -> None:
        self.backend, self.batch_size, self.spec = backend, batch_size, backend.contract.preprocess
        self._bufs: list[np.ndarray] = []
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probres-frames")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def buffers(self, count: int) -> list[np.ndarray]:
        """The first `count` (batch_size, 3, S, S) input buffers, allocated on first need."""
        if len(self._bufs) < count:
            self._bufs += self.backend.allocate_inputs(self.batch_size, count - len(self._bufs))
        return self._bufs[:count]

    def allocate(self, rows: int, count: int) -> list[np.ndarray]:
        """runtime.pipeline's allocate(rows, count) for images, as views of the same buffers."""
        return [b[:rows] for b in self.buffers(count)]

    def images(self, paths: Iterable[str], threads: int) -> Iterator:
        """runtime.pipeline.classify over image paths, in these buffers."""
        return classify(self.backend, paths, self.batch_size, threads, allocate=self.allocate)

    def files(self, frames: Iterable[Frame]) -> Iterator[tuple[list[Frame], np.ndarray]]:
        """(frames, probs (n, C)) batches, every frame in order; the frames' error (VideoError...) is raised
        after the batches decoded before it."""
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        free: queue.Queue = queue.Queue()
        for b in self.buffers(BUFFERS):
            free.put(b)

        def take_buffer() -> np.ndarray | None:
            while not stop.is_set():
                try:
                    return free.get(timeout=0.1)
                except queue.Empty:
                    continue
            return None

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    continue

        def produce() -> None:
            batch: list[Frame] = []
            futs: list = []
            buf = None

            def finish() -> None:
                nonlocal batch, futs, buf
                for f in futs:
                    f.result()
                for f in batch:
                    f.image = None                  # its pixels are in buf now
                put((batch, buf))
                batch, futs, buf = [], [], None

            try:
                try:
                    for fr in frames:
                        if buf is None and (buf := take_buffer()) is None:
                            return
                        stream = buf.nbytes >= STREAM_BYTES
                        futs.append(self._pool.submit(preprocess_array_into, fr.image, buf[len(batch)], self.spec,
                                                      stream))
                        batch.append(fr)
                        if len(batch) == self.batch_size:
                            finish()
                        if stop.is_set():
                            return
                except BaseException as e:
                    if batch:
                        finish()
                    put(e)
                    return
                if batch:
                    finish()
                put(_END)
            except BaseException as e:              # a preprocessing failure: still this source's error
                put(e)
            finally:
                getattr(frames, "close", lambda: None)()

        producer = threading.Thread(target=produce, name="probres-video", daemon=True)
        producer.start()
        prev = None

        def done(p: tuple) -> tuple[list[Frame], np.ndarray]:
            batch, buf, pending = p
            try:
                return batch, pending.wait()
            finally:
                free.put(buf)

        try:
            while True:
                item = ready.get()
                if item is _END or isinstance(item, BaseException):
                    break
                batch, buf = item
                pending = self.backend.submit(buf[:len(batch)])
                if prev is not None:
                    p, prev = prev, None
                    yield done(p)
                prev = (batch, buf, pending)
                if ready.empty():                   # the next batch is not decoded yet: do not hold this one
                    p, prev = prev, None
                    yield done(p)
            if prev is not None:
                p, prev = prev, None
                yield done(p)
            if isinstance(item, BaseException):
                raise item
        finally:
            stop.set()
            producer.join()

    def live(self, source: LiveSource, fps: float | None = None) -> Iterator[tuple[list[Frame], np.ndarray]]:
        """([frame], probs (1, C)) for the newest frame each time the engine is free (at most `fps` a second)."""
        buf = self.buffers(1)[0]
        next_t = 0.0
        while True:
            if fps:
                time.sleep(max(0.0, next_t - time.perf_counter()))
            frame = source.take()
            if frame is None:
                return
            next_t = time.perf_counter() + 1.0 / fps if fps else 0.0
            preprocess_array_into(frame.image, buf[0], self.spec)
            frame.image = None
            yield [frame], self.backend.infer(buf[:1])


def stream_batches(fc: FrameClassifier, source: str | int, select: Selector | None = None, reconnect: int = 0,
                   smooth: float | None = None, stats: LiveStats | None = None,
                   name: str | None = None) -> Iterator[tuple[list[Frame], np.ndarray]]:
    """One source's (frames, probs) batches: a file's selected frames in order, or a live source's newest frames
    (a camera index, /dev/videoN, URL or GStreamer pipeline; `stats` is filled as it runs). --smooth applies."""
    select = select or Selector()
    smoother = Smoother(smooth) if smooth else None
    if isinstance(source, int) or is_live(source):
        live = LiveSource(source, name, every=select.every, reconnect=reconnect)
        batches = fc.live(live, select.fps)
    else:
        live, batches = None, fc.files(iter_file_frames(source, select))
    try:
        if live is not None:
            live.__enter__()
        for frames, probs in batches:
            if smoother is not None:
                probs = np.stack([smoother(p) for p in probs])
            if live is not None and stats is not None:
                stats.read, stats.skipped, stats.reconnects = live.read, live.skipped, live.reconnects
            yield frames, probs
    finally:
        batches.close()
        if live is not None:
            live.close()
            if stats is not None:
                stats.read, stats.skipped, stats.reconnects = live.read, live.skipped, live.reconnects
                stats.end_reason = live.end_reason


# ---------------------------------------------------------------------------------------------- probres-infer

def add_video_args(ap: argparse.ArgumentParser) -> None:
    """probres-infer's video flags (all default to None: any of them sends the run to the video route)."""
    g = ap.add_argument_group("video (files, cameras, streams)")
    g.add_argument("--camera", metavar="INDEX|DEVICE", help="classify a camera live: its index (0) or /dev/videoN")
    sel = g.add_mutually_exclusive_group()
    sel.add_argument("--every", type=_positive_int, metavar="N", help="classify every N-th frame")
    sel.add_argument("--fps", type=_positive_float, metavar="F", help="classify F frames a second (by timestamp)")
    g.add_argument("--start", type=_seconds, metavar="S", help="video files: begin at S seconds")
    g.add_argument("--end", type=_seconds, metavar="S", help="video files: stop before S seconds")
    g.add_argument("--smooth", type=_positive_float, metavar="K",
                   help="decide on each label's probability averaged (EMA) over about K frames; off by default")
    g.add_argument("--reconnect", type=_count, metavar="N",
                   help="live sources: reopen a dropped stream up to N times in a row, with backoff (default 3)")
    g.add_argument("--verbose", action="store_true", help="live sources: frames classified and skipped each second")


def _positive_int(text: str) -> int:
    v = _count(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _seconds(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def wants_video(args: argparse.Namespace) -> bool:
    """True when the run has video in it: --camera, a video flag, a video file, URL, device or pipeline
    named, or a directory with a video in it (its names are scanned up to the first video)."""
    flags = (args.camera, args.every, args.fps, args.start, args.end, args.smooth, args.reconnect)
    if any(v is not None for v in flags) or args.verbose:
        return True
    if any(is_live(p) or (is_video_name(p) and not os.path.isdir(p)) for p in args.paths):
        return True
    dirs = [p for p in args.paths if os.path.isdir(p)]
    return any(is_video_name(p) for p in iter_image_paths(dirs, keep=is_media_name))


def _kind(item: str | int) -> str:
    if isinstance(item, int) or is_live(item):
        return "live"
    return "video" if is_video_name(item) and not os.path.isdir(item) else "image"


def camera_source(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def check_args(args: argparse.Namespace) -> Iterator[str | int]:
    """The run's sources in order (--camera, then PATHs, directories walked for images and videos);
    InputError/OutputError (one line, exit 2) for what cannot work, before the model loads."""
    for flag, given in (("--from-list", args.from_list is not None), ("--shard", args.shard != "0/1"),
                        ("--resume", args.resume)):
        if given:
            raise InputError(f"{flag} is for image runs; name videos, streams and --camera on the command line")
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise InputError(f"--end {args.end:g} must be after --start {args.start:g}")
    if not args.paths and args.camera is None:
        raise InputError("give video or image files, directories, stream URLs, or --camera")
    files = [("PATH", p) for p in args.paths if not is_live(p)]
    check_outputs([("--output", args.output)], [*model_inputs("--engine", args.engine), *files], reads=is_media_name)
    camera = [] if args.camera is None else [camera_source(args.camera)]
    sources = peek(itertools.chain(camera, iter_image_paths(args.paths, keep=is_media_name)))
    if sources is None:
        raise InputError(f"no images or videos found in {' '.join(args.paths)}")
    return sources


def run_video(args: argparse.Namespace, prog: str = "probres-infer") -> int:
    """probres-infer's main for a run with video in it: same output, exit codes and Ctrl-C behaviour."""
    from runtime.infer import decision_thresholds, default_threads   # here: runtime.infer imports this module
    try:
        sources = check_args(args)
    except (InputError, OutputError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        backend = open_backend(args.engine, device=args.device, threads=args.threads, **backend_options(args))
    except BackendError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted while loading {args.engine}", file=sys.stderr)
        return 130
    top_k = backend.contract.labels.num_classes if args.top_k == "all" else args.top_k
    threads = args.threads or default_threads()
    select = dict(every=args.every or 1, fps=args.fps, start=args.start or 0.0, end=args.end)
    reconnect = 3 if args.reconnect is None else args.reconnect
    fc = FrameClassifier(backend, args.batch_size, threads)
    n = {"ok": 0, "bad": 0, "frames": 0}
    out: ResultFile | None = None
    t0 = time.perf_counter()

    def one(src: str | int, writer: Writer) -> None:
        name = f"camera:{src}" if isinstance(src, int) else src
        live, stats, last, done = _kind(src) == "live", LiveStats(), (time.perf_counter(), 0, 0), 0
        try:
            with closing(stream_batches(fc, src, Selector(**select), reconnect, args.smooth, stats, name)) as it:
                for frames, probs in it:
                    for f, p in zip(frames, probs):
                        writer.result(name, p, {"frame": f.index, "time_s": round(f.time_s, 6)})
                    out.end_batch(len(frames))
                    done += len(frames)
                    if live and args.verbose and time.perf_counter() - last[0] >= 1.0:
                        dt = time.perf_counter() - last[0]
                        print(f"{prog}: {name}: {(done - last[1]) / dt:.1f} frames/s classified, "
                              f"{(stats.skipped - last[2]) / dt:.1f}/s skipped", file=sys.stderr)
                        last = (time.perf_counter(), done, stats.skipped)
        except (BackendError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:                     # VideoError, or OpenCV failing on a frame: this source's record
            msg = str(e) if isinstance(e, VideoError) else f"{name}: {e.__class__.__name__}: {e}".strip()
            writer.error(name, msg)
            out.end_batch(1)
            print(f"{prog}: {msg}", file=sys.stderr)
            n["bad"] += 1
            n["frames"] += done
            return
        n["frames"] += done
        if live:
            print(f"{prog}: {name}: {stats.end_reason}; {done} frames classified, {stats.skipped} skipped "
                  f"(of {stats.read} read), {stats.reconnects} reconnects", file=sys.stderr)
            if not done:
                writer.error(name, f"{name}: no frame classified ({stats.end_reason})")
                out.end_batch(1)
                n["bad"] += 1
                return
        n["ok"] += 1

    try:
        with ResultFile(args.output) as out:
            thresholds, decided_by = decision_thresholds(backend.contract, args.threshold, top_k)
            writer = Writer(out, args.format, backend.contract.labels, thresholds, top_k, decided_by, extra=FIELDS)
            out.end_batch()                       # the csv header
            for kind, group in itertools.groupby(sources, key=_kind):
                if kind != "image":
                    for src in group:
                        one(src, writer)
                    continue
                for batch, probs in fc.images(group, threads):
                    row = 0
                    for path, err in zip(batch.paths, batch.errors):
                        if err is None:
                            writer.result(path, probs[row])
                            row += 1
                            n["ok"] += 1
                        else:
                            writer.error(path.partition("\0")[0], err)
                            print(f"{prog}: {err}", file=sys.stderr)
                            n["bad"] += 1
                    out.end_batch(len(batch.paths))
    except (BackendError, MemoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; {out.kept} records kept in {args.output}" if out is not None and args.output else ""
        print(f"{prog}: interrupted after {n['ok'] + n['bad']} inputs ({n['frames']} frames){kept}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"{prog}: error: cannot write {args.output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        fc.close()
        backend.close()
    dt = time.perf_counter() - t0
    print(f"{prog}: {n['ok'] + n['bad']} inputs ({n['frames']} video frames), {n['ok']} classified, {n['bad']} failed "
          f"in {dt:.1f} s with {backend.describe()}", file=sys.stderr)
    return 1 if n["bad"] else 0
