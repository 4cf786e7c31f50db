"""probres-batch's Ray part: chunk descriptors -> an actor pool that labels a chunk and writes its file.

    probres-batch --engine model.onnx --input photos/ --output out/ --address local --actors 2

The dataset is one row per pending chunk (index, byte offset, count, hash: never the paths).
map_batches hands each row to a callable-class actor (ChunkLabeler): it loads the model once,
reads the chunk's paths from the plan file, decodes and classifies them through probres-infer's
own pipeline (runtime.pipeline.classify: the image reads run in the actor's decode threads),
formats the records with probres-infer's Writer, and writes the chunk's file (temp, then rename).
Ray Data restarts a killed actor and retries its chunk (max_restarts / max_task_retries -1 by
default); the rerun rewrites the same file, so nothing is counted twice.
Ray is imported only here, and only by probres-batch.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator

import numpy as np

from runtime import batch_plan
from runtime.fileio import atomic_open

RECORD_FIELDS = ("image", "threshold", "predictions", "error")


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


class ChunkLabeler:
    """One model per actor; __call__ labels a batch of chunk rows and writes one file per chunk."""

    def __init__(self, job: dict[str, Any]) -> None:
        from runtime.backends import open_backend
        from runtime.infer import decision_thresholds
        from runtime.report import Writer

        if job["cwd"] and os.path.isdir(job["cwd"]):
            os.chdir(job["cwd"])                 # relative inputs resolve as they did for the driver
        self.job = job
        self.backend = ReusedBuffers(open_backend(job["model"], device=job["device"], threads=job["threads"]))
        contract = self.backend.contract
        thresholds, decided = decision_thresholds(contract, None, None)
        self.text = io.StringIO()
        self.writer = Writer(self.text, "jsonl", contract.labels, thresholds, None, decided)

    def label(self, paths: list[str]) -> Iterator[tuple[str, bool]]:
        """(probres-infer's JSONL line, failed) for each of `paths`, in order (plus "probs" with --all-probs)."""
        from runtime.pipeline import classify
        job = self.job
        for batch, probs in classify(self.backend, paths, job["batch_size"], job["threads"]):
            row = 0
            for path, err in zip(batch.paths, batch.errors):
                self.text.seek(0)
                self.text.truncate()
                if err is None:
                    self.writer.result(path, probs[row])
                    line = self.text.getvalue()
                    if job["all_probs"]:
                        rec = json.loads(line)
                        rec["probs"] = [round(float(p), 6) for p in probs[row]]
                        line = json.dumps(rec) + "\n"
                    row += 1
                else:
                    self.writer.error(path.partition("\0")[0], err)
                    line = self.text.getvalue()
                yield line, err is not None

    def write(self, name: str, lines: list[str]) -> None:
        """The chunk's file, whole: temp name then rename (a rerun of the chunk replaces it with the same)."""
        path = os.path.join(self.job["out_dir"], name)
        if self.job["format"] == "jsonl":
            with atomic_open(path, "w") as f:
                f.write("".join(lines))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = parquet_schema(self.job["all_probs"])
        rows = [json.loads(line) for line in lines]
        for r in rows:                  # "contract", or the number that decided (0.5 without a contract's)
            if isinstance(r.get("threshold"), (int, float)):
                r["threshold"] = repr(float(r["threshold"]))
        table = pa.Table.from_pylist(rows, schema=schema)
        with atomic_open(path, "wb") as f:
            pq.write_table(table, f)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job = self.job
        names, records, errors = [], [], []
        for i, offset, count, digest in zip(rows["chunk"], rows["offset"], rows["count"], rows["hash"]):
            paths = batch_plan.read_chunk(job["plan"], int(offset), int(count), str(digest))
            done = list(self.label(paths))
            if len(done) != len(paths):          # never a short file: fail the chunk (finish --resume redoes it)
                raise RuntimeError(f"chunk {int(i)}: {len(done)} records for {len(paths)} inputs")
            lines = [line for line, _ in done]
            name = f"{batch_plan.PART_PREFIX}{int(i):06d}-{digest}{batch_plan.EXTENSIONS[job['format']]}"
            self.write(name, lines)
            names.append(name)
            records.append(len(lines))
            errors.append(sum(failed for _, failed in done))
        return {"file": np.array(names), "records": np.array(records), "errors": np.array(errors)}


def cpus_per_actor(total_cpus: float, actors: int, threads: int, gpus: float) -> float:
    """Ray CPUs each actor reserves: its threads, but all actors together leave half a CPU to Ray Data.

    A CPU in Ray is a scheduling token. Actors that reserve every CPU starve Ray Data's own tasks
    (the issue's deadlock: two 1-CPU actors on num_cpus=2 plus a read task wait for ever); GPU actors
    reserve one CPU each for their decode threads, at most what is there."""
    want = 1.0 if gpus else float(threads)
    room = (total_cpus - 0.5) / actors
    if room <= 0:
        raise ValueError(f"--actors {actors}: the cluster has {total_cpus:g} CPUs")
    return round(min(want, room), 2)


def connect(address: str, quiet: bool = True) -> None:
    """ray.init for --address: 'local' starts a private Ray on this machine, else auto / HOST:PORT."""
    import logging

    import ray
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "configure_logging": True,
                              "logging_level": "warning" if quiet else "info"}
    if address == "local":
        ray.init(include_dashboard=False, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    if quiet:                                  # Ray Data's INFO lines (execution plans, log paths) on stderr
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(job: dict[str, Any], plan: "batch_plan.Plan", pending: list[int], actors: int, gpus: float,
        progress=None) -> tuple[int, int]:
    """Label the `pending` chunks of `plan` on the connected Ray; returns (records, error records) done now."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.max_consecutive_actor_init_deaths = 2          # a model no actor can load: fail fast, not for ever
    total = float(ray.cluster_resources().get("CPU", 1.0))
    ncpu = cpus_per_actor(total, actors, job["threads"], gpus)
    items = [{"chunk": i, "offset": plan.offsets[i], "count": plan.counts[i], "hash": plan.hashes[i]}
             for i in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(ChunkLabeler, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs={"job": job}, num_cpus=ncpu, num_gpus=gpus or None)
    n = bad = 0
    for row in ds.iter_rows():
        n += int(row["records"])
        bad += int(row["errors"])
        if progress is not None:
            progress(row)
    return n, bad
