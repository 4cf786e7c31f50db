"""probres-infer: classify image files and folders with a TensorRT plan, an ONNX model or a checkpoint.

    probres-infer --engine model.onnx photos/ extra.jpg --format jsonl --output results.jsonl

MODEL by extension: .plan/.engine (TensorRT, with its .json sidecar), .onnx (ONNX Runtime),
.pt (PyTorch checkpoint; needs the training extra). Directories are walked recursively in
sorted order (JPEG, PNG, BMP, WebP, TIFF); files named explicitly are tried whatever their
extension. Decoding overlaps inference (runtime.pipeline); memory does not grow with the
number of images. A bad input gets an error record and one stderr line; the rest go on.
Exit status: 0 all classified, 1 some inputs failed, 2 usage or model error (one line, no
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import IO, Iterator

from runtime.backends import DEVICES, BackendError, open_backend
from runtime.pipeline import iter_batches, iter_image_paths
from runtime.report import FORMATS, Writer

PROG = "probres-infer"


def default_threads() -> int:
    """Decode/preprocess workers: every core, at most 8 (beyond that the engine is the bottleneck)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def top_k_arg(text: str) -> int | str:
    return "all" if text.strip().lower() == "all" else positive_int(text)


def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Multi-label classification of images (COCO labels).")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="model.plan / model.engine, model.onnx or best.pt")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or directories (walked recursively)")
    ap.add_argument("--format", choices=FORMATS, default="jsonl", help="output format (default: jsonl)")
    ap.add_argument("--threshold", type=probability, default=0.5, help="report labels with probability >= T (default 0.5)")
    ap.add_argument("--top-k", type=top_k_arg, default=None, metavar="K|all",
                    help="report the K most probable labels whatever their probability ('all': every label)")
    ap.add_argument("--output", "-o", metavar="FILE", help="write here (atomically) instead of stdout")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="images per inference call (default 16)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for decoding and for CPU inference (default: all cores, decoding at most 8)")
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto (GPU if the backend has one), cpu or cuda")
    return ap


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    from runtime.fileio import atomic_open
    with atomic_open(path, "w") as f:
        yield f


def _progress(total: int):
    """A tqdm bar on stderr when stderr is a terminal, else a no-op with the same calls."""
    from tqdm import tqdm
    return tqdm(total=total, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backend = open_backend(args.engine, device=args.device, threads=args.threads)
    except BackendError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    paths = list(iter_image_paths(args.paths))
    if not paths:
        print(f"{PROG}: error: no images found in {' '.join(args.paths)} "
              f"(directories are searched for .jpg .jpeg .png .bmp .webp .tif .tiff)", file=sys.stderr)
        backend.close()
        return 2
    top_k = backend.contract.labels.num_classes if args.top_k == "all" else args.top_k
    threads = args.threads or default_threads()
    n_ok = n_bad = 0
    t0 = time.perf_counter()
    try:
        with _open_output(args.output) as f, _progress(len(paths)) as bar:
            writer = Writer(f, args.format, backend.contract.labels, args.threshold, top_k)
            for batch in iter_batches(paths, backend.contract.preprocess, args.batch_size, threads):
                probs = backend.infer(batch.data) if len(batch.data) else None
                row = 0
                for path, err in zip(batch.paths, batch.errors):
                    if err is None:
                        writer.result(path, probs[row])
                        row += 1
                        n_ok += 1
                    else:
                        writer.error(path, err)
                        bar.write(f"{PROG}: {err}", file=sys.stderr)
                        n_bad += 1
                bar.update(len(batch.paths))
    except BackendError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted after {n_ok + n_bad} inputs" + (f"; {args.output} not written" if args.output else ""),
              file=sys.stderr)
        return 130
    except BrokenPipeError:                       # e.g. `probres-infer ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:                          # --output not writable
        print(f"{PROG}: error: cannot write {args.output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    dt = time.perf_counter() - t0
    print(f"{PROG}: {n_ok + n_bad} inputs, {n_ok} classified, {n_bad} failed in {dt:.1f} s "
          f"({(n_ok + n_bad) / max(dt, 1e-9):.1f} img/s) with {backend.describe()}", file=sys.stderr)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
