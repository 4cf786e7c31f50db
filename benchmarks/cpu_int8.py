"""CPU speed target for INT8: OpenVINO on the INT8 Q/DQ file vs ONNX Runtime on the FP32 file, in one run.

    python -m benchmarks.cpu_int8 --fp32 r101.onnx --int8 r101_int8.onnx [--threads 2] [--rounds 30]
        [--all] [--json OUT]

Rows are shipped backends with their options, opened through runtime.backends.open_backend
(device cpu, --threads, batch 1): "onnxruntime fp32" (the baseline), "openvino int8" and,
with --all, "onnxruntime int8" and "openvino fp32". Rounds are interleaved (each round runs
every row once, after 3 warm-up calls each), so load from other processes on a shared
machine hits all rows alike; each row reports p50/p90 over the rounds, and the ratio is
baseline p50 / row p50. Target (issue 15): best CPU row >= 1.5x the baseline, ResNet-101
@448. The input is one photograph from benchmarks.images, preprocessed with the model's
contract, written once into the backend's own buffer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import BackendError, open_backend

TARGET = 1.5
WARMUP = 3


def rows_for(fp32: str, int8: str, everything: bool) -> list[tuple[str, str, str]]:
    """(label, file, backend) rows; the first is the baseline."""
    rows = [("onnxruntime fp32", fp32, "onnxruntime"), ("openvino int8", int8, "openvino")]
    if everything:
        rows += [("onnxruntime int8", int8, "onnxruntime"), ("openvino fp32", fp32, "openvino")]
    return rows


def measure(rows: list[tuple[str, str, str]], threads: int, rounds: int) -> list[dict[str, Any]]:
    """Interleaved batch-1 latency (ms) of each row."""
    from benchmarks.images import build_image_set
    from runtime.preprocess import preprocess_into

    backends = [open_backend(path, device="cpu", threads=threads, backend=kind) for _, path, kind in rows]
    with tempfile.TemporaryDirectory() as d:
        photo = build_image_set(d, count=1)[0]
        bufs = []
        for b in backends:
            (buf,) = b.allocate_inputs(1, 1)
            preprocess_into(str(photo), buf[0], b.contract.preprocess)
            bufs.append(buf)
    for b, x in zip(backends, bufs):
        for _ in range(WARMUP):
            b.infer(x)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, (b, x) in enumerate(zip(backends, bufs)):
            t0 = time.perf_counter()
            b.infer(x)
            times[i].append((time.perf_counter() - t0) * 1e3)
    out = []
    for (label, path, _), b, t in zip(rows, backends, times):
        out.append({"row": label, "file": path, "backend": b.describe(), "p50_ms": float(np.percentile(t, 50)),
                    "p90_ms": float(np.percentile(t, 90)), "min_ms": float(min(t)), "times_ms": t})
        b.close()
    base = out[0]["p50_ms"]
    for r in out:
        r["speedup_vs_ort_fp32"] = base / r["p50_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_int8", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", required=True, help="the FP32 .onnx (export.onnx)")
    ap.add_argument("--int8", required=True, help="its INT8 Q/DQ .onnx (export.int8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--all", action="store_true", help="also ONNX Runtime INT8 and OpenVINO FP32")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    args = ap.parse_args(argv)
    for flag, p in (("--fp32", args.fp32), ("--int8", args.int8)):
        if not Path(p).is_file():
            print(f"error: {flag} {p}: no such file", file=sys.stderr)
            return 2
    if args.threads < 1 or args.rounds < 1:
        print("error: --threads and --rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        res = measure(rows_for(args.fp32, args.int8, args.all), args.threads, args.rounds)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from benchmarks.preprocess import machine_info

    best = max(res[1:], key=lambda r: r["speedup_vs_ort_fp32"])
    print(f"batch 1, {args.threads} threads, {args.rounds} interleaved rounds")
    for r in res:
        print(f"{r['row']:<18} p50 {r['p50_ms']:8.1f} ms  p90 {r['p90_ms']:8.1f} ms  min {r['min_ms']:8.1f} ms  "
              f"x{r['speedup_vs_ort_fp32']:.2f}   {r['backend']}")
    met = best["speedup_vs_ort_fp32"] >= TARGET
    print(f"target: best CPU row >= {TARGET}x ONNX Runtime FP32: {best['row']} x{best['speedup_vs_ort_fp32']:.2f} "
          f"{'MET' if met else 'NOT MET'}")
    if args.json:
        from runtime.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"machine": machine_info(), "threads": args.threads,
                                                 "rounds": args.rounds, "rows": res, "target": TARGET,
                                                 "target_met": met}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
