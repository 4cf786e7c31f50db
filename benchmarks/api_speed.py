"""Classifier.predict against probres-infer: images/s over the same files, model and threads, as a ratio.

    python -m benchmarks.api_speed --engine demo_out/model.onnx [--count 500] [--batch-size 8]
        [--threads T] [--rounds 5] [--json OUT]

Writes --count COCO-shaped JPEGs (benchmarks.images) to a temp folder, opens the model once for
the library, then alternates rounds: probres-infer (runtime.infer.main in this process, its
JSONL to a temp file; its own images/s, timed from after the model loads, read from its summary
line) and Classifier.predict over the same list of paths at the same batch size and threads
(timed around the call; the model already open), which of the two goes first alternating too.
Alternating puts load from other processes on both alike; the ratio is median(library) /
median(probres-infer). Target: >= 0.97. On a shared machine single rounds vary by 2x: use
several rounds and read the ratio with the load average beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr
from pathlib import Path

from benchmarks.images import build_image_set
from benchmarks.preprocess import machine_info
from runtime import Classifier
from runtime.api import default_threads
from runtime.cli import positive_int
from runtime.fileio import atomic_write_text
from runtime.infer import main as infer_main

TARGET = 0.97


def infer_rate(engine: str, paths: list[str], batch: int, threads: int, out: Path) -> float:
    """probres-infer's own images/s over `paths` (its summary line), run in this process."""
    err = io.StringIO()
    with redirect_stderr(err):
        rc = infer_main(["--engine", engine, *paths, "--batch-size", str(batch), "--threads", str(threads),
                         "--output", str(out)])
    m = re.search(r"\(([\d.]+) img/s\)", err.getvalue())
    if rc != 0 or m is None:
        raise RuntimeError(f"probres-infer failed (exit {rc}): {err.getvalue().strip()[-500:]}")
    return float(m.group(1))


def api_rate(clf: Classifier, paths: list[str], batch: int) -> float:
    """Classifier.predict's images/s over `paths` (the model already open)."""
    t0 = time.perf_counter()
    preds = clf.predict(paths, batch_size=batch)
    dt = time.perf_counter() - t0
    if len(preds) != len(paths) or not all(p.ok for p in preds):
        raise RuntimeError("Classifier.predict did not classify every image")
    return len(paths) / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.api_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, metavar="MODEL", help="the model (e.g. make demo's demo_out/model.onnx)")
    ap.add_argument("--count", type=positive_int, default=500, help="generated image files (default 500)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--threads", type=positive_int, default=None, help="default: as probres-infer's")
    ap.add_argument("--rounds", type=positive_int, default=5, help="alternating pairs (default 5)")
    ap.add_argument("--json", metavar="OUT", help="also write the figures here (atomically)")
    args = ap.parse_args(argv)
    threads = args.threads or default_threads()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="probres-api-speed-") as tmp:
        paths = [str(p) for p in build_image_set(Path(tmp) / "images", args.count)]
        out = Path(tmp) / "out.jsonl"
        try:
            clf = Classifier.open(args.engine, threads=args.threads)
        except Exception as e:  # noqa: BLE001 - a ProbresError: one line
            print(f"api_speed: error: {e}", file=sys.stderr)
            return 2
        with clf:
            api_rate(clf, paths[: 4 * args.batch_size], args.batch_size)        # warm-up: first-call costs
            infer_rate(args.engine, paths[: 4 * args.batch_size], args.batch_size, threads, out)
            cli, lib = [], []
            for r in range(args.rounds):
                if r % 2:                       # which goes first alternates too: no order bias
                    lib.append(api_rate(clf, paths, args.batch_size))
                cli.append(infer_rate(args.engine, paths, args.batch_size, threads, out))
                if not r % 2:
                    lib.append(api_rate(clf, paths, args.batch_size))
                print(f"round {r + 1}: probres-infer {cli[-1]:.1f} img/s, Classifier.predict {lib[-1]:.1f} img/s",
                      file=sys.stderr)
            backend = clf.describe()
    ratio = statistics.median(lib) / statistics.median(cli)
    rep = {"engine": args.engine, "backend": backend, "count": args.count, "batch_size": args.batch_size,
           "threads": threads, "rounds": args.rounds, "probres_infer_img_s": cli, "classifier_img_s": lib,
           "ratio": ratio, "target": TARGET, "passed": ratio >= TARGET, "machine": info}
    print(f"{info['cpu']}, {backend}, {args.count} images, batch {args.batch_size}, {threads} threads: "
          f"Classifier.predict {statistics.median(lib):.1f} img/s vs probres-infer {statistics.median(cli):.1f} img/s "
          f"(median of {args.rounds}): ratio {ratio:.3f} (target >= {TARGET})")
    if args.json:
        atomic_write_text(args.json, json.dumps(rep, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
