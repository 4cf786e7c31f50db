"""train.get_coco against a loopback HTTP server serving toy archives in the COCO-2014 layout.

    .venv/bin/python -m pytest -q tests/test_get_coco.py

The archives are zipped from a small toy set (train.toy_coco) exactly as COCO ships them
(train2014/..., val2014/..., annotations/instances_*.json); get_coco's table of published sizes
and sha256s is pointed at them. The checks: a dropped transfer resumed with a Range request
(within a run and on the next run), a corrupted archive refused, a server without range
support (restart from zero), a re-run that sends no request, and the free-space check.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

import train.get_coco as G
from loopback_http import LoopbackServer
from runtime.coco import load_coco_split

TRAIN = "/zips/train2014.zip"


def _zip(src: Path, top: str, only: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted((src / top).rglob("*")):
            if p.is_file() and (not only or p.name in only):
                z.write(p, p.relative_to(src).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """(the toy tree the archives were made from, {URL path: archive bytes})."""
    from train.toy_coco import make_toy_coco
    src = make_toy_coco(tmp_path_factory.mktemp("toy_src"), n_train=12, n_val=6, seed=1)
    files = {"/annotations/annotations_trainval2014.zip": _zip(src, "annotations"),
             "/zips/val2014.zip": _zip(src, "val2014"), TRAIN: _zip(src, "train2014")}
    return src, files


@pytest.fixture
def table(served, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Point get_coco's published sizes and checksums at the toy archives; no waits between retries."""
    _, files = served
    archives = []
    for a in G.ARCHIVES:
        data = files["/" + a.path]
        archives.append(G.Archive(a.name, a.path, len(data), hashlib.sha256(data).hexdigest(), a.top, len(data)))
    monkeypatch.setattr(G, "ARCHIVES", tuple(archives))
    monkeypatch.setattr(G, "RETRY_WAIT_S", 0.0)
    return files


def _run(root: Path, url: str, *extra: str) -> int:
    return G.main([str(root), "--base-url", url, "--timeout", "10", *extra])


def _assert_installed(root: Path, src: Path) -> None:
    """The layout probres-train reads, byte-identical to the toy set, and no archive left behind."""
    for split, n in (("train2014", 12), ("val2014", 6)):
        s = load_coco_split(root, split, keep_empty=True)
        assert len(s) == n
        for p in s.image_paths:
            assert p.read_bytes() == (src / split / p.name).read_bytes()
    for f in ("instances_train2014.json", "instances_val2014.json"):
        assert (root / "annotations" / f).read_bytes() == (src / "annotations" / f).read_bytes()
    assert not list(root.glob("*.zip*"))


def test_dropped_transfer_resumes_with_range_then_rerun_does_nothing(served, table, tmp_path: Path, capsys) -> None:
    src, files = served
    cut = len(files[TRAIN]) // 3
    with LoopbackServer(files, cuts={TRAIN: [cut]}) as srv:
        assert _run(tmp_path / "coco", srv.url) == 0
        assert srv.gets(TRAIN) == [None, f"bytes={cut}-"]      # the second request resumed where the cut was
        _assert_installed(tmp_path / "coco", src)
        n = len(srv.log)
        capsys.readouterr()
        assert _run(tmp_path / "coco", srv.url) == 0           # everything there: no request at all
        assert len(srv.log) == n and "nothing to do" in capsys.readouterr().err


def test_interrupted_run_resumes_on_the_next_run(served, table, tmp_path: Path, capsys) -> None:
    src, files = served
    cut = len(files[TRAIN]) // 2
    with LoopbackServer(files, cuts={TRAIN: [cut]}) as srv:
        assert _run(tmp_path / "coco", srv.url, "--retries", "0") == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("get_coco: error: train2014.zip: download failed") and "re-run to resume" in err
        assert (tmp_path / "coco" / "train2014.zip.part").stat().st_size == cut
        assert _run(tmp_path / "coco", srv.url) == 0
        assert srv.gets(TRAIN) == [None, f"bytes={cut}-"]
        assert srv.gets("/zips/val2014.zip") == [None]         # installed by the first run, not fetched again
    _assert_installed(tmp_path / "coco", src)


def test_corrupted_archive_is_refused(served, table, tmp_path: Path, capsys) -> None:
    _, files = served
    bad = bytearray(files[TRAIN])
    bad[len(bad) // 2] ^= 0xFF                                  # same size, one byte flipped
    with LoopbackServer({**files, TRAIN: bytes(bad)}) as srv:
        assert _run(tmp_path / "coco", srv.url) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"get_coco: error: {tmp_path / 'coco' / 'train2014.zip'}: corrupted archive, sha256")
    assert "re-run to download it again" in err
    root = tmp_path / "coco"
    assert not (root / "train2014").exists() and not (root / "train2014.zip").exists()
    assert (root / "val2014").is_dir()                          # the good archives before it stay installed


def test_server_without_range_support_restarts_from_zero(served, table, tmp_path: Path, capsys) -> None:
    src, files = served
    cut = len(files[TRAIN]) // 3
    with LoopbackServer(files, ranges=False, cuts={TRAIN: [cut]}) as srv:
        assert _run(tmp_path / "coco", srv.url) == 0
        assert srv.gets(TRAIN) == [None, f"bytes={cut}-"]      # asked to resume, got the whole file
    assert "does not resume transfers" in capsys.readouterr().err
    _assert_installed(tmp_path / "coco", src)


def test_wrong_size_and_missing_file_are_refused(served, table, tmp_path: Path, capsys) -> None:
    _, files = served
    with LoopbackServer({**files, TRAIN: files[TRAIN] + b"x"}) as srv:
        assert _run(tmp_path / "a", srv.url) == 1
    assert "the server sends" in capsys.readouterr().err
    with LoopbackServer({k: v for k, v in files.items() if k != TRAIN}) as srv:
        assert _run(tmp_path / "b", srv.url) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_not_enough_space_is_refused_before_any_request(served, table, tmp_path: Path, monkeypatch, capsys) -> None:
    _, files = served
    real = G.shutil.disk_usage
    monkeypatch.setattr(G.shutil, "disk_usage", lambda p: real(p)._replace(free=G.SPACE_MARGIN))
    with LoopbackServer(files) as srv:
        assert _run(tmp_path / "coco", srv.url) == 2
        assert srv.log == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needed for annotations_trainval2014.zip, val2014.zip, train2014.zip" in err


def test_member_outside_the_layout_is_refused(served, table, tmp_path: Path, monkeypatch, capsys) -> None:
    _, files = served
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("annotations/instances_train2014.json", "{}")
        z.writestr("annotations/../../evil.txt", "x")
    evil = buf.getvalue()
    a = G.ARCHIVES[0]
    monkeypatch.setattr(G, "ARCHIVES", (G.Archive(a.name, a.path, len(evil), hashlib.sha256(evil).hexdigest(),
                                                  a.top, len(evil)),))
    with LoopbackServer({**files, "/" + a.path: evil}) as srv:
        assert _run(tmp_path / "coco", srv.url) == 1
    assert "outside annotations/" in capsys.readouterr().err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "coco" / "annotations").exists()
