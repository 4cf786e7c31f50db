"""Video in probres-infer: frames equal to OpenCV's decode classified as arrays, frame selection,
network-camera streams (loopback multipart MJPEG) with drops, the live policy, bad videos, memory.

    .venv/bin/python -m pytest -q tests/test_video.py

Clips are generated with cv2.VideoWriter (MJPG in .avi, mp4v in .mp4) at 64x48. The model is
test_infer's tiny ONNX graph (channel means -> linear -> sigmoid); references are computed with
onnxruntime on arrays this file decodes and preprocesses itself. Every server, thread and
subprocess is bounded by a timeout and shut down in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.backends.base import Backend
from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.infer import main
from runtime.preprocess import preprocess_array_into
from runtime.provenance import records
from runtime.video_frames import FrameClassifier, Smoother
from runtime.video_sources import LiveSource, Selector, iter_file_frames
from test_infer import S, tiny_onnx

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ModelContract(LabelSet.from_categories([(1, "person"), (3, "car"), (18, "dog")]), PreprocessSpec(size=S))
W, H, FPS = 64, 48, 10.0


def write_clip(path: Path, n: int, fourcc: str = "mp4v", seed: int = 0) -> Path:
    """n frames of coloured noise with a moving bar, at FPS, 64x48."""
    rng = np.random.default_rng(seed)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (W, H))
    assert w.isOpened(), f"OpenCV cannot write {fourcc}"
    for i in range(n):
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        img[:, (i * 3) % W:(i * 3) % W + 8] = (30 * (i % 8), 255 - 20 * (i % 12), 128)
        w.write(img)
    w.release()
    return path


def opencv_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(img)
    cap.release()
    return out


def reference_probs(model: Path, images: list[np.ndarray]) -> np.ndarray:
    """Classify decoded BGR arrays: preprocess each array, run the ONNX graph with onnxruntime."""
    import onnxruntime as ort
    x = np.empty((len(images), 3, S, S), np.float32)
    for img, row in zip(images, x):
        preprocess_array_into(img, row, CONTRACT.preprocess)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    tiny_onnx(path, CONTRACT, seed=3)
    return path


def run_cli(args, capsys) -> tuple[int, list[dict], str]:
    """probres-infer's exit status, its JSONL records (past the provenance header) and its stderr."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, list(records(out.splitlines())), err


def probs_of(record: dict) -> np.ndarray:
    """The (C,) probabilities of a --top-k all record, in label order."""
    by_id = {p["category_id"]: p["probability"] for p in record["predictions"]}
    return np.array([by_id[c] for c in CONTRACT.labels.category_ids])


# ------------------------------------------------------------------------------------ files

@pytest.mark.parametrize("fourcc,ext", [("MJPG", "avi"), ("mp4v", "mp4")])
def test_every_tenth_frame_matches_opencv_frames_classified_as_arrays(model, tmp_path, capsys, fourcc, ext):
    clip = write_clip(tmp_path / f"clip.{ext}", 25, fourcc)
    frames = opencv_frames(clip)
    assert len(frames) == 25
    ref = reference_probs(model, frames)
    rc, recs, err = run_cli(["--engine", model, clip, "--every", 10, "--top-k", "all"], capsys)
    assert rc == 0, err
    assert [r["frame"] for r in recs] == [0, 10, 20]
    assert [r["time_s"] for r in recs] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert all(r["image"] == str(clip) for r in recs)
    for r in recs:                       # records are rounded to 6 decimals
        assert np.abs(probs_of(r) - ref[r["frame"]]).max() <= 1e-6
    # The library path, unrounded, every frame, batches of 4 over 2 preprocessing threads.
    from runtime.backends import open_backend
    with open_backend(model, device="cpu") as backend:
        fc = FrameClassifier(backend, batch_size=4, threads=2)
        got = [(f.index, p) for fs, ps in fc.files(iter_file_frames(str(clip))) for f, p in zip(fs, ps)]
        fc.close()
    assert [i for i, _ in got] == list(range(25))
    assert max(np.abs(p - ref[i]).max() for i, p in got) <= 1e-6


@pytest.mark.parametrize("flags,frames", [
    (["--every", 7], [0, 7, 14, 21, 28]),
    (["--fps", 4], [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28]),      # first frame at or after each k/4 s
    (["--start", 1.0, "--end", 2.0, "--every", 3], [10, 13, 16, 19]),
    (["--start", 0.55, "--fps", 2], [6, 11, 16, 21, 26]),               # ticks 0.55, 1.05, 1.55, ...
    (["--end", 0.35], [0, 1, 2, 3]),
])
def test_frame_selection_indices_and_times(model, tmp_path, capsys, flags, frames):
    clip = write_clip(tmp_path / "clip.mp4", 30)
    rc, recs, err = run_cli(["--engine", model, clip, *flags], capsys)
    assert rc == 0, err
    assert [r["frame"] for r in recs] == frames
    assert [r["time_s"] for r in recs] == pytest.approx([i / FPS for i in frames], abs=1e-6)


def test_csv_and_table_carry_frame_and_time(model, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.avi", 12, "MJPG")
    rc = main(["--engine", str(model), str(clip), "--every", "5", "--format", "csv", "--top-k", "1"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[1].startswith("image,frame,time_s,rank,label")            # after the provenance header
    assert [line.split(",")[1:3] for line in out[2:]] == [["0", "0.0"], ["5", "0.5"], ["10", "1.0"]]
    rc = main(["--engine", str(model), str(clip), "--every", "5", "--format", "table", "--top-k", "1"])
    assert f"{clip} frame=5 time_s=0.5" in capsys.readouterr().out


def test_video_outputs_start_with_the_provenance_header(model, tmp_path, capsys):
    """As an image run: the first line names the model (file name, sha256 computed here) and the rule."""
    import hashlib
    from runtime.provenance import KEY, parse_header
    clip = write_clip(tmp_path / "clip.avi", 6, "MJPG")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    out = tmp_path / "frames.jsonl"
    assert main(["--engine", str(model), str(clip), "--every", "2", "--threshold", "0.3", "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert parse_header(lines[0]) == {KEY: {"model": model.name, "sha256": sha, "threshold": 0.3, "top_k": None}}
    assert [r["frame"] for r in records(lines)] == [0, 2, 4] and len(lines) == 4
    assert main(["--engine", str(model), str(clip), "--every", "3", "--format", "csv", "--top-k", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert parse_header(text[0]) == {KEY: {"model": model.name, "sha256": sha, "threshold": None, "top_k": 2}}
    assert text[1].startswith("image,frame,time_s,")


def test_corrupt_video_among_images_gets_one_error_record(model, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "c.png"):
        cv2.imwrite(str(d / name), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    write_clip(d / "b_clip.avi", 6, "MJPG")
    good = write_clip(tmp_path / "good.mp4", 20)
    (d / "b_broken.mp4").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])   # truncated: no moov atom
    (tmp_path / "junk.mkv").write_bytes(b"not a video at all" * 50)
    rc, recs, err = run_cli(["--engine", model, d, tmp_path / "junk.mkv", "--top-k", "all"], capsys)
    assert rc == 1
    names = [(Path(r["image"]).name, r.get("frame"), "error" in r) for r in recs]
    assert names == [("a.jpg", None, False), ("b_broken.mp4", None, True),        # the walk's sorted order
                     *[("b_clip.avi", i, False) for i in range(6)], ("c.png", None, False), ("junk.mkv", None, True)]
    assert "b_broken.mp4: cannot open as a video" in err and "junk.mkv: cannot open as a video" in err
    images = [cv2.imread(str(d / "a.jpg")), cv2.imread(str(d / "c.png"))]
    ref = reference_probs(model, images)
    assert np.abs(probs_of(recs[0]) - ref[0]).max() <= 1e-6 and np.abs(probs_of(recs[8]) - ref[1]).max() <= 1e-6


def test_video_cut_short_keeps_its_frames_then_one_error_record(model, tmp_path, capsys):
    whole = write_clip(tmp_path / "whole.avi", 25, "MJPG")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) * 7 // 10])     # AVI: still opens, header says 25
    n = len(opencv_frames(cut))
    assert 5 < n < 24
    rc, recs, err = run_cli(["--engine", model, cut, whole, "--every", 1], capsys)
    assert rc == 1
    assert [r.get("frame") for r in recs[:n]] == list(range(n)) and all("error" not in r for r in recs[:n])
    assert recs[n] == {"image": str(cut), "error": f"{cut}: truncated or corrupt: decoding stopped at frame {n} of 25"}
    assert [r["frame"] for r in recs[n + 1:]] == list(range(25))                  # the run went on


def test_bad_flags_are_one_line_errors_before_work(model, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", 3)
    assert main(["--engine", str(model), str(clip), "--start", "2", "--end", "1"]) == 2
    assert "--end 1 must be after --start 2" in capsys.readouterr().err
    assert main(["--engine", str(model), str(clip), "--end", "0"]) == 2
    assert "--end 0 must be after --start 0" in capsys.readouterr().err
    assert main(["--engine", str(model), "--camera", "front"]) == 2
    assert "--camera front: expected a camera index" in capsys.readouterr().err
    assert main(["--engine", str(model), str(clip), "--resume", "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "--resume is for image runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--engine", str(model), str(clip), "--every", "2", "--fps", "3"])


# ------------------------------------------------------------------------------------ network camera

LEVELS = np.arange(30) * 8 + 10          # frame g of the server is flat grey LEVELS[g % 30]


class MJPEGCamera:
    """A loopback network camera: multipart/x-mixed-replace JPEG frames over HTTP, as IP cameras send.

    Each connection sends `per_connection` frames (None: until stopped) every `interval_s`, then
    drops the connection (or, with stall, goes silent); after `connections` connections it answers 503.
    """

    def __init__(self, per_connection: int | None, interval_s: float, connections: int = 1000,
                 stall: bool = False) -> None:
        self.per_connection, self.interval_s, self.connections = per_connection, interval_s, connections
        self.stall = stall                    # after per_connection frames, hold the connection silently
        self.opened, self.stop = 0, threading.Event()
        self.jpegs = [cv2.imencode(".jpg", np.full((H, W, 3), v, np.uint8))[1].tobytes() for v in LEVELS]
        cam = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cam.opened += 1
                if cam.opened > cam.connections:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                k = 0
                try:
                    while not cam.stop.is_set() and (cam.per_connection is None or k < cam.per_connection):
                        jpg = cam.jpegs[k % len(cam.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg + b"\r\n")
                        k += 1
                        cam.stop.wait(cam.interval_s)
                    if cam.stall:
                        cam.stop.wait(30)
                except OSError:
                    pass                      # the client went away

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def camera():
    cams = []

    def make(*args, **kw) -> MJPEGCamera:
        cams.append(MJPEGCamera(*args, **kw))
        return cams[-1]
    yield make
    for c in cams:
        c.close()


def level_of(probs: np.ndarray, model: Path) -> int:
    """Which flat grey level (index into LEVELS) these probabilities are nearest to."""
    ref = reference_probs(model, [np.full((H, W, 3), v, np.uint8) for v in LEVELS])
    return int(np.abs(ref - probs).max(axis=1).argmin())


def test_stream_survives_a_drop_then_ends_with_one_clear_line(model, camera, capsys):
    cam = camera(per_connection=12, interval_s=0.02, connections=2)
    rc, recs, err = run_cli(["--engine", model, cam.url, "--reconnect", 2, "--top-k", "all"], capsys)
    assert rc == 0, err
    frames = [r["frame"] for r in recs]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert frames[-1] >= 12                       # frames after the reconnect, numbered on from the first connection
    assert cam.opened == 4                        # 2 served + 2 refused reconnects
    for r in recs:                                # each record is the frame it names (connection-local k = frame % 12)
        assert level_of(probs_of(r), model) == r["frame"] % 12
    end = [line for line in err.splitlines() if cam.url in line]
    assert len(end) == 1 and "gave up after 2 failed reconnects in a row (--reconnect 2)" in end[0]
    assert f"{len(recs)} frames classified" in end[0] and "skipped" in end[0]


def test_a_silent_stream_counts_as_dropped(camera, monkeypatch):
    from runtime import video_sources
    monkeypatch.setattr(video_sources, "STALL_S", 1.0)
    cam = camera(per_connection=5, interval_s=0.01, connections=2, stall=True)
    t0 = time.monotonic()
    with LiveSource(cam.url, reconnect=1, backoff_s=0.1) as src:
        got = []
        while (f := src.take(timeout=20)) is not None:
            got.append(f.index)
    assert src.read == 10 and got[-1] == 9 and cam.opened == 3
    assert "gave up after 1 failed reconnect in a row" in src.end_reason
    assert time.monotonic() - t0 < 15


class SlowBackend(Backend):
    """Sleeps `delay_s` per call; returns sigmoid of the channel means. Records the newest captured frame
    at each call (the live policy must not fall behind it)."""

    def __init__(self, delay_s: float) -> None:
        self.contract, self.name, self.path, self.delay_s = CONTRACT, "slow", "slow", delay_s
        self.source: LiveSource | None = None
        self.newest_at_call: list[int] = []

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        self.newest_at_call.append(self.source.latest if self.source else -1)
        time.sleep(self.delay_s)
        return 1 / (1 + np.exp(-batch.mean(axis=(2, 3))))


def test_live_policy_skips_and_counts_and_never_lags(camera):
    cam = camera(per_connection=40, interval_s=0.02)      # 50 frames/s against a 10/s engine
    backend = SlowBackend(0.1)
    fc = FrameClassifier(backend, batch_size=4, threads=1)
    got = []
    with LiveSource(cam.url, reconnect=0) as src:
        backend.source = src
        watchdog = threading.Timer(30, src.close)
        watchdog.start()
        try:
            for frames, probs in fc.live(src):
                got.append(frames[0])
        finally:
            watchdog.cancel()
    fc.close()
    assert src.read == 40 and src.end_reason.startswith("the stream ended")
    assert 4 <= len(got) < 30 and src.skipped > 10
    assert len(got) + src.skipped == src.read                     # every frame read was classified or skipped
    idx = [f.index for f in got]
    assert idx == sorted(idx)
    lags = [newest - f.index for newest, f in zip(backend.newest_at_call, got)]
    assert max(lags) <= 1, lags                                    # a FIFO would fall behind by dozens


def interrupt_live_run(model, camera, tmp_path, signum: int):
    """A probres-infer run on a live loopback camera, sent `signum` once records are being written:
    (exit code, its stderr after the first per-second line, the output file, the camera's URL)."""
    cam = camera(per_connection=None, interval_s=0.02)
    out = tmp_path / "live.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "runtime.infer", "--engine", str(model), cam.url, "-o", str(out),
                          "--verbose"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:        # the first per-second line: records are being written
            line = p.stderr.readline()
            lines.append(line)
            if "frames/s classified" in line or not line:
                break
        assert "frames/s classified" in lines[-1], "".join(lines)
        p.send_signal(signum)
        _, rest = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    return p.returncode, rest, out, cam.url


def test_ctrl_c_keeps_finished_records(model, camera, tmp_path):
    code, rest, out, url = interrupt_live_run(model, camera, tmp_path, signal.SIGINT)
    assert code == 130, rest
    recs = list(records(out.read_text().splitlines()))
    assert len(recs) >= 5 and all(r["image"] == url and "frame" in r for r in recs)
    assert f"{len(recs)} records kept in {out}" in rest


def test_sigterm_exits_143_and_keeps_finished_records(model, camera, tmp_path):
    # as an image run (docs: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); the video route once said 130 for all three
    code, rest, out, url = interrupt_live_run(model, camera, tmp_path, signal.SIGTERM)
    assert code == 143, rest
    recs = list(records(out.read_text().splitlines()))
    assert len(recs) >= 5 and all(r["image"] == url and "frame" in r for r in recs)
    assert "interrupted by SIGTERM after " in rest and f"{len(recs)} records kept in {out}" in rest


# ------------------------------------------------------------------------------------ smoothing, memory

def ema_closed_form(p: np.ndarray, k: float) -> np.ndarray:
    """EMA with alpha 2/(k+1) written out as weights, not recursively: s_t = (1-a)^t p_0 + sum_i a (1-a)^(t-i) p_i."""
    a, n = 2 / (k + 1), len(p)
    t, i = np.arange(n)[:, None], np.arange(n)[None, :]
    w = np.where(i <= t, a * (1 - a) ** np.clip(t - i, 0, None), 0.0)
    w[:, 0] = (1 - a) ** np.arange(n)
    return w @ p


def test_smoother_is_the_exponential_moving_average_over_k_frames():
    p = np.random.default_rng(0).random((50, 3))
    s = Smoother(4)
    got = np.stack([s(row) for row in p])
    np.testing.assert_allclose(got, ema_closed_form(p, 4), atol=1e-6)


def test_smooth_flag_reports_the_moving_average_of_the_frame_probabilities(model, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", 12)
    ref = reference_probs(model, opencv_frames(clip))
    rc, recs, err = run_cli(["--engine", model, clip, "--smooth", 3, "--top-k", "all", "--batch-size", 5], capsys)
    assert rc == 0, err
    want = ema_closed_form(ref.astype(np.float64), 3)
    assert np.abs(np.stack([probs_of(r) for r in recs]) - want).max() <= 1e-6


class FakeCapture:
    """A generated 'video' of n frames (one 32x24 array) behind cv2.VideoCapture's interface."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0
        self.img = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FPS: 30.0, cv2.CAP_PROP_FRAME_COUNT: float(self.n),
                cv2.CAP_PROP_POS_MSEC: (self.i - 1) * 1000 / 30}.get(prop, 0.0)

    def grab(self) -> bool:
        self.i += 1
        return self.i <= self.n

    def retrieve(self) -> tuple[bool, np.ndarray]:
        return True, self.img.copy()

    def release(self) -> None:
        pass


class FastBackend(Backend):
    def __init__(self) -> None:
        self.contract, self.name, self.path = CONTRACT, "fast", "fast"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-batch.mean(axis=(2, 3))))


def test_memory_flat_over_100000_frames(tmp_path):
    import psutil
    from runtime.report import Writer
    dummy = tmp_path / "generated.mp4"
    dummy.write_bytes(b"")
    proc, rss, n = psutil.Process(), {}, 100_000
    fc = FrameClassifier(FastBackend(), batch_size=64, threads=2)
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        writer = Writer(null, "jsonl", CONTRACT.labels, np.full(3, 0.5), extra=("frame", "time_s"))
        for frames, probs in fc.files(iter_file_frames(str(dummy), Selector(), opener=lambda _: FakeCapture(n))):
            for f, p in zip(frames, probs):
                writer.result(f.source, p, {"frame": f.index, "time_s": round(f.time_s, 6)})
            last = frames[-1].index
            if last + 1 in (10_240, n):
                rss[last + 1] = proc.memory_info().rss
            assert time.perf_counter() - t0 < 240, f"too slow: {last} frames"
    fc.close()
    assert last == n - 1
    grew = (rss[n] - rss[10_240]) / 2**20
    assert grew < 16, f"RSS grew {grew:.1f} MiB from frame 10,240 to 100,000"


def test_selector_is_a_frame_test_not_a_clock():
    s = Selector(fps=3)            # 10 fps source, ticks every 1/3 s
    assert [i for i in range(20) if s(i, i / 10)] == [0, 4, 7, 10, 14, 17]


def test_video_benchmark_smoke_writes_its_json(model, tmp_path, capsys):
    from benchmarks import video as bvideo
    out = tmp_path / "video.json"
    assert bvideo.main(["--engine", str(model), "--frames", "8", "--sizes", "64x48", "--batch-size", "4", "--rounds", "1",
                        "--live-seconds", "20", "--work", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["video"]
    assert row["size"] == "64x48" and row["ratio"] > 0 and row["live"]["classified"] >= 1
    assert row["live"]["classified"] + row["live"]["skipped"] == row["live"]["read"] == 8   # the clip ended first
    assert [r["smooth"] for r in res["smoothing"]] == ["off", 3, 5, 10]
    assert res["smoothing"][0]["flips_per_100"] > res["smoothing"][-1]["flips_per_100"]


def test_sources_are_told_apart(tmp_path):
    from runtime.video_sources import is_gstreamer, is_live, is_video_name
    assert all(is_live(s) for s in ("rtsp://cam/1", "HTTP://cam/v.mjpg", "https://x/live.m3u8", "/dev/video0",
                                    "videotestsrc ! videoconvert ! appsink"))
    assert not any(is_live(s) for s in ("clip.mp4", "/dev/video", "photos/a.jpg", "rtsp.mp4"))
    odd = tmp_path / "a ! b.mp4"                  # an existing file is a file, whatever its name
    odd.write_bytes(b"")
    assert not is_gstreamer(str(odd)) and is_video_name(str(odd))
    assert is_video_name("X.MKV") and not is_video_name("x.jpg")


def test_a_pipeline_opencv_cannot_open_is_one_error_record(model, capsys):
    # This OpenCV may lack GStreamer (then nothing opens it); an unknown element fails either way.
    pipe = "nosuchelement_probres ! appsink"
    rc, recs, err = run_cli(["--engine", model, pipe, "--reconnect", 0], capsys)
    assert rc == 1
    assert recs == [{"image": pipe, "error": f"{pipe}: no frame classified (cannot open it)"}]
