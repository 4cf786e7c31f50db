"""probres-batch vs probres-infer on the same files, model and total threads; driver memory for a long list.

    .venv/bin/python -m benchmarks.batch [--images 500] [--threads 2] [--model toy|resnet101 | --engine MODEL] \
        [--work DIR]
    .venv/bin/python -m benchmarks.batch memory [--lines 1000000]

The first form builds `benchmarks.images`' COCO-like JPEGs (640x480 etc.) and the model:
`--model resnet101` is the product's, an untrained ResNet-101 at 448 px (benchmarks.latency's
speed_checkpoint: BatchNorm recalibrated on 16 photos) exported by `python -m export.onnx`
(needs the training extra; cached in --work as resnet101_448.onnx); `--model toy` (the default)
is `benchmarks.serve toy-model` (the COCO contract at 448 px, a graph that costs almost nothing:
what is measured is decoding, preprocessing and the job machinery); --engine any model file.
It times, one run each:
  infer     probres-infer DIR --threads T --output FILE
  batch     probres-batch --input DIR --actors 1 --threads T --address HOST:PORT, on a Ray head this
            command started beforehand (a cluster is up before jobs come; its start is printed apart)
twice (a cold cluster, then a warm one: the first job also starts Ray Data's helper actors), and
prints each command's wall time, its images/s, batch/infer, and batch's rate after its first file
against probres-infer's rate after its model load (startup excluded on both sides: what a longer
job tends to). The `memory` form writes a list
of N paths (files that do not exist: each becomes an error record, so the run stays short) and
runs probres-batch --address local on it, sampling the driver process's RSS (psutil) every 50 ms;
it does the same at N/100 so the two peaks compare. Measured, never asserted (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "RAY_AUTH_MODE": "disabled"}


def timed(cmd: list[str], timeout: float = 1800) -> tuple[float, str]:
    """(wall seconds, stderr's last line) of one command; raises if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return dt, (r.stderr.strip().splitlines() or [""])[-1]


def start_head(tmp: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own session on a free port; returns (process, address) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={tmp}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=_env())
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([ray, "status", f"--address={address}"], capture_output=True, env=_env(),
                         timeout=60).returncode != 0:
        if head.poll() is not None or time.monotonic() > deadline:
            stop_session(head)
            raise SystemExit("ray start --head did not come up")
        time.sleep(1)
    return head, address


def stop_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session `proc` leads (the Ray head and its workers), nothing else."""
    import psutil
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    proc.wait(timeout=30)


def product_model(work: Path) -> Path:
    """The product's model for speed: an untrained ResNet-101 @448 exported with the project's export code."""
    out = work / "resnet101_448.onnx"
    if out.exists():
        return out
    from benchmarks.latency import speed_checkpoint
    ckpt = work / "resnet101_448.pt"
    speed_checkpoint(str(ckpt), "resnet101", 448)
    subprocess.run([sys.executable, "-m", "export.onnx", "--checkpoint", str(ckpt), "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env=_env())
    return out


def speed(images: int = 500, threads: int = 2, batch_size: int = 16, chunk_size: int = 64, model: str = "toy",
          engine: str | None = None, work: str | None = None) -> None:
    """Time probres-infer, then probres-batch on a cold and a warm cluster, on `images` files; print the rows.

    model: 'toy' (benchmarks.serve's toy model) or 'resnet101' (product_model); engine: a model
    file instead; work: where images, model and outputs are kept (default: a new temp folder)."""
    from benchmarks.images import build_image_set
    from benchmarks.serve import toy_model

    n, wd = images, Path(work or tempfile.mkdtemp(prefix="bench_batch_"))
    wd.mkdir(parents=True, exist_ok=True)
    pics = wd / f"images{n}"
    if not pics.is_dir():
        build_image_set(pics, count=n)
    if engine:
        net = Path(engine)
    elif model == "resnet101":
        net = product_model(wd)
    else:
        net = wd / "toy448.onnx"
        if not net.exists():
            toy_model(net)
    py, t, b, c = sys.executable, str(threads), str(batch_size), str(chunk_size)
    for old in (wd / "infer.jsonl", wd / "batch_out"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    t_infer, line_infer = timed([py, "-m", "runtime.infer", "--engine", str(net), str(pics), "--threads", t,
                                 "--batch-size", b, "--output", str(wd / "infer.jsonl")])
    tmp = tempfile.mkdtemp(prefix="rbb", dir="/tmp")
    t0 = time.perf_counter()
    head, address = start_head(tmp)
    t_head = time.perf_counter() - t0
    rows = []
    try:
        for run in ("cold", "warm"):       # the first job on a new cluster also starts Ray Data's helper actors
            shutil.rmtree(wd / "batch_out", ignore_errors=True)
            rows.append((run, *timed([py, "-m", "runtime.batch", "--engine", str(net), "--input", str(pics),
                                      "--output", str(wd / "batch_out"), "--address", address, "--actors", "1",
                                      "--threads", t, "--batch-size", b, "--chunk-size", c])))
    finally:
        stop_session(head)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"images {n} ({pics}), model {net.name}, threads {t}, batch {b}, chunk {c}")
    print(f"infer        {t_infer:6.1f} s  {n / t_infer:6.1f} img/s   | {line_infer}")
    m = re.search(r"\(([0-9.]+) img/s\)", line_infer)
    infer_loop = float(m[1]) if m else float("nan")             # probres-infer's own rate, its startup excluded
    for run, dt, line in rows:
        m = re.search(r"in ([0-9.]+) s \(.*first file after ([0-9.]+) s", line)
        steady = (n - chunk_size) / max(float(m[1]) - float(m[2]), 1e-9) if m and n > chunk_size else float("nan")
        print(f"batch {run}   {dt:6.1f} s  {n / dt:6.1f} img/s   | {line}")
        print(f"  batch {run} / infer images/s: {t_infer / dt:.2f}x end to end; after its first file "
              f"{steady:.1f} img/s = {steady / infer_loop:.2f}x infer's rate after its model load")
    print(f"ray start --head (in no row): {t_head:.1f} s")


def peak_rss(cmd: list[str], timeout: float = 1800) -> tuple[float, float]:
    """(peak RSS MiB of the process itself, wall seconds), sampled every 50 ms."""
    import psutil
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        if time.perf_counter() - t0 > timeout:
            stop_session(p)
            raise SystemExit(f"{' '.join(cmd)}: over {timeout} s")
        time.sleep(0.05)
    err = p.stderr.read()
    stop_session(p)                      # --address local: Ray's own processes are in this session too
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{err[-3000:]}")
    return peak / 2**20, time.perf_counter() - t0


def memory(lines: int = 1_000_000, chunk_size: int = 1024) -> None:
    """Driver peak RSS of probres-batch on a list of `lines` paths, and on `lines` / 100 of them."""
    work = Path(tempfile.mkdtemp(prefix="bench_batch_mem_"))
    try:
        for n in (lines // 100, lines):
            lst = work / f"list{n}.txt"
            with open(lst, "w") as f:
                for i in range(n):
                    f.write(f"/nonexistent/bucket/{i // 1000:05d}/img{i:08d}.jpg\n")
            model = work / "toy.onnx"
            if not model.exists():
                from benchmarks.serve import toy_model
                toy_model(model, size=64)
            mib, dt = peak_rss([sys.executable, "-m", "runtime.batch", "--engine", str(model), "--input", str(lst),
                                "--output", str(work / f"out{n}"), "--address", "local", "--format", "jsonl",
                                "--chunk-size", str(chunk_size), "--threads", "2"])
            print(f"{n:>9} paths: driver peak RSS {mib:.1f} MiB, {dt:.1f} s "
                  f"({-(-n // chunk_size)} chunks of {chunk_size})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.batch memory")
        ap.add_argument("--lines", type=int, default=1_000_000)
        ap.add_argument("--chunk-size", type=int, default=1024)
        memory(**vars(ap.parse_args(argv[1:])))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="total threads: probres-infer's, and the one actor's")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--model", choices=("toy", "resnet101"), default="toy",
                    help="toy: benchmarks.serve's toy model at 448 px (default); resnet101: the product's, "
                         "an untrained ResNet-101 @448 exported once into --work (needs the training extra)")
    ap.add_argument("--engine", help="a model file instead of --model")
    ap.add_argument("--work", help="folder for the images, model and outputs (kept; default: a new temp folder)")
    speed(**vars(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
