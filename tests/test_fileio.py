"""runtime.fileio: atomic writes leave either the old file or the new one, never a part."""

import os
import stat

import pytest

from runtime.fileio import atomic_open, atomic_write_text, sha256_file


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.jsonl"
    atomic_write_text(p, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("partial")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_written_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)
    (tmp_path / "b").write_bytes(data)
    assert sha256_file(tmp_path / "b") == hashlib.sha256(data).hexdigest()
