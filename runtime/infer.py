"""probres-infer: classify image files and folders with a TensorRT plan, an ONNX model or a checkpoint.

    probres-infer --engine model.onnx photos/ extra.jpg --format jsonl --output results.jsonl
    probres-infer --engine model.plan --from-list paths.txt --shard 0/4 --output part0.jsonl --resume
    probres-infer --engine model.onnx clip.mp4 --every 10      (videos, cameras, streams: runtime.video)

MODEL by extension: .plan/.engine (TensorRT, with its .json sidecar), .onnx (ONNX Runtime),
.pt (PyTorch checkpoint; needs the training extra). Directories are walked recursively in
sorted order (JPEG, PNG, BMP, WebP, TIFF); files named explicitly are tried whatever their
extension. Decoding overlaps inference (runtime.pipeline); memory does not grow with the
number of images, nor does the list of inputs: paths stream (runtime.inputs); a binary
--from-list file is refused. A bad input gets an error record and one stderr line; the rest go on.

Output (docs/outputs.md): stdout, or --output FILE ('-': stdout). The first line names the model
(file name, sha256) and the decision rule (runtime.provenance); then one record per input.
--output is never an input (runtime.outputs checks before the model loads); a regular file is
written batch by batch, each batch flushed whole, into a temp file renamed over FILE (a
symlink's target) at the end or on Ctrl-C, SIGTERM or SIGHUP (what was classified is kept); a
device or FIFO is written in place, never replaced. With --resume (JSONL only) FILE is appended
to and recorded images are skipped, so a killed run loses at most the batch in flight; a file
made by another model or decision rule is refused. FILE is locked while the run writes it: a
second run on the same file is refused.
Library use: main parses the flags into an InferJob (a frozen dataclass) and run(job) takes it;
nothing below main sees argparse. For Python, runtime.Classifier (docs/python.md) is simpler.
Exit status: 0 all classified, 1 some inputs failed, 2 usage, model or output error (one line,
no traceback), 128+signal when interrupted after keeping what was done: 130 Ctrl-C (SIGINT),
143 SIGTERM, 129 SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from runtime.api import default_threads
from runtime.backends import DEVICES, BackendError, add_backend_args, backend_options, open_backend
from runtime.cli import (job_header, lock_output, open_model, positive_int, probability,  # noqa: F401  (eval,
                         threshold_arg, top_k_arg, write_failed)                      # serve import them here)
from runtime.inputs import (DoneSet, InputError, check_list, find_in_list, iter_inputs, parse_shard, peek, read_done,
                            refuse_output, take_shard)
from runtime.outputs import (OutputError, ResultFile, check_outputs, exit_code, interrupted_by, model_inputs,
                             stop_on_signals)
from runtime.pipeline import classify, is_image_name
from runtime.provenance import describe, header_line, same_run
from runtime.report import FORMATS, Writer, decision_thresholds
from runtime.video import VideoOptions, add_video_args, run_video, wants_video

PROG = "probres-infer"


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
                    help="write here instead of stdout ('-': stdout; temp file renamed at the end; Ctrl-C, SIGTERM "
                         "and SIGHUP keep what was done)")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="images per inference call (default 16)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for decoding and for CPU inference (default: all cores, decoding at most 8)")
    ap.add_argument("--device", choices=DEVICES, default="auto", help="auto (GPU if the backend has one), cpu or cuda")
    add_backend_args(ap)
    add_video_args(ap)                            # video files, cameras and streams: runtime.video
    return ap


@dataclass(frozen=True)
class InferJob:
    """One probres-infer run, as its flags give it (main parses them; everything below takes this)."""

    engine: str                                 # --engine MODEL
    paths: tuple[str, ...] = ()                 # PATH ...
    from_list: str | None = None                # --from-list FILE ('-': stdin)
    shard: str = "0/1"                          # --shard I/N
    resume: bool = False
    format: str = "jsonl"
    threshold: str | float | None = None        # "contract", a probability, or None (the default rule)
    top_k: int | str | None = None              # K, "all" or None
    output: str | None = None                   # None: stdout ('-' on the command line)
    batch_size: int = 16
    threads: int | None = None
    device: str = "auto"
    backend_options: Mapping[str, Any] = field(default_factory=dict)   # open_backend's backend= and options
    video: VideoOptions = field(default_factory=VideoOptions)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "InferJob":
        """The job build_parser's flags describe (only converts)."""
        return cls(engine=ns.engine, paths=tuple(ns.paths), from_list=ns.from_list, shard=ns.shard, resume=ns.resume,
                   format=ns.format, threshold=ns.threshold, top_k=ns.top_k,
                   output=None if ns.output == "-" else ns.output, batch_size=ns.batch_size, threads=ns.threads,
                   device=ns.device, backend_options=backend_options(**vars(ns)), video=VideoOptions.from_args(ns))


def _progress():
    """A tqdm bar (count and rate; no total: inputs stream) on stderr when it is a terminal, else a no-op."""
    from tqdm import tqdm
    return tqdm(unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def check_args(job: InferJob, hold: contextlib.ExitStack) -> tuple[Iterator[str], DoneSet | None, dict | None]:
    """Everything that can fail before the model loads (InputError/OutputError: one line, exit 2).

    Returns the input stream (shard and resume applied), the resume bookkeeping (or None) and the
    provenance header (None if the model cannot be read: loading it then says why). The output's
    lock is entered on `hold`, before --resume reads the file.
    """
    if not job.paths and job.from_list is None:
        raise InputError("give image files or directories (PATH ...) and/or --from-list FILE")
    shard = parse_shard(job.shard)
    if job.resume and (job.output is None or job.format != "jsonl"):
        raise InputError("--resume appends to a JSONL file: it needs --output FILE and --format jsonl")
    check_list(job.from_list)
    listed = [] if job.from_list in (None, "-") else [("--from-list", job.from_list)]
    check_outputs([("--output", job.output)],
                  [*model_inputs("--engine", job.engine), *listed, *(("PATH", p) for p in job.paths)],
                  reads=is_image_name, append=["--output"] if job.resume else [])
    if job.output and os.path.isfile(job.output) and listed:
        hit = find_in_list(job.from_list, job.output)        # one pass over the list, before any work
        if hit:
            raise InputError(f"--output {job.output} is the same file as --from-list {job.from_list} "
                             f"line {hit[0]}: {hit[1]}: refusing to overwrite an input")
    source = peek(iter_inputs(job.paths, job.from_list))
    if source is None:
        where = " ".join(list(job.paths) + ([f"--from-list {job.from_list}"] if job.from_list else []))
        raise InputError(f"no images found in {where} "
                         f"(directories are searched for .jpg .jpeg .png .bmp .webp .tif .tiff)")
    source = take_shard(source, *shard)
    if job.output and os.path.isfile(job.output):
        source = refuse_output(source, job.output)           # stdin entries: nothing listed them beforehand
    lock_output(hold, job.output)
    head = job_header(job)
    done = read_done(job.output) if job.resume else None
    if done is not None:
        if done.header is None and len(done):
            raise InputError(f"--resume: {job.output} has no provenance header (an older probres-infer wrote it): "
                             f"nothing says which model made it; write to a new --output")
        if done.header is not None and head is not None and not same_run(done.header, head):
            raise InputError(f"--resume: {job.output} was made by {describe(done.header)}; this run is "
                             f"{describe(head)}: one file never mixes two; write to a new --output")
        if done.dropped_bytes:
            print(f"{PROG}: {job.output}: dropped an unfinished last line ({done.dropped_bytes} bytes) "
                  f"left by a killed run; that image is classified again", file=sys.stderr)
        source = done.skip_done(source)
    return source, done, head


def main(argv: list[str] | None = None) -> int:
    job = InferJob.from_args(build_parser().parse_args(argv))
    with stop_on_signals(), contextlib.ExitStack() as hold:     # SIGTERM, SIGHUP: as Ctrl-C
        if wants_video(job.paths, job.video):     # a video, stream or camera in the run (docs/video.md)
            return run_video(job, hold, PROG)
        return run(job, hold)


def run(job: InferJob, hold: contextlib.ExitStack) -> int:
    """The run after argument parsing; the output's lock is held on `hold`."""
    try:
        paths, done, head = check_args(job, hold)
    except (InputError, OutputError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted{interrupted_by(e)} before the first input", file=sys.stderr)
        return exit_code(e)
    backend = open_model(job, PROG, open_backend)   # this module's name for it: tests spy on it here
    if isinstance(backend, int):
        return backend
    top_k = backend.contract.labels.num_classes if job.top_k == "all" else job.top_k
    threads = job.threads or default_threads()
    n_ok = n_bad = 0
    out: ResultFile | None = None
    t0 = time.perf_counter()
    try:
        with ResultFile(job.output, append=job.resume) as out, _progress() as bar:
            thresholds, decided_by = decision_thresholds(backend.contract, job.threshold, top_k)
            if head is not None and (done is None or done.header is None):
                out.write(header_line(head, job.format))     # which model and rule made every record below
            writer = Writer(out, job.format, backend.contract.labels, thresholds, top_k, decided_by)
            out.end_batch()                       # the provenance and csv headers
            # Preprocessed straight into the backend's own buffers; batch k+1 submitted before k is waited for.
            for batch, probs in classify(backend, paths, job.batch_size, threads):
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
        untouched = isinstance(e, InputError) and not job.resume and job.output is not None
        print(f"{PROG}: error: {e}" + (f"; {job.output} left as it was" if untouched else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:               # Ctrl-C, SIGTERM or SIGHUP (stop_on_signals)
        kept = ""
        if out is not None and job.output:
            kept = f"; {out.kept} records kept in {job.output}" + (
                " (finish with the same command plus --resume)" if job.format == "jsonl" else "")
        print(f"{PROG}: interrupted{interrupted_by(e)} after {n_ok + n_bad} inputs{kept}", file=sys.stderr)
        return exit_code(e)
    except OSError as e:                          # a closed pipe (`| head`), --output not writable
        return write_failed(e, job.output, PROG)
    finally:
        backend.close()
    dt = time.perf_counter() - t0
    skipped = f" ({done.skipped} already in {job.output} skipped)" if done is not None else ""
    print(f"{PROG}: {n_ok + n_bad} inputs{skipped}, {n_ok} classified, {n_bad} failed in {dt:.1f} s "
          f"({(n_ok + n_bad) / max(dt, 1e-9):.1f} img/s) with {backend.describe()}", file=sys.stderr)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
