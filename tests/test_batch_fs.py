"""probres-batch's read stage and storage without Ray: the bytes a read task reads give probres-infer's
records (errors included), and a job's files go through a pyarrow file system (the object-store path).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_batch_fs.py

The read stage (batch_ray.read_chunk_files) and the actor (ChunkLabeler) are called in-process as
Ray would call them; a SubTreeFileSystem over a temp folder stands in for S3/GCS: the same code as
an object store's, apart from the FileSystem object (writes go to the object itself, no rename).
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

pa_fs = pytest.importorskip("pyarrow.fs")
pq = pytest.importorskip("pyarrow.parquet")

from runtime import batch_plan  # noqa: E402
from runtime.batch_fs import Location  # noqa: E402
from runtime.batch_ray import ChunkLabeler, read_chunk_files  # noqa: E402
from runtime.contract import LabelSet, ModelContract, PreprocessSpec  # noqa: E402
from runtime.infer import main as infer_main  # noqa: E402
from runtime.inputs import InputError  # noqa: E402
from runtime.provenance import records  # noqa: E402
from test_infer import S, tiny_onnx  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fs_model") / "tiny.onnx"
    tiny_onnx(path, ModelContract(LabelSet((1, 2, 3), ("cat", "dog", "car")), PreprocessSpec(size=S)))
    return path


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    """Good images and every kind of input a read task cannot read, as probres-infer would get them."""
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        p = d / f"im{i}.{'png' if i == 2 else 'jpg'}"
        cv2.imwrite(str(p), cv2.GaussianBlur(rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8), (5, 5), 0))
        paths.append(str(p))
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (d / "empty.png").write_bytes(b"")
    (d / "folder.jpg").mkdir()
    os.mkfifo(d / "pipe.jpg")
    return paths[:2] + [str(d / n) for n in ("broken.jpg", "missing.jpg", "empty.png", "folder.jpg", "pipe.jpg")] \
        + paths[2:] + [f"{d}/locked\0Permission denied"]          # a directory the walk could not list


def label_job(out: Location, paths: list[str], model, fmt: str, chunk_size: int = 4) -> list[dict]:
    """Plan, read stage, actor and finish, in-process; the records read back from `out` in order."""
    out.makedirs()
    batch_plan.write_plan(iter(paths), out)
    plan = batch_plan.scan_plan(out, chunk_size)
    job = {"model": str(model), "cwd": os.getcwd(), "out": out, "format": fmt, "all_probs": False,
           "batch_size": 3, "threads": 1, "device": "cpu"}
    labeler = ChunkLabeler(job)
    for i in range(len(plan)):
        labeler(read_chunk_files({k: np.array([v]) for k, v in plan.chunk(i).items()}, out))
    assert batch_plan.finish(out, plan, fmt) == len(paths)
    got = []
    for i in range(len(plan)):
        with out.open_read(plan.part_name(i, fmt)) as f:
            got += (pq.read_table(f).to_pylist() if fmt == "parquet"
                    else [json.loads(line) for line in f.read().decode().splitlines()])
    return [{k: v for k, v in r.items() if v is not None} for r in got]


def infer_records(model, paths: list[str], tmp_path) -> list[dict]:
    lst = tmp_path / "list.txt"
    lst.write_text("".join(p.partition("\0")[0] + "\n" for p in paths if "\0" not in p))
    infer_main(["--engine", str(model), "--from-list", str(lst), "--output", str(tmp_path / "i.jsonl"),
                "--threads", "1", "--batch-size", "3"])
    return list(records((tmp_path / "i.jsonl").read_text().splitlines()))


def test_read_tasks_bytes_give_probres_infers_records_and_errors(model, inputs, tmp_path):
    got = label_job(Location(str(tmp_path / "out")), inputs, model, "jsonl")
    want = infer_records(model, inputs, tmp_path)
    assert sum("error" in w for w in want) == 5                  # broken, missing, empty, folder, pipe
    assert got[:-1] == want                                      # the same records, errors word for word
    d = os.path.dirname(inputs[0])
    assert got[-1] == {"image": f"{d}/locked", "error": f"{d}/locked: cannot list directory (Permission denied)"}


def test_object_store_path_through_a_pyarrow_file_system(model, inputs, tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    out = Location("labels/job1", pa_fs.SubTreeFileSystem(str(root), pa_fs.LocalFileSystem()), "mem://labels/job1")
    got = label_job(out, inputs[:-1], model, "parquet", chunk_size=3)
    want = infer_records(model, inputs, tmp_path)
    assert [r["image"] for r in got] == [w["image"] for w in want]
    assert [r.get("error") for r in got] == [w.get("error") for w in want]
    names = sorted(os.listdir(root / "labels" / "job1"))
    success = json.loads((root / "labels" / "job1" / batch_plan.SUCCESS).read_text())
    assert [f["file"] for f in success["files"]] == [n for n in names if n.startswith("part-")]
    assert success["records"] == len(want) and not [n for n in names if n.endswith(".tmp")]
    # --resume rules through the same file system: the finished job is recognised, anything else refused
    manifest = {"input": "x", "cwd": "/", "model_sha256": "0", "chunk_size": 3, "format": "parquet", "all_probs": False}
    with pytest.raises(InputError, match="is not empty"):
        batch_plan.check_out_dir(out, manifest, resume=False)
    with pytest.raises(InputError, match="has part files but no _job.json"):
        batch_plan.check_out_dir(out, manifest, resume=True)


@pytest.mark.parametrize("where", ["object store", "file://"])
def test_a_failed_write_leaves_nothing(tmp_path, where):
    if where == "file://":          # LocalFileSystem: a temp name, then a move
        out = Location.of((tmp_path / "o").as_uri())
    else:                           # the object-store path: the object itself, deleted when the write fails
        out = Location("o", pa_fs.SubTreeFileSystem(str(tmp_path), pa_fs.LocalFileSystem()), "mem://o")
    out.makedirs()
    with out.write("part-1.jsonl", text=True) as f:
        f.write("whole\n")
    with pytest.raises(RuntimeError):
        with out.write("part-2.jsonl", text=True) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path / "o")) == ["part-1.jsonl"]
    assert (tmp_path / "o" / "part-1.jsonl").read_text() == "whole\n"


def test_uri_inputs_list_in_walk_order(tmp_path):
    for rel in ["b/2.jpg", "b/1.jpg", "a/x.jpg", "a/deep/y.jpg", "a.jpg", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    walked = [os.path.relpath(p, tmp_path) for p in batch_plan.iter_input(str(tmp_path))]
    uri = tmp_path.as_uri()
    listed = [p[len(uri) + 1:] for p in batch_plan.iter_input(uri + "/")]
    assert listed == walked == ["a/deep/y.jpg", "a/x.jpg", "a.jpg", "b/1.jpg", "b/2.jpg"]
    lst = tmp_path / "l.txt"
    lst.write_text(f"{uri}/a.jpg\n\n{uri}/b/1.jpg\n")
    assert list(batch_plan.iter_input(lst.as_uri())) == [f"{uri}/a.jpg", f"{uri}/b/1.jpg"]
    with pytest.raises(InputError, match="no such directory or list file"):
        batch_plan.input_kind(uri + "/nothing/")


def test_plan_chunks_and_glob_order(tmp_path):
    for rel in ["b/2.jpg", "b/1.jpg", "a/x.jpg", "a/deep/y.jpg", "a/z.png", "c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    g = lambda pat: [os.path.relpath(p, tmp_path) for p in batch_plan.iter_glob(str(tmp_path / pat))]  # noqa: E731
    assert g("*/*.jpg") == ["a/x.jpg", "b/1.jpg", "b/2.jpg"]
    assert g("**/*.jpg") == ["a/deep/y.jpg", "a/x.jpg", "b/1.jpg", "b/2.jpg", "c.jpg"]
    out = tmp_path / "out"
    out.mkdir()
    loc = Location(str(out))
    names = [f"img{i}.jpg" for i in range(10)]
    assert batch_plan.write_plan(iter(names), loc) == 10
    plan = batch_plan.scan_plan(loc, 4)
    assert list(plan.counts) == [4, 4, 2] and plan.count == 10
    chunks = [plan.chunk(i) for i in range(3)]
    assert [batch_plan.read_chunk(loc, c["offset"], c["nbytes"], c["count"], c["hash"]) for c in chunks] == [
        names[:4], names[4:8], names[8:]]
    assert len(set(plan.hashes)) == 3 and plan.part_name(2, "parquet").startswith("part-000002-")
