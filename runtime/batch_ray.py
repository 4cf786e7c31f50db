"""probres-batch's Ray part: chunk descriptors -> an actor pool that labels a chunk and writes its file.

    probres-batch --engine model.onnx --input photos/ --output out/ --address local --actors 2

The dataset is one row per pending chunk (index, byte offset, count, hash: never the paths).
A first map_batches stage of plain Ray tasks (read_chunk_files, a fraction of a CPU each, a few
at a time) reads the chunk's paths from the plan and each file's bytes (an unreadable file: its
error, worded as probres-infer words it), local paths or URIs (runtime.batch_fs). The second hands
each chunk to a callable-class actor (ChunkLabeler): it loads the model once, decodes and
classifies the bytes through probres-infer's own pipeline (runtime.pipeline.classify), builds
probres-infer's records (runtime.report.record, error_record: what its Writer writes), and writes
the chunk's file (whole or not at all).
Ray Data restarts a killed actor and retries its chunk (max_restarts / max_task_retries -1 by
default), and retries a failed read task; a rerun rewrites the same file, so nothing is counted twice.
Ray is imported only here, and only by probres-batch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from runtime import batch_plan
from runtime.backends import BackendError
from runtime.batch_fs import Location, read_input

RECORD_FIELDS = ("image", "threshold", "predictions", "error")
READ_CPUS = 0.25               # Ray CPUs a read task reserves: reading bytes barely uses one
READ_THREADS = 8               # files a read task reads at once (an object store's latency, not a CPU, bounds it)


def parquet_schema(all_probs: bool):
    """Arrow schema of a record: probres-infer's JSONL fields, a null where a record has none.

    One type per column: "threshold" is a string ("contract", or the number as text, e.g. "0.5")."""
    import pyarrow as pa
    pred = pa.struct([("label", pa.string()), ("category_id", pa.int64()), ("probability", pa.float64()),
                      ("threshold", pa.float64())])
    fields = [("image", pa.string()), ("threshold", pa.string()), ("predictions", pa.list_(pred)),
              ("error", pa.string())]
    return pa.schema(fields + ([("probs", pa.list_(pa.float32()))] if all_probs else []))


class ReusedBuffers:
    """A backend whose allocate_inputs hands every chunk the same buffers.

    classify() allocates its input buffers once per run, and a backend keeps every allocation
    until close(): one run per chunk would grow an actor by batch x 5 images a chunk (190 MB at
    448 px and batch 16) for the whole job. Chunks run one at a time in an actor, and classify
    has waited for every batch before it returns, so reusing them is safe."""

    def __init__(self, backend) -> None:
        self._backend, self._buffers = backend, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def allocate_inputs(self, batch_size: int, count: int) -> list[np.ndarray]:
        key = (batch_size, count)
        if key not in self._buffers:
            self._buffers[key] = self._backend.allocate_inputs(batch_size, count)
        return self._buffers[key]


def read_chunk_files(rows: dict[str, np.ndarray], out: Location) -> "pyarrow.Table":
    """Ray Data's read stage: each chunk row -> its paths, each file's bytes (or its error message)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    cache: dict = {}
    cols: dict[str, list] = {"chunk": [], "hash": [], "paths": [], "data": [], "error": []}
    for i, offset, nbytes, count, digest in zip(rows["chunk"], rows["offset"], rows["nbytes"], rows["count"],
                                                rows["hash"]):
        paths = batch_plan.read_chunk(out, int(offset), int(nbytes), int(count), str(digest))
        with ThreadPoolExecutor(READ_THREADS) as pool:
            got = list(pool.map(lambda p: read_input(p, cache), paths))
        cols["chunk"].append(int(i))
        cols["hash"].append(str(digest))
        cols["paths"].append(paths)
        cols["data"].append([g if isinstance(g, bytes) else None for g in got])
        cols["error"].append([None if isinstance(g, bytes) else str(g) for g in got])
    return pa.table(cols, schema=pa.schema([("chunk", pa.int64()), ("hash", pa.string()),
                                            ("paths", pa.list_(pa.string())),
                                            ("data", pa.large_list(pa.large_binary())),
                                            ("error", pa.list_(pa.string()))]))


class ChunkLabeler:
    """One model per actor; __call__ labels the read stage's chunks and writes one file per chunk."""

    def __init__(self, job: dict[str, Any]) -> None:
        from runtime.backends import open_backend
        from runtime.infer import decision_thresholds

        if job["cwd"] and os.path.isdir(job["cwd"]):
            os.chdir(job["cwd"])                 # relative inputs resolve as they did for the driver
        self.job = job
        self.out: Location = job["out"]
        self.backend = ReusedBuffers(open_backend(job["model"], device=job["device"], threads=job["threads"]))
        contract = self.backend.contract
        self.labels = contract.labels
        self.thresholds, self.decided = decision_thresholds(contract, None, None)     # never None: no --top-k

    def label(self, paths: list[str], sources: list) -> Iterator[tuple[dict, bool]]:
        """(probres-infer's JSONL record, failed) for each of `paths`, in order (plus "probs" with --all-probs).

        sources[i]: paths[i]'s bytes, or the ImageDecodeError the read stage met."""
        from runtime.pipeline import classify
        from runtime.report import error_record, record
        job = self.job
        for batch, probs in classify(self.backend, sources, job["batch_size"], job["threads"]):
            row = 0
            for k, err in enumerate(batch.errors):
                path = paths[batch.start + k]
                if err is None:
                    rec = record(path, probs[row], self.labels, self.thresholds, None, self.decided)
                    if job["all_probs"]:
                        rec["probs"] = [round(float(p), 6) for p in probs[row]]
                    row += 1
                else:
                    if isinstance(sources[batch.start + k], bytes) and err.startswith("<"):   # "<N bytes>: ..."
                        err = path + err[err.index(">") + 1:]
                    rec = error_record(path.partition("\0")[0], err)
                yield rec, err is not None

    def write(self, name: str, records: list[dict]) -> None:
        """The chunk's file, whole (a rerun of the chunk replaces it with the same)."""
        if self.job["format"] == "jsonl":
            with self.out.write(name, text=True) as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = parquet_schema(self.job["all_probs"])
        rows = [{**r, "threshold": repr(float(r["threshold"]))}        # "contract", or the number that decided
                if isinstance(r.get("threshold"), (int, float)) else r for r in records]   # (0.5 without a contract's)
        table = pa.Table.from_pylist(rows, schema=schema)
        with self.out.write(name) as f:
            pq.write_table(table, f)

    def __call__(self, chunks: "pyarrow.Table") -> dict[str, np.ndarray]:
        from runtime.preprocess import ImageDecodeError
        job = self.job
        names, records, errors = [], [], []
        for c in chunks.to_pylist():
            paths = c["paths"]
            sources = [d if d is not None else ImageDecodeError(e) for d, e in zip(c["data"], c["error"])]
            done = list(self.label(paths, sources))
            if len(done) != len(paths):          # never a short file: fail the chunk (finish --resume redoes it)
                raise RuntimeError(f"chunk {c['chunk']}: {len(done)} records for {len(paths)} inputs")
            name = batch_plan.part_name(c["chunk"], c["hash"], job["format"])
            self.write(name, [rec for rec, _ in done])
            names.append(name)
            records.append(len(done))
            errors.append(sum(failed for _, failed in done))
        return {"file": np.array(names), "records": np.array(records), "errors": np.array(errors),
                # the GPUs Ray gave this actor (num_gpus): the driver reports them
                "gpus": np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "")] * len(names))}


def cpus_per_actor(total_cpus: float, actors: int, threads: int, gpus: float) -> float:
    """Ray CPUs each actor reserves: its threads, but all actors together leave the read tasks their share.

    A CPU in Ray is a scheduling token. Actors that reserve every CPU starve the read tasks (the
    issue's deadlock: two 1-CPU actors on num_cpus=2 plus a read task wait for ever), so the
    read tasks (one per actor, READ_CPUS each) always fit beside them; GPU actors reserve one CPU
    each for their decode threads, at most what is there."""
    want = 1.0 if gpus else float(threads)
    room = (total_cpus - READ_CPUS * actors) / actors
    if room <= 0:
        raise ValueError(f"--actors {actors}: the cluster has {total_cpus:g} CPUs")
    return round(min(want, room), 2)


def connect(address: str, quiet: bool = True) -> None:
    """ray.init for --address: 'local' starts a private Ray on this machine, else auto / HOST:PORT."""
    import logging

    import ray
    import ray.data  # noqa: F401  (seconds: the driver's model check runs meanwhile, see runtime.batch)
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "configure_logging": True,
                              "logging_level": "warning" if quiet else "info"}
    if address == "local":
        ray.init(include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    if quiet:                                  # Ray Data's INFO lines (execution plans, log paths) on stderr
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def dataset(job: dict[str, Any], plan: "batch_plan.Plan", pending: list[int], actors: int, gpus: float):
    """The job's Ray Dataset (not run yet): chunk rows -> read tasks -> the labelling actors' file rows."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_consecutive_actor_init_deaths = 2          # a model no actor can load: fail fast, not for ever
    resources = ray.cluster_resources()
    total = float(resources.get("CPU", 1.0))
    have = float(resources.get("GPU", 0.0))
    if gpus and have < gpus * actors:           # Ray would wait for them for ever
        raise BackendError(f"--actors {actors} x --gpus-per-actor {gpus:g} needs {gpus * actors:g} GPUs; the "
                         f"cluster has {have:g} (start the GPU workers first)")
    ncpu = cpus_per_actor(total, actors, job["threads"], gpus)
    items = [plan.chunk(i) for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # read tasks at once: one per actor (each reads READ_THREADS files at a time; a read task is a worker
    # process that imports Ray Data, seconds of a job's start on a small machine)
    ds = ds.map_batches(read_chunk_files, batch_size=1, batch_format="numpy", fn_kwargs={"out": job["out"]},
                        num_cpus=READ_CPUS, compute=ray.data.TaskPoolStrategy(size=actors))
    ds = ds.map_batches(ChunkLabeler, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"job": job}, num_cpus=ncpu, num_gpus=gpus or None)
    return ds


def run(job: dict[str, Any], plan: "batch_plan.Plan", pending: list[int], actors: int, gpus: float,
        progress=None) -> tuple[int, int, set[str]]:
    """Label the `pending` chunks of `plan` on the connected Ray; returns (records, error records) done
    now and the actors' CUDA_VISIBLE_DEVICES values."""
    n = bad = 0
    devices = set()
    for row in dataset(job, plan, pending, actors, gpus).iter_rows():
        n += int(row["records"])
        bad += int(row["errors"])
        devices.add(str(row["gpus"]))
        if progress is not None:
            progress(row)
    return n, bad, devices
