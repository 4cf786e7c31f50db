"""probres-infer's video route: video files, cameras and network streams classified frame by frame.

    probres-infer --engine model.onnx clip.mp4 --every 10
    probres-infer --engine model.onnx --camera 0 --smooth 5 --format table
    probres-infer --engine model.onnx rtsp://192.168.1.10/stream --reconnect 5 -o live.jsonl

probres-infer sends a run here when it names a video file (by extension), a stream URL, a
/dev/videoN device, a GStreamer pipeline or --camera, sets a video flag, or names a directory
holding a video (its names are scanned up to the first one). Directories are walked for
images and videos alike; the images of the run are classified as usual (runtime.pipeline),
in order with the videos, in the same buffers. Sources: runtime.video_sources; frames through
the engine: runtime.video_frames. Records carry "frame" and "time_s" (JSONL, CSV, table), after the
provenance header an image run writes first (runtime.provenance);
a video that cannot be read gets one error record and the run goes on; a live source ends
with one stderr line (why, frames classified, skipped, reconnects). Ctrl-C keeps the records
written (exit 130; 143 for SIGTERM, 129 for SIGHUP). Guide: docs/video.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Iterator, Sequence

from runtime.api import default_threads
from runtime.backends import BackendError
from runtime.cli import job_header, lock_output, open_model, positive_int, write_failed
from runtime.inputs import InputError, peek
from runtime.outputs import OutputError, ResultFile, check_outputs, exit_code, interrupted_by, model_inputs
from runtime.pipeline import is_image_name, iter_image_paths
from runtime.provenance import header_line
from runtime.report import Writer, decision_thresholds
from runtime.video_frames import (FrameClassifier, LiveStats, frame_fields, no_frame_error, source_error, source_name,
                                  stream_batches)
from runtime.video_sources import Selector, is_live, is_video_name

if TYPE_CHECKING:
    from runtime.infer import InferJob

FIELDS = ("frame", "time_s")               # what frame_fields gives (the CSV's columns)


def is_media_name(name: str) -> bool:
    return is_image_name(name) or is_video_name(name)


# ---------------------------------------------------------------------------------------------- probres-infer

def add_video_args(ap: argparse.ArgumentParser) -> None:
    """probres-infer's video flags (all default to None: any of them sends the run to the video route)."""
    g = ap.add_argument_group("video (files, cameras, streams)")
    g.add_argument("--camera", metavar="INDEX|DEVICE", help="classify a camera live: its index (0) or /dev/videoN")
    sel = g.add_mutually_exclusive_group()
    sel.add_argument("--every", type=positive_int, metavar="N", help="classify every N-th frame")
    sel.add_argument("--fps", type=_positive_float, metavar="F", help="classify F frames a second (by timestamp)")
    g.add_argument("--start", type=_seconds, metavar="S", help="video files: begin at S seconds")
    g.add_argument("--end", type=_seconds, metavar="S", help="video files: stop before S seconds")
    g.add_argument("--smooth", type=_positive_float, metavar="K",
                   help="decide on each label's probability averaged (EMA) over about K frames; off by default")
    g.add_argument("--reconnect", type=_count, metavar="N",
                   help="live sources: reopen a dropped stream up to N times in a row, with backoff (default 3)")
    g.add_argument("--verbose", action="store_true", help="live sources: frames classified and skipped each second")


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


@dataclass(frozen=True)
class VideoOptions:
    """probres-infer's video flags (add_video_args); None: not given."""

    camera: str | None = None          # --camera INDEX|DEVICE, as typed
    every: int | None = None
    fps: float | None = None
    start: float | None = None         # seconds
    end: float | None = None
    smooth: float | None = None
    reconnect: int | None = None       # None: 3
    verbose: bool = False

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "VideoOptions":
        """The options add_video_args parsed (only converts)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    def given(self) -> bool:
        """Any video flag set (it sends the run to the video route)."""
        return self.verbose or any(getattr(self, f.name) is not None for f in fields(self) if f.name != "verbose")


def wants_video(paths: Sequence[str], video: VideoOptions) -> bool:
    """True when the run has video in it: --camera, a video flag, a video file, URL, device or pipeline
    named, or a directory with a video in it (its names are scanned up to the first video)."""
    if video.given():
        return True
    if any(is_live(p) or (is_video_name(p) and not os.path.isdir(p)) for p in paths):
        return True
    dirs = [p for p in paths if os.path.isdir(p)]
    return any(is_video_name(p) for p in iter_image_paths(dirs, keep=is_media_name))


def _kind(item: str | int) -> str:
    if isinstance(item, int) or is_live(item):
        return "live"
    return "video" if is_video_name(item) and not os.path.isdir(item) else "image"


def camera_source(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def check_args(job: "InferJob") -> Iterator[str | int]:
    """The run's sources in order (--camera, then PATHs, directories walked for images and videos);
    InputError/OutputError (one line, exit 2) for what cannot work, before the model loads."""
    v = job.video
    for flag, given in (("--from-list", job.from_list is not None), ("--shard", job.shard != "0/1"),
                        ("--resume", job.resume)):
        if given:
            raise InputError(f"{flag} is for image runs; name videos, streams and --camera on the command line")
    if v.end is not None and v.end <= (v.start or 0.0):
        raise InputError(f"--end {v.end:g} must be after --start {v.start or 0.0:g}")
    if v.camera is not None and not (v.camera.isdigit() or is_live(v.camera)):
        raise InputError(f"--camera {v.camera}: expected a camera index (0, 1, ...) or /dev/videoN")
    if not job.paths and v.camera is None:
        raise InputError("give video or image files, directories, stream URLs, or --camera")
    files = [("PATH", p) for p in job.paths if not is_live(p)]
    check_outputs([("--output", job.output)], [*model_inputs("--engine", job.engine), *files], reads=is_media_name)
    camera = [] if v.camera is None else [camera_source(v.camera)]
    sources = peek(itertools.chain(camera, iter_image_paths(job.paths, keep=is_media_name)))
    if sources is None:
        raise InputError(f"no images or videos found in {' '.join(job.paths)}")
    return sources


def run_video(job: "InferJob", hold: contextlib.ExitStack, prog: str = "probres-infer") -> int:
    """probres-infer's main for a run with video in it: same output, exit codes and Ctrl-C behaviour
    as an image run (runtime.infer.run); the output's lock is held on `hold`."""
    try:
        sources = check_args(job)
        lock_output(hold, job.output)             # before the model loads, as an image run: one line, exit 2
    except (InputError, OutputError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    head = job_header(job)                        # as an image run's: the model and the rule
    backend = open_model(job, prog)
    if isinstance(backend, int):
        return backend
    top_k = backend.contract.labels.num_classes if job.top_k == "all" else job.top_k
    threads = job.threads or default_threads()
    select = dict(every=job.video.every or 1, fps=job.video.fps, start=job.video.start or 0.0, end=job.video.end)
    reconnect = 3 if job.video.reconnect is None else job.video.reconnect
    fc = FrameClassifier(backend, job.batch_size, threads)
    n = {"ok": 0, "bad": 0, "frames": 0}
    out: ResultFile | None = None
    t0 = time.perf_counter()

    def one(src: str | int, writer: Writer) -> None:
        name = source_name(src)
        live, stats, last, done = _kind(src) == "live", LiveStats(), (time.perf_counter(), 0, 0), 0
        try:
            with closing(stream_batches(fc, src, Selector(**select), reconnect, job.video.smooth, stats, name)) as it:
                for frames, probs in it:
                    for f, p in zip(frames, probs):
                        writer.result(name, p, frame_fields(f))
                    out.end_batch(len(frames))
                    done += len(frames)
                    if live and job.video.verbose and time.perf_counter() - last[0] >= 1.0:
                        dt = time.perf_counter() - last[0]
                        print(f"{prog}: {name}: {(done - last[1]) / dt:.1f} frames/s classified, "
                              f"{(stats.skipped - last[2]) / dt:.1f}/s skipped", file=sys.stderr)
                        last = (time.perf_counter(), done, stats.skipped)
        except (BackendError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:                     # VideoError, or OpenCV failing on a frame: this source's record
            msg = source_error(name, e)
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
                writer.error(name, no_frame_error(name, stats))
                out.end_batch(1)
                n["bad"] += 1
                return
        n["ok"] += 1

    try:
        with ResultFile(job.output) as out:
            thresholds, decided_by = decision_thresholds(backend.contract, job.threshold, top_k)
            if head is not None:
                out.write(header_line(head, job.format))     # which model and rule made every record below
            writer = Writer(out, job.format, backend.contract.labels, thresholds, top_k, decided_by, extra=FIELDS)
            out.end_batch()                       # the provenance and csv headers
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
    except KeyboardInterrupt as e:               # Ctrl-C, SIGTERM or SIGHUP (runtime.outputs.stop_on_signals)
        kept = f"; {out.kept} records kept in {job.output}" if out is not None and job.output else ""
        print(f"{prog}: interrupted{interrupted_by(e)} after {n['ok'] + n['bad']} inputs ({n['frames']} frames){kept}",
              file=sys.stderr)
        return exit_code(e)
    except OSError as e:                          # a closed pipe (`| head`), --output not writable
        return write_failed(e, job.output, prog)
    finally:
        fc.close()
        backend.close()
    dt = time.perf_counter() - t0
    print(f"{prog}: {n['ok'] + n['bad']} inputs ({n['frames']} video frames), {n['ok']} classified, {n['bad']} failed "
          f"in {dt:.1f} s with {backend.describe()}", file=sys.stderr)
    return 1 if n["bad"] else 0
