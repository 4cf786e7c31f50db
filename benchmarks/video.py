"""Video throughput and live latency of probres-infer's video route, and what --smooth does to decisions.

    python -m benchmarks.video [--engine MODEL] [--frames 300] [--sizes 640x480,1920x1080]
        [--batch-size 16] [--threads T] [--rounds 3] [--live-seconds 5] [--work DIR] [--json OUT]
    python -m benchmarks.video --smooth-only

Clips: generated mp4v (MPEG-4 part 2, what OpenCV's writer has everywhere) at 30 fps, a slow pan
and zoom over a real photo (benchmarks.images.source_photos), so the codec sees natural texture
and motion. Per size, frames/s of: decode only (runtime.video_sources.iter_file_frames), decode
+ preprocess (runtime.video_frames.FrameClassifier.files with an engine that returns at once:
the same threads and buffers), engine only (submit k+1 before wait k over the backend's own
buffers, benchmarks.latency.overlapped_rate) and end to end (FrameClassifier.files with the
engine, as probres-infer runs a file). Each is the median of --rounds alternating passes, so
load from other processes falls on all alike; target: end to end >= 0.95 x min(decode only,
engine only). Live: the clip replayed at its frame rate as a camera (a paced capture, the
latest-frame-wins LiveSource); latency = capture timestamp (frame decoded) to record, p50/p99,
and the frames skipped. Without --engine: an untrained resnet18 at --model-size px exported to
ONNX (python -m export.onnx; needs the training extra), ONNX Runtime on the CPU.
Smoothing (no model needed, --smooth-only): a synthetic per-frame probability sequence, labels
switching at known frames, noisy logits, through runtime.video_frames.Smoother: decision flips
per 100 frames, frames from a true change to the first decision following it (delay) and to
the first of 5 right decisions in a row (settle), and the fraction of wrong decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.backends import open_backend
from runtime.backends.base import Backend
from runtime.video_frames import FrameClassifier, Smoother
from runtime.video_sources import LiveSource, iter_file_frames

FPS = 30.0


def make_clip(path: Path, width: int, height: int, frames: int) -> Path:
    """A pan and zoom over a real photo, mp4v at 30 fps."""
    from benchmarks.images import source_photos
    photo = source_photos()[0][1]
    big = cv2.resize(photo, (width * 2, height * 2), interpolation=cv2.INTER_CUBIC)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    for i in range(frames):
        t = i / max(frames - 1, 1)
        scale = 1.0 - 0.3 * t                         # zoom in while panning right and down
        cw, ch = int(width * 2 * scale * 0.7), int(height * 2 * scale * 0.7)
        x, y = int((width * 2 - cw) * t), int((height * 2 - ch) * t * 0.5)
        w.write(cv2.resize(big[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_AREA))
    w.release()
    return path


def toy_engine(work: Path, size: int) -> Path:
    """An untrained resnet18 at `size` px with an 80-label contract, exported to ONNX."""
    import torch

    from runtime.contract import LabelSet, ModelContract, PreprocessSpec
    from train.checkpoint import Checkpoint, save_checkpoint
    from train.model import build_model
    out = work / f"resnet18_{size}.onnx"
    if out.exists():
        return out
    contract = ModelContract(LabelSet.from_categories([(i + 1, f"label{i}") for i in range(80)]),
                             PreprocessSpec(size=size))
    torch.manual_seed(0)
    model = build_model("resnet18", 80).eval()
    ckpt = work / "best.pt"
    save_checkpoint(ckpt, Checkpoint(arch="resnet18", state_dict=model.state_dict(), contract=contract,
                                     config={"arch": "resnet18", "image_size": size}, epoch=0))
    subprocess.run([sys.executable, "-m", "export.onnx", "--checkpoint", str(ckpt), "--output", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


class NullEngine(Backend):
    """Returns zeros at once: FrameClassifier.files with it times decode + preprocess alone."""

    def __init__(self, like: Backend) -> None:
        self.contract, self.name, self.path = like.contract, "null", "null"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), self.contract.labels.num_classes), np.float32)


def rate(fn) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def files_rate(fc: FrameClassifier, clip: Path) -> float:
    return rate(lambda: sum(len(f) for f, _ in fc.files(iter_file_frames(str(clip)))))


class PacedCapture:
    """A file replayed as a camera: read() returns each frame no sooner than its time since open."""

    def __init__(self, path: str) -> None:
        self.cap, self.t0, self.i = cv2.VideoCapture(path, cv2.CAP_FFMPEG), time.perf_counter(), 0

    def isOpened(self) -> bool:
        return self.cap.isOpened()

    def read(self) -> tuple[bool, np.ndarray | None]:
        time.sleep(max(0.0, self.t0 + self.i / FPS - time.perf_counter()))
        self.i += 1
        return self.cap.read()

    def release(self) -> None:
        self.cap.release()


def live_latency(fc: FrameClassifier, clip: Path, seconds: float) -> dict[str, Any]:
    """The clip played as a camera for `seconds` (or until it ends) through the live policy."""
    lat = []
    with LiveSource(str(clip), opener=PacedCapture) as src:
        stop = threading.Timer(seconds, src.close)
        stop.start()
        for frames, _ in fc.live(src):
            lat.append((time.perf_counter() - frames[0].captured) * 1e3)
        stop.cancel()
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "classified": len(lat), "skipped": src.skipped, "read": src.read}


def video_rows(engine: str, work: Path, sizes: str = "640x480,1920x1080", frames: int = 300, batch_size: int = 16,
               threads: int | None = None, device: str = "auto", rounds: int = 3,
               live_seconds: float = 1.0) -> list[dict[str, Any]]:
    """One row per size WxH in `sizes`: frames/s of decode, decode + preprocess, engine and end to end (medians
    of `rounds`) on a generated clip of `frames` frames kept in `work`, and live latency over `live_seconds`."""
    from benchmarks.latency import overlapped_rate
    backend = open_backend(engine, device=device, threads=threads)
    threads = threads or min(8, len(os.sched_getaffinity(0)))
    rows = []
    for size in sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        clip = Path(work) / f"clip_{w}x{h}_{frames}.mp4"
        if not clip.exists():
            make_clip(clip, w, h, frames)
        fc, null = FrameClassifier(backend, batch_size, threads), FrameClassifier(NullEngine(backend),
                                                                                   batch_size, threads)
        bufs = fc.buffers(2)
        bufs[0][:] = bufs[1][:] = 0
        iters = max(2, frames // batch_size)
        files_rate(fc, clip)                                # warm-up: codec, engine, pool
        r: dict[str, list[float]] = {"decode": [], "decode_preprocess": [], "engine": [], "end_to_end": []}
        for _ in range(rounds):
            r["decode"].append(rate(lambda: sum(1 for _ in iter_file_frames(str(clip)))))
            r["decode_preprocess"].append(files_rate(null, clip))
            r["engine"].append(overlapped_rate(backend, bufs[0], bufs[1], iters))
            r["end_to_end"].append(files_rate(fc, clip))
        med = {k: statistics.median(v) for k, v in r.items()}
        live = live_latency(fc, clip, live_seconds) if live_seconds > 0 else None
        fc.close()
        null.close()
        rows.append({"size": f"{w}x{h}", "frames": frames, **{f"{k}_fps": round(v, 1) for k, v in med.items()},
                     "ratio": round(med["end_to_end"] / min(med["decode"], med["engine"]), 3), "rounds": r,
                     "live": live})
        print(json.dumps(rows[-1]), file=sys.stderr)
    backend.close()
    return rows


def smoothing_table(frames: int = 20_000, labels: int = 4, seed: int = 0, ks=(0, 3, 5, 10)) -> list[dict[str, Any]]:
    """Decisions (p >= 0.5) on a synthetic sequence with and without --smooth K.

    Truth: each label on/off in segments of 30-300 frames. Per-frame logit: +-2 (present/absent)
    plus noise of std 1.5, of which half is shared with the previous frame (AR(1), rho 0.5), as a
    per-frame classifier jitters on nearly identical video frames.
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((frames, labels), bool)
    for j in range(labels):
        t, on = 0, bool(rng.integers(2))
        while t < frames:
            n = int(rng.integers(30, 301))
            truth[t:t + n, j], t, on = on, t + n, not on
    noise = np.zeros((frames, labels))
    e = rng.normal(0, 1.5, (frames, labels))
    noise[0] = e[0]
    for t in range(1, frames):
        noise[t] = 0.5 * noise[t - 1] + np.sqrt(1 - 0.25) * e[t]
    probs = 1 / (1 + np.exp(-(np.where(truth, 2.0, -2.0) + noise)))
    changes = [(t, j) for j in range(labels) for t in range(1, frames) if truth[t, j] != truth[t - 1, j]]
    rows = []
    for k in ks:
        s = Smoother(k) if k else None
        p = np.stack([s(row) for row in probs]) if s else probs
        dec = p >= 0.5
        flips = int((dec[1:] != dec[:-1]).sum())
        delays, settle = [], []
        for t, j in changes:
            right = dec[t:, j] == truth[t, j]
            after = np.nonzero(right)[0]
            delays.append(int(after[0]) if len(after) else frames - t)
            run5 = np.nonzero(np.convolve(right, np.ones(5, int), "valid") == 5)[0]   # right 5 frames in a row
            settle.append(int(run5[0]) if len(run5) else frames - t)
        rows.append({"smooth": k or "off", "flips_per_100": round(100 * flips / (frames * labels), 2),
                     "true_flips_per_100": round(100 * len(changes) / (frames * labels), 2),
                     "delay_mean": round(float(np.mean(delays)), 2), "delay_p90": float(np.percentile(delays, 90)),
                     "settle_mean": round(float(np.mean(settle)), 2),
                     "error_rate": round(float((dec != truth).mean()), 4)})
    return rows


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", help="model.plan / model.onnx / best.pt (default: an untrained resnet18 ONNX)")
    ap.add_argument("--model-size", type=int, default=224, help="input size of the default model")
    ap.add_argument("--frames", type=int, default=300, help="frames per generated clip")
    ap.add_argument("--sizes", default="640x480,1920x1080")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--live-seconds", type=float, default=1.0, help="seconds of live replay per size (0: none)")
    ap.add_argument("--work", type=Path, default=None, help="where clips and the default model go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smooth-only", action="store_true", help="only the --smooth table (no model, no video)")
    args = ap.parse_args(argv)
    command = " ".join(["python -m benchmarks.video", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"cpu": cpu_name(), "command": command, "smoothing": smoothing_table()}
    if not args.smooth_only:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            engine = args.engine or str(toy_engine(work, args.model_size))
            result["engine"] = engine
            result["video"] = video_rows(engine, work, args.sizes, args.frames, args.batch_size, args.threads,
                                         args.device, args.rounds, args.live_seconds)
    text = json.dumps(result, indent=1)
    if args.json:
        from runtime.fileio import atomic_write_text
        atomic_write_text(args.json, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
