"""probres-infer --shard I/N: processes started with different PYTHONHASHSEED values agree on every path's shard.

    .venv/bin/python -m pytest -q tests/test_shard_processes.py

Shards are run on different machines and processes; Python's own hash() is salted per process,
so an assignment that used it would classify some images twice and others never. Each process
here is a real probres-infer run over the same folder with its own seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.provenance import records
from test_pipeline_memory import tiny_onnx, write_images

N = 3
# probres-infer's input stream (check_args: the walk, the shard, everything but the model) for every shard.
STREAMS = ("import contextlib, json, sys; from runtime.infer import InferJob, build_parser, check_args; "
           "print(json.dumps([list(check_args(InferJob.from_args(build_parser().parse_args(sys.argv[1:] + "
           "['--shard', f'{i}/%d'])), contextlib.ExitStack())[0]) for i in range(%d)]))" % (N, N))


def run(args: list[str], seed: int) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": str(seed)})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_shards_agree_across_hash_seeds_and_cover_each_input_once(tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    images = tmp_path / "imgs"
    paths = write_images(images, 60, size=16)
    seen = {seed: json.loads(run([sys.executable, "-c", STREAMS, "--engine", str(model), str(images)], seed))
            for seed in (1, 2)}
    assert seen[1] == seen[2]
    every = [p for part in seen[1] for p in part]
    assert sorted(every) == sorted(paths)                  # each input in exactly one shard
    assert all(8 <= len(part) <= 32 for part in seen[1])   # and spread, not all in one
    # probres-infer itself, with a third seed, classifies exactly shard 1's images.
    exe = str(Path(sys.executable).parent / "probres-infer")
    out = run([exe, "--engine", str(model), str(images), "--shard", f"1/{N}", "--top-k", "1"], seed=3)
    assert [r["image"] for r in records(out.splitlines())] == seen[1][1]
