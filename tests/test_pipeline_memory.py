"""The decode pipeline streams: results in input order, bad inputs carried through, fixed memory.

    .venv/bin/python -m pytest -q tests/test_pipeline_memory.py

The memory test runs probres-infer in subprocesses over 500 and 5,000 small generated images
and compares their peak RSS (each measured by a fresh parent through RUSAGE_CHILDREN).
Keeping every image's pixels would add 5,000 x 3 x 64 x 64 x 4 B = 246 MB at 64 px, far over
the 1.5x bound; streaming keeps the peak where it was at 500.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import LabelSet, ModelContract, PreprocessSpec
from runtime.pipeline import IN_FLIGHT, iter_batches
from runtime.preprocess import preprocess_one

S = 64
CONTRACT = ModelContract(LabelSet.from_categories([(1, "person"), (3, "car"), (18, "dog")]), PreprocessSpec(size=S))


def tiny_onnx(path: Path) -> Path:
    """probs (N, 3) = sigmoid(channel means): the smallest model that reads every pixel."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Sigmoid", ["f"], ["probs"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, S, S])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.metadata_props.add(key="probres.contract", value=CONTRACT.to_json())
    onnx.save(m, str(path))
    return path


def write_images(d: Path, n: int, size: int = 80) -> list[str]:
    """n small JPEGs (16 distinct contents, written round robin) -> their paths."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = [cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))[1].tobytes()
             for _ in range(16)]
    paths = []
    for i in range(n):
        p = d / f"{i // 1000:02d}" / f"img_{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(blobs[i % 16])
        paths.append(str(p))
    return paths


def test_batches_keep_order_carry_errors_and_match_preprocess(tmp_path):
    paths = write_images(tmp_path / "imgs", 23)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    paths[4] = paths[17] = str(tmp_path / "bad.jpg")
    paths[9] = str(tmp_path / "missing.png")
    seen, rows = [], []
    for batch in iter_batches(paths, CONTRACT.preprocess, batch_size=5, threads=3):
        assert batch.start == len(seen) and len(batch.paths) <= 5
        assert batch.data.shape == (len(batch.ok), 3, S, S)
        seen += batch.paths
        for j, i in enumerate(batch.ok):
            rows.append((batch.paths[i], batch.data[j].copy()))
        for p, e in zip(batch.paths, batch.errors):
            assert (e is None) == (p not in (paths[4], paths[9]))
            if e is not None:
                assert p in e
    assert seen == paths
    assert len(rows) == 20
    for p, row in rows:
        np.testing.assert_array_equal(row, preprocess_one(p, CONTRACT.preprocess))


def test_buffers_are_recycled_and_threads_stop(tmp_path):
    paths = write_images(tmp_path / "imgs", 120, size=32)
    before = threading.active_count()
    addresses = set()
    for n, batch in enumerate(iter_batches(paths, CONTRACT.preprocess, batch_size=4, threads=2, prefetch=1)):
        addresses.add(batch.data.__array_interface__["data"][0])
    assert n == 29
    assert len(addresses) <= IN_FLIGHT + 1 + 1           # in flight + queued + held: fixed, not 30
    it = iter_batches(paths, CONTRACT.preprocess, batch_size=4, threads=2)
    next(it)
    it.close()                                           # the caller stops early: no hang, no leaked threads
    assert threading.active_count() == before


def test_failing_path_source_is_raised_in_the_caller(tmp_path):
    paths = write_images(tmp_path / "imgs", 6, size=32)

    def source():
        yield from paths
        raise RuntimeError("listing failed")

    with pytest.raises(RuntimeError, match="listing failed"):
        for _ in iter_batches(source(), CONTRACT.preprocess, batch_size=4, threads=2):
            pass


PEAK_RSS = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_kib(args: list[str], expect_rc: int = 0) -> int:
    import subprocess
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, timeout=300)
    rc, kib = r.stdout.split()
    assert rc == str(expect_rc), r.stderr
    return int(kib)


def test_peak_rss_flat_from_500_to_5000_images(tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    write_images(tmp_path / "many", 5000)
    few = tmp_path / "few"
    few.mkdir()
    for sub in ("00",):                                   # the first 500 of the same images
        (few / sub).mkdir()
        for i in range(500):
            (few / sub / f"img_{i:05d}.jpg").write_bytes((tmp_path / "many" / sub / f"img_{i:05d}.jpg").read_bytes())
    exe = str(Path(sys.executable).parent / "probres-infer")
    common = ["--engine", str(model), "--batch-size", "32", "--threads", "2", "--top-k", "all"]
    out_many = tmp_path / "many.jsonl"
    rss_few = peak_rss_kib([exe, *common, str(few), "--output", str(tmp_path / "few.jsonl")])
    rss_many = peak_rss_kib([exe, *common, str(tmp_path / "many"), "--output", str(out_many)])
    print(f"peak RSS: 500 images {rss_few / 1024:.1f} MiB, 5000 images {rss_many / 1024:.1f} MiB "
          f"({rss_many / rss_few:.2f}x)")
    assert len(out_many.read_text().splitlines()) == 1 + 5000          # the provenance header, the records
    assert rss_many < 1.5 * rss_few
