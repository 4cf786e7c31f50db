"""probres-batch: label a directory, list file or glob on a Ray cluster, each input exactly once.

    probres-batch --engine model.onnx --input photos/ --output labels/ --address local --actors 2 --threads 1
    probres-batch --engine model.plan --input 'bucket/**/*.jpg' --output labels/ --address auto \
        --actors 8 --gpus-per-actor 1 --batch-size 64 --resume

The inputs are planned into OUT_DIR/_inputs.txt and cut into chunks of --chunk-size (runtime.batch_plan);
on Ray Data, read tasks read each chunk's files and an actor pool labels the chunks, each into its own
file (runtime.batch_ray). Inputs and OUT_DIR may be URIs (s3://, gs://, file://: runtime.batch_fs). Records
are probres-infer's JSONL records (with "probs", every label's probability, under --all-probs),
in Parquet (default) or JSONL files. OUT_DIR/_SUCCESS, written last, lists every file and its
record count: until it exists the output is incomplete. A killed run is finished by the same
command plus --resume, which skips the chunks already written. docs/batch.md has the cluster how-to.
Exit status: 0 done (error records included: an unreadable image never fails the job), 2 usage,
model or output-directory error (one line), 130 interrupted (finish with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from runtime import batch_plan
from runtime.backends import BackendError, open_backend
from runtime.backends.base import Backend
from runtime.batch_fs import Location, last_line
from runtime.fileio import sha256_file
from runtime.infer import default_threads, positive_int
from runtime.inputs import InputError
from runtime.outputs import OutputError, check_writable

PROG = "probres-batch"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Batch labelling on Ray Data, each input exactly once.")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="model.onnx, model.plan or best.pt")
    ap.add_argument("--input", required=True, metavar="DIR|LIST_FILE|GLOB",
                    help="a directory (walked recursively in sorted order), a file with one path a line, or a glob "
                         "('**' for any depth; quote it)")
    ap.add_argument("--output", "-o", required=True, metavar="OUT_DIR", help="a new (or empty) directory")
    ap.add_argument("--address", default="local", metavar="auto|local|HOST:PORT",
                    help="Ray cluster: local (a private Ray on this machine, the default), auto (the one "
                         "`ray start` runs here) or the head's HOST:PORT")
    ap.add_argument("--actors", type=positive_int, default=1, help="model replicas (Ray actors), default 1")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                    help="GPUs each actor reserves (0: CPU inference, the default; 1: one GPU each; 0.5: two per GPU)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="decode (and CPU inference) threads per actor (default: the driver's cores / --actors)")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="images per inference call (default 16)")
    ap.add_argument("--chunk-size", type=positive_int, default=1024,
                    help="inputs per output file, the unit of retry and resume (default 1024)")
    ap.add_argument("--format", choices=tuple(batch_plan.EXTENSIONS), default="parquet", help="default: parquet")
    ap.add_argument("--all-probs", action="store_true", help="also every label's probability (\"probs\")")
    ap.add_argument("--resume", action="store_true",
                    help="finish the job OUT_DIR holds (same command), skipping the chunks already written")
    return ap


def check_model(path: str, gpus: float) -> None:
    """BackendError unless this machine can load MODEL (one line, before any chunk runs); a TensorRT plan
    on a driver without a GPU is only checked for its file and sidecar (the actors load it)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".plan", ".engine") and gpus:
        for p in (path, path + ".json"):
            if not os.path.isfile(p):
                raise BackendError(f"{p}: no such file")
        return
    backend: Backend = open_backend(path, device="cpu", threads=1)
    backend.close()


def plan_job(engine: str, inputs: str, out: Location, chunk_size: int, fmt: str, all_probs: bool,
             resume: bool) -> tuple[batch_plan.Plan, dict]:
    """The plan and manifest of the job (new, or the one `out` holds under `resume`); InputError otherwise.

    engine: the model file; inputs: --input (a directory, list file or glob; a URI: a prefix or a
    list file); chunk_size, fmt ('parquet' or 'jsonl'), all_probs: as the command's flags."""
    batch_plan.input_kind(inputs)
    manifest = {"input": inputs, "cwd": os.getcwd(), "model": os.path.abspath(engine),
                "model_sha256": sha256_file(engine), "chunk_size": chunk_size, "format": fmt,
                "all_probs": all_probs}
    try:
        old = batch_plan.check_out_dir(out, manifest, resume)
    except OSError as e:                       # an object store that cannot be listed (credentials, bucket)
        raise InputError(f"--output {out.name}: {last_line(e)}") from None
    if old is not None:
        plan = batch_plan.scan_plan(out, chunk_size)
        if plan.sha256 != old.get("plan_sha256"):
            raise InputError(f"{out.shown(batch_plan.PLAN)}: changed since the job was planned; give a new directory")
        return plan, old
    if out.fs is None:
        check_writable("--output", os.path.join(out.path, batch_plan.MANIFEST))
    out.makedirs()
    n = batch_plan.write_plan(batch_plan.iter_input(inputs), out)
    if n == 0:
        out.remove(batch_plan.PLAN)
        raise InputError(f"--input {inputs}: no images found")
    plan = batch_plan.scan_plan(out, chunk_size)
    manifest.update(plan_sha256=plan.sha256, inputs=plan.count, chunks=len(plan))
    batch_plan.write_manifest(out, manifest)         # from here on the plan is frozen
    return plan, manifest


def ray_error(e: BaseException) -> str:
    """One line for a Ray failure: the BackendError an actor raised loading the model, else the last line."""
    todo, seen = [e], set()
    while todo:                        # Ray wraps a worker's exception (RayTaskError.cause, __cause__)
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, BackendError):
            return str(x)
        todo += [c for c in (getattr(x, "cause", None), x.__cause__, x.__context__) if isinstance(c, BaseException)]
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"Ray: {type(e).__name__}: {lines[-1] if lines else ''}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpus_per_actor < 0:
        print(f"{PROG}: error: --gpus-per-actor must be >= 0", file=sys.stderr)
        return 2
    threads = args.threads or max(1, default_threads() // args.actors)
    try:
        if not os.path.isfile(args.engine):    # the full load (check_model) overlaps Ray's start, below
            raise BackendError(f"{args.engine}: no such model file")
        out = Location.of(args.output)
        if out.fs is None:                     # the actors may run in another directory (cwd) or node
            out = Location(os.path.abspath(args.output), None, args.output)
        created, had = out.kind() == "missing", set(out.names())
        plan, manifest = plan_job(args.engine, args.input, out, args.chunk_size, args.format, args.all_probs,
                                  args.resume)
    except (InputError, OutputError, BackendError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:         # pyarrow: a URI it cannot resolve or reach
        print(f"{PROG}: error: --output {args.output}: {last_line(e)}", file=sys.stderr)
        return 2
    written = set(out.names())
    if batch_plan.SUCCESS in written:
        print(f"{PROG}: {args.output}: already complete ({plan.count} inputs, see {batch_plan.SUCCESS})",
              file=sys.stderr)
        return 0
    pending = [i for i in range(len(plan)) if plan.part_name(i, args.format) not in written]
    job = {"model": manifest["model"], "cwd": manifest["cwd"], "out": out, "format": args.format,
           "all_probs": args.all_probs,
           "batch_size": args.batch_size, "threads": threads,
           "device": "auto" if args.gpus_per_actor else "cpu"}     # auto: the GPU Ray gave the actor
    t0 = time.perf_counter()
    n = bad = 0
    devices: set[str] = set()
    first: list[float] = []                  # when the first file of this run was written (startup cost)
    if pending:
        import ray

        from runtime import batch_ray
        checking = ThreadPoolExecutor(1).submit(check_model, args.engine, args.gpus_per_actor)
        try:
            batch_ray.connect(args.address)    # seconds: the driver's model check runs meanwhile
            checking.result()
            n, bad, devices = batch_ray.run(job, plan, pending, args.actors, args.gpus_per_actor,
                                   progress=lambda row: first or first.append(time.perf_counter() - t0))
        except BackendError as e:               # a model this machine cannot load, too few GPUs: as if never started
            if batch_plan.MANIFEST not in had:
                batch_plan.discard(out, created)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; finish with the same command plus --resume", file=sys.stderr)
            return 130
        except Exception as e:     # Ray's errors have many types; each becomes one line
            print(f"{PROG}: error: {ray_error(e)}; finish with the same command plus --resume", file=sys.stderr)
            return 2
        finally:
            ray.shutdown()
    try:
        total = batch_plan.finish(out, plan, args.format)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    skipped = len(plan) - len(pending)
    print(f"{PROG}: {total} inputs in {len(plan)} files in {args.output} ({skipped} already there); this run: "
          f"{n} labelled, {bad} failed, in {dt:.1f} s ({n / max(dt, 1e-9):.1f} img/s"
          + (f"; first file after {first[0]:.1f} s" if first else "") + ")"
          + (f"; actors' CUDA_VISIBLE_DEVICES: {' '.join(sorted(devices))}" if args.gpus_per_actor else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
