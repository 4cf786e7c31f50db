"""probres-train's one-line refusals and --skip-bad-images on a missing file (issue 24, rows 14-15).

    .venv/bin/python -m pytest -q tests/test_train_cli_errors.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.__main__ import main

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
        "--device", "cpu", "--no-progress", "--epochs", "1", "--no-calibrate"]


def test_out_naming_an_existing_file_is_one_line_exit_2(toy_root: Path, tmp_path: Path, capsys) -> None:
    """Row 14: --out results.jsonl (a file) was a FileExistsError traceback."""
    out = tmp_path / "results.jsonl"
    out.write_text('{"keep": "me"}\n')
    assert main(["--coco-root", str(toy_root), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {out}: exists and is not a directory" in err and len(err.splitlines()) == 1, err
    assert out.read_text() == '{"keep": "me"}\n'


def _root_with_missing_image(toy_root: Path, dst: Path) -> tuple[Path, Path]:
    """12 training images listed (3 steps of 4), one of them not on disk; val2014 linked."""
    (dst / "annotations").mkdir(parents=True)
    (dst / "annotations/instances_val2014.json").symlink_to(toy_root / "annotations/instances_val2014.json")
    (dst / "val2014").symlink_to(toy_root / "val2014", target_is_directory=True)
    (dst / "train2014").mkdir()
    doc = json.loads((toy_root / "annotations/instances_train2014.json").read_text())
    keep = sorted({a["image_id"] for a in doc["annotations"]})[:12]
    doc["images"] = [i for i in doc["images"] if i["id"] in keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    (dst / "annotations/instances_train2014.json").write_text(json.dumps(doc))
    for i in doc["images"][:5] + doc["images"][6:]:
        os.symlink(toy_root / "train2014" / i["file_name"], dst / "train2014" / i["file_name"])
    return dst, dst / "train2014" / doc["images"][5]["file_name"]


def test_skip_bad_images_covers_a_listed_file_missing_on_disk(toy_root: Path, tmp_path: Path, capsys) -> None:
    """Row 15: without the flag one line naming the file and the flag; with it, skipped and logged."""
    root, gone = _root_with_missing_image(toy_root, tmp_path / "coco")
    assert main(["--coco-root", str(root), "--out", str(tmp_path / "stop"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert str(gone) in err and "--skip-bad-images" in err and len(err.splitlines()) == 1, err
    run = tmp_path / "skip"
    assert main(["--coco-root", str(root), "--out", str(run), *TINY, "--skip-bad-images", "--holdout-frac", "0"]) == 0
    log = (run / "train.log").read_text()
    assert "skipped 1 training images listed in the annotations but not on disk" in log and str(gone) in log
    assert (run / "best.pt").is_file()
