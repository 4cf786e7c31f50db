"""Labelling at scale: --resume after a hard kill, --shard, --from-list, Ctrl-C, flat memory to 1,000,000 paths.

    .venv/bin/python -m pytest -q tests/test_inputs.py

The model is test_pipeline_memory's tiny ONNX graph (sigmoid of channel means); the images
are small generated JPEGs. The kill test feeds paths through stdin (--from-list -) so the
process is provably mid-run, waiting for input, when it gets SIGKILL. Ctrl-C is tested both
with a real SIGINT to a subprocess and, for exact counts in every format, by raising
KeyboardInterrupt at a batch boundary in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline_memory import peak_rss_kib, tiny_onnx, write_images

import runtime.infer as infer
from runtime.inputs import InputError, parse_shard, read_done, take_shard

EXE = str(Path(sys.executable).parent / "probres-infer")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    return tiny_onnx(d / "tiny.onnx"), write_images(d / "imgs", 60, size=32)


def records(path: Path) -> list[dict]:
    """The records of a JSONL output, after its provenance header (which must come first, once)."""
    text = path.read_text()
    assert text.endswith("\n") and text.startswith('{"probres": ')
    return [json.loads(line) for line in text.splitlines()[1:]]


def test_resume_after_sigkill_gives_one_whole_line_per_input(data, tmp_path):
    model, paths = data
    out = tmp_path / "out.jsonl"
    bs = 4
    p = subprocess.Popen([EXE, "--engine", str(model), "--from-list", "-", "--output", str(out), "--resume",
                          "--batch-size", str(bs), "--threads", "1", "--top-k", "all"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    n = 10 * bs + 2
    fed = paths[:n]
    p.stdin.write("".join(f"{x}\n" for x in fed).encode())
    p.stdin.flush()
    # stdin stays open: every path fed is still classified, the last 2 as a partial batch once the
    # input pauses (runtime.chunks); before, the batch before the missing paths waited for them.
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 1 + n):
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.02)
    assert p.poll() is None                   # still running, blocked on stdin: a kill mid-run
    p.kill()
    p.wait(timeout=30)
    p.stdin.close()
    p.stderr.close()
    first = records(out)
    assert len(first) == n and [r["image"] for r in first] == fed
    # A kill can also land inside a batch's write(): emulate the unfinished line it leaves.
    with open(out, "a") as f:
        f.write('{"image": "' + paths[n][:10])
    lst = tmp_path / "all.txt"
    lst.write_text("".join(f"{x}\n" for x in paths))
    r = subprocess.run([EXE, "--engine", str(model), "--from-list", str(lst), "--output", str(out), "--resume",
                        "--batch-size", str(bs), "--threads", "1", "--top-k", "all"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dropped an unfinished last line" in r.stderr and f"({n} already in {out} skipped)" in r.stderr
    final = records(out)                      # every line parses: no truncated one
    assert sorted(x["image"] for x in final) == sorted(paths) and len(final) == len(paths)
    assert final[:n] == first                 # what was there is kept as it was


def test_three_shards_cover_every_input_exactly_once(data, tmp_path, capsys):
    model, paths = data
    imgs = str(Path(paths[0]).parent.parent)
    seen: list[str] = []
    for i in range(3):
        assert infer.main(["--engine", str(model), imgs, "--shard", f"{i}/3", "--batch-size", "8"]) == 0
        seen += [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(seen) == sorted(paths) and len(seen) == len(set(seen))
    # the shard of a path does not depend on the listing order (other machines list differently)
    shuffled = paths[:]
    random.Random(1).shuffle(shuffled)
    for i in range(3):
        assert set(take_shard(paths, i, 3)) == set(take_shard(shuffled, i, 3))
    assert all(len(list(take_shard(paths, i, 3))) > 0 for i in range(3))


def test_ctrl_c_keeps_what_was_classified_and_resume_finishes(data, tmp_path, monkeypatch, capsys):
    model, paths = data
    from runtime import pipeline

    real = pipeline.iter_batches              # what probres-infer's loop (pipeline.classify) reads from

    def interrupted(*a, **k):                 # the user presses Ctrl-C while batch 4 is being decoded
        for n, batch in enumerate(real(*a, **k)):
            if n == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(pipeline, "iter_batches", interrupted)
    for fmt, out in (("csv", tmp_path / "r.csv"), ("jsonl", tmp_path / "r.jsonl")):
        out.write_text("an earlier run\n")
        args = ["--engine", str(model), *paths, "--output", str(out), "--batch-size", "5", "--format", fmt]
        assert infer.main(args) == 130
        err = capsys.readouterr().err
        assert f"15 records kept in {out}" in err
        lines = out.read_text().splitlines()[1:]           # after the provenance header
        if fmt == "csv":
            assert lines[0].startswith("image,rank") and {ln.split(",")[0] for ln in lines[1:]} == set(paths[:15])
        else:
            assert [json.loads(ln)["image"] for ln in lines] == paths[:15] and "--resume" in err
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.jsonl"]          # no temp file left
    monkeypatch.setattr(pipeline, "iter_batches", real)
    assert infer.main(["--engine", str(model), *paths, "--output", str(tmp_path / "r.jsonl"), "--resume"]) == 0
    assert [r["image"] for r in records(tmp_path / "r.jsonl")] == paths


def test_resume_and_list_errors_are_usage_errors(data, tmp_path, capsys):
    model, paths = data
    csv_out = tmp_path / "r.csv"
    csv_out.write_text("image,rank\n")
    cases = [
        (["--resume"], "needs --output"),
        (["--resume", "--output", str(csv_out), "--format", "csv"], "needs --output FILE and --format jsonl"),
        (["--resume", "--output", str(csv_out)], "line 1 is not a probres-infer JSONL"),
        (["--shard", "3/3"], "0 <= I < N"),
        (["--shard", "a"], "expected I/N"),
        (["--from-list", str(tmp_path / "missing.txt")], "missing.txt"),
    ]
    for extra, msg in cases:
        assert infer.main(["--engine", str(model), paths[0], *extra]) == 2
        assert msg in capsys.readouterr().err
    assert infer.main(["--engine", str(model)]) == 2
    assert "--from-list" in capsys.readouterr().err
    assert csv_out.read_text() == "image,rank\n"


def test_read_done_cuts_only_an_unfinished_last_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"image": "a.jpg", "predictions": []}\n{"image": "b.jpg", "error": "x"}\n{"image": "c.j')
    done = read_done(str(f))
    assert len(done) == 2 and "a.jpg" in done and "b.jpg" in done and "c.jpg" not in done
    assert done.dropped_bytes == len('{"image": "c.j')
    assert f.read_text().endswith('"error": "x"}\n')
    assert parse_shard("2/5") == (2, 5)
    with pytest.raises(InputError):
        parse_shard("-1/5")


def test_peak_rss_flat_from_10k_to_1m_listed_paths(data, tmp_path):
    """1,000,000 paths stream through the list reader and the shard filter; 1/1000 reach the pipeline.

    Holding the paths as a list would cost ~80 MB (1M str of 19 characters + pointers); the
    bound is 32 MiB over the 10,000-path run. The paths do not exist: each selected one gets
    an error record (exit 1), which exercises the same stream without writing 1M images.
    """
    model, _ = data
    small, big = tmp_path / "10k.txt", tmp_path / "1m.txt"
    lines = [f"missing/{i:07d}.jpg\n" for i in range(1_000_000)]
    small.write_text("".join(lines[:10_000]))
    big.write_text("".join(lines))
    del lines
    common = [EXE, "--engine", str(model), "--shard", "0/1000", "--batch-size", "64"]
    rss_small = peak_rss_kib([*common, "--from-list", str(small), "--output", str(tmp_path / "s.jsonl")], 1)
    t0 = time.perf_counter()
    rss_big = peak_rss_kib([*common, "--from-list", str(big), "--output", str(tmp_path / "b.jsonl")], 1)
    dt = time.perf_counter() - t0
    n_big = len((tmp_path / "b.jsonl").read_text().splitlines())
    print(f"peak RSS: 10k paths {rss_small / 1024:.1f} MiB, 1M paths {rss_big / 1024:.1f} MiB; "
          f"{n_big} in shard 0/1000; 1M run {dt:.1f} s")
    assert 850 < n_big < 1150
    assert rss_big < rss_small + 32 * 1024


def test_resume_never_truncates_a_file_it_did_not_write(tmp_path):
    f = tmp_path / "notes.txt"                        # one line, no newline: not an unfinished record
    f.write_text("my notes")
    with pytest.raises(InputError, match="not a probres-infer JSONL"):
        read_done(str(f))
    assert f.read_text() == "my notes"
    g = tmp_path / "r.jsonl"                          # a kill 4 bytes into a record
    g.write_text('{"image": "a.jpg", "predictions": []}\n{"im')
    assert len(read_done(str(g))) == 1 and g.read_text().endswith("[]}\n")


@pytest.mark.parametrize("append", [False, True])
def test_ctrl_c_inside_a_write_keeps_only_whole_batches(tmp_path, append):
    from runtime.outputs import ResultFile

    path = tmp_path / "r.jsonl"
    path.write_text('{"image": "old"}\n' if append else "")
    rf = ResultFile(path, append=append)
    rf.write('{"image": "a"}\n')
    rf.end_batch(1)
    real = rf.f

    class CutShort:                           # the signal interrupts write() after 7 bytes reached the file
        def write(self, text):
            real.write(text[:7])
            real.flush()
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(real, name)

    rf.f = CutShort()
    with pytest.raises(KeyboardInterrupt):
        with rf:
            rf.write('{"image": "b"}\n')
            rf.end_batch(1)
    assert path.read_text() == ('{"image": "old"}\n' if append else "") + '{"image": "a"}\n' and rf.kept == 1
    assert os.listdir(tmp_path) == ["r.jsonl"]


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default disposition. A suite started in the
    background by a non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler: the child would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_sigint_keeps_the_finished_batches(data, tmp_path):
    model, paths = data
    lst = tmp_path / "many.txt"
    lst.write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(20000)))    # far more than 1 s of work
    out = tmp_path / "r.jsonl"
    p = subprocess.Popen([EXE, "--engine", str(model), "--from-list", str(lst), "--output", str(out),
                          "--batch-size", "4", "--threads", "1"], stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_sigint)
    deadline = time.time() + 60
    while time.time() < deadline:
        tmps = list(tmp_path.glob(".r.jsonl.*.tmp"))
        if tmps and tmps[0].read_text().count("\n") >= 40:
            break
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    kept = records(out)
    assert 40 <= len(kept) < 20000 and len(kept) % 4 == 0 and f"{len(kept)} records kept in {out}" in err
    assert [r["image"] for r in kept] == [paths[i % len(paths)] for i in range(len(kept))]
    assert sorted(os.listdir(tmp_path)) == ["many.txt", "r.jsonl"]


def test_resume_on_a_first_run_creates_the_output_directory(data, tmp_path, capsys):
    """The same command for the first run and every rerun: --resume into a directory that does not exist yet."""
    model, paths = data
    out = tmp_path / "parts" / "sub" / "part0.jsonl"
    args = ["--engine", str(model), *paths[:5], "--output", str(out), "--resume"]
    assert infer.main(args) == 0, capsys.readouterr().err
    assert [r["image"] for r in records(out)] == paths[:5]
    assert infer.main(args) == 0 and len(records(out)) == 5         # the rerun skips them all
