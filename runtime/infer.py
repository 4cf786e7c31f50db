"""probres-infer: classify image files and folders with a TensorRT plan, an ONNX model or a checkpoint.

    probres-infer --engine model.onnx photos/ extra.jpg --format jsonl --output results.jsonl
    probres-infer --engine model.plan --from-list paths.txt --shard 0/4 --output part0.jsonl --resume
    probres-infer --engine model.onnx clip.mp4 --every 10      (videos, cameras, streams: runtime.video)

MODEL by extension: .plan/.engine (TensorRT, with its .json sidecar), .onnx (ONNX Runtime),
.pt (PyTorch checkpoint; needs the training extra). Directories are walked recursively in
sorted order (JPEG, PNG, BMP, WebP, TIFF); files named explicitly are tried whatever their
extension. Decoding overlaps inference (runtime.pipeline); memory does not grow with the
number of images, nor does the list of inputs: paths stream (runtime.inputs). A bad input
gets an error record and one stderr line; the rest go on. --output is never an input
(runtime.outputs checks before the model loads); it is written batch by batch, each batch
flushed whole, into a temp file renamed over FILE at the end or on Ctrl-C (what was
classified is kept); with --resume (JSONL only) it is appended to and recorded images are
skipped, so a killed run loses at most the batch in flight.
Exit status: 0 all classified, 1 some inputs failed, 2 usage or model error (one line, no
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator

import numpy as np

from runtime.backends import DEVICES, BackendError, add_backend_args, backend_options, open_backend
from runtime.contract import DEFAULT_THRESHOLD
from runtime.inputs import (DoneSet, InputError, check_list, find_in_list, iter_inputs, parse_shard, peek, read_done,
                            refuse_output, take_shard)
from runtime.outputs import OutputError, ResultFile, check_outputs, model_inputs
from runtime.pipeline import classify, is_image_name
from runtime.report import FORMATS, Writer
from runtime.video import add_video_args, run_video, wants_video

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


def threshold_arg(text: str) -> str | float:
    """--threshold: 'contract' (the model's per-label thresholds) or one probability for every label."""
    return "contract" if text.strip().lower() == "contract" else probability(text)


def decision_thresholds(contract, threshold: str | float | None, top_k: int | None
                        ) -> tuple[np.ndarray | None, str | float | None]:
    """((C,) thresholds or None, what decided) from --threshold and --top-k.

    Neither given: the contract's thresholds ("contract"; 0.5 per label for a model without
    them). --top-k alone: no threshold (the K most probable). A number: that, for every label.
    """
    if threshold is None and top_k is not None:
        return None, None
    if threshold in (None, "contract"):
        return np.asarray(contract.decision_thresholds(), dtype=np.float64), (
            "contract" if contract.thresholds is not None else DEFAULT_THRESHOLD)
    return np.full(contract.labels.num_classes, float(threshold)), float(threshold)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Multi-label classification of images (COCO labels).")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="model.plan / model.engine, model.onnx or best.pt")
    ap.add_argument("paths", nargs="*", metavar="PATH", help="image files and/or directories (walked recursively)")
    ap.add_argument("--from-list", metavar="FILE", help="also classify the paths in FILE, one a line ('-': stdin)")
    ap.add_argument("--shard", metavar="I/N", default="0/1",
                    help="only the inputs whose path hash is I mod N (I in 0..N-1): N runs cover each input once")
    ap.add_argument("--resume", action="store_true",
                    help="append to the --output JSONL, skipping the images already recorded in it")
    ap.add_argument("--format", choices=FORMATS, default="jsonl", help="output format (default: jsonl)")
    ap.add_argument("--threshold", type=threshold_arg, default=None, metavar="contract|T",
                    help="report labels whose probability reaches the model contract's per-label threshold "
                         "('contract', the default; 0.5 for a model without thresholds) or T for every label")
    ap.add_argument("--top-k", type=top_k_arg, default=None, metavar="K|all",
                    help="alone: the K most probable labels whatever their probability ('all': every label); "
                         "with --threshold: the K most probable of those that pass it")
    ap.add_argument("--output", "-o", metavar="FILE",
                    help="write here instead of stdout (temp file renamed at the end; Ctrl-C keeps what was done)")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="images per inference call (default 16)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for decoding and for CPU inference (default: all cores, decoding at most 8)")
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto (GPU if the backend has one), cpu or cuda")
    add_backend_args(ap)
    add_video_args(ap)                            # video files, cameras and streams: runtime.video
    return ap


def _progress():
    """A tqdm bar (count and rate; no total: inputs stream) on stderr when it is a terminal, else a no-op."""
    from tqdm import tqdm
    return tqdm(unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def check_args(args: argparse.Namespace) -> tuple[Iterator[str], DoneSet | None]:
    """Everything that can fail before the model loads (InputError/OutputError: one line, exit 2).

    Returns the input stream (shard and resume applied) and the resume bookkeeping (or None).
    """
    if not args.paths and args.from_list is None:
        raise InputError("give image files or directories (PATH ...) and/or --from-list FILE")
    shard = parse_shard(args.shard)
    if args.resume and (args.output is None or args.format != "jsonl"):
        raise InputError("--resume appends to a JSONL file: it needs --output FILE and --format jsonl")
    check_list(args.from_list)
    listed = [] if args.from_list in (None, "-") else [("--from-list", args.from_list)]
    check_outputs([("--output", args.output)],
                  [*model_inputs("--engine", args.engine), *listed, *(("PATH", p) for p in args.paths)],
                  reads=is_image_name, append=["--output"] if args.resume else [])
    if args.output and os.path.isfile(args.output) and listed:
        hit = find_in_list(args.from_list, args.output)        # one pass over the list, before any work
        if hit:
            raise InputError(f"--output {args.output} is the same file as --from-list {args.from_list} "
                             f"line {hit[0]}: {hit[1]}: refusing to overwrite an input")
    source = peek(iter_inputs(args.paths, args.from_list))
    if source is None:
        where = " ".join(args.paths + ([f"--from-list {args.from_list}"] if args.from_list else []))
        raise InputError(f"no images found in {where} "
                         f"(directories are searched for .jpg .jpeg .png .bmp .webp .tif .tiff)")
    source = take_shard(source, *shard)
    if args.output and os.path.isfile(args.output):
        source = refuse_output(source, args.output)           # stdin entries: nothing listed them beforehand
    done = read_done(args.output) if args.resume else None
    if done is not None:
        if done.dropped_bytes:
            print(f"{PROG}: {args.output}: dropped an unfinished last line ({done.dropped_bytes} bytes) "
                  f"left by a killed run; that image is classified again", file=sys.stderr)
        source = done.skip_done(source)
    return source, done


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if wants_video(args):                         # a video, stream or camera in the run (docs/video.md)
        return run_video(args, PROG)
    try:
        paths, done = check_args(args)
    except (InputError, OutputError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before the first input", file=sys.stderr)
        return 130
    try:
        backend = open_backend(args.engine, device=args.device, threads=args.threads, **backend_options(args))
    except BackendError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                     # loading can take minutes (--compile, a big plan)
        print(f"{PROG}: interrupted while loading {args.engine}", file=sys.stderr)
        return 130
    top_k = backend.contract.labels.num_classes if args.top_k == "all" else args.top_k
    threads = args.threads or default_threads()
    n_ok = n_bad = 0
    out: ResultFile | None = None
    t0 = time.perf_counter()
    try:
        with ResultFile(args.output, append=args.resume) as out, _progress() as bar:
            thresholds, decided_by = decision_thresholds(backend.contract, args.threshold, top_k)
            writer = Writer(out, args.format, backend.contract.labels, thresholds, top_k, decided_by)
            out.end_batch()                       # the csv header
            # Preprocessed straight into the backend's own buffers; batch k+1 submitted before k is waited for.
            for batch, probs in classify(backend, paths, args.batch_size, threads):
                row = 0
                for path, err in zip(batch.paths, batch.errors):
                    if err is None:
                        writer.result(path, probs[row])
                        row += 1
                        n_ok += 1
                    else:
                        writer.error(path.partition("\0")[0], err)   # an unlistable directory: "DIR\0why"
                        bar.write(f"{PROG}: {err}", file=sys.stderr)
                        n_bad += 1
                out.end_batch(len(batch.paths))   # this batch's records, in one write, flushed
                bar.update(len(batch.paths))
    except (BackendError, InputError, MemoryError) as e:    # MemoryError: the batch buffers (names --batch-size)
        untouched = isinstance(e, InputError) and not args.resume
        print(f"{PROG}: error: {e}" + (f"; {args.output} left as it was" if untouched else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = ""
        if out is not None and args.output:
            kept = f"; {out.kept} records kept in {args.output}" + (
                " (finish with the same command plus --resume)" if args.format == "jsonl" else "")
        print(f"{PROG}: interrupted after {n_ok + n_bad} inputs{kept}", file=sys.stderr)
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
    skipped = f" ({done.skipped} already in {args.output} skipped)" if done is not None else ""
    print(f"{PROG}: {n_ok + n_bad} inputs{skipped}, {n_ok} classified, {n_bad} failed in {dt:.1f} s "
          f"({(n_ok + n_bad) / max(dt, 1e-9):.1f} img/s) with {backend.describe()}", file=sys.stderr)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
