"""Label CSVs (runtime/csv_labels.py): both forms against COCO's own loader, every error with its file and
line, and a CSV dataset trained, exported, classified and evaluated end to end.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_csv_data.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.coco import CocoDataError, load_coco_split
from runtime.csv_labels import CsvDataError, load_csv_split
from runtime.provenance import records


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def _list_rows(split, root: Path) -> list[list[str]]:
    """The split as image,labels rows written here by hand (names relative to root)."""
    names = split.labels.names
    return [["image", "labels"]] + [[str(p.relative_to(root)), ";".join(n for n, on in zip(names, t) if on)]
                                    for p, t in zip(split.image_paths, split.targets)]


def test_both_forms_read_the_targets_coco_gives(toy_root: Path, tmp_path: Path):
    coco = load_coco_split(toy_root, "val2014")
    rows = _list_rows(coco, toy_root)
    listed = load_csv_split(_write(tmp_path / "l.csv", rows), toy_root)
    first_seen = list(dict.fromkeys(n for r in rows[1:] for n in r[1].split(";")))
    assert listed.labels.names == tuple(first_seen)          # the list form's order: first appearance
    perm = [coco.labels.names.index(n) for n in first_seen]
    assert np.array_equal(listed.targets, coco.targets[:, perm]) and listed.image_paths == coco.image_paths
    # one 0/1 column per label (TAO), columns in a shuffled order: that order is the label set
    order = list(reversed(coco.labels.names))
    cols = [["file", *order]] + [[str(p.relative_to(toy_root)), *(str(int(t[coco.labels.names.index(n)]))
                                                                   for n in order)]
                                 for p, t in zip(coco.image_paths, coco.targets)]
    tao = load_csv_split(_write(tmp_path / "c.csv", cols), toy_root)
    assert tao.labels.names == tuple(order) and tao.labels.category_ids == tuple(range(1, 9))
    assert np.array_equal(tao.targets, coco.targets[:, [coco.labels.names.index(n) for n in order]])
    # read against another file's label set: by name
    again = load_csv_split(tmp_path / "c.csv", toy_root, labels=listed.labels)
    assert np.array_equal(again.targets, listed.targets)


@pytest.mark.parametrize("case, line, match", [
    ("missing image", 3, r"image .*nope\.jpg not found"),
    ("unknown label", 3, r"unknown label 'zebra'"),
    ("duplicate row", 4, r"duplicate row: .* already listed on line 2"),
    ("empty label set", 3, r"has no label; pass --keep-empty"),
    ("bad 0/1 value", 3, r"label 'person' is '2'"),
    ("unknown column", 1, r"unknown label 'zebra'"),
    ("field count", 3, r"3 fields, the header has 2"),
])
def test_each_csv_error_names_the_file_and_line(toy_root: Path, tmp_path: Path, case: str, line: int, match: str):
    coco = load_coco_split(toy_root, "val2014")
    rows = _list_rows(coco, toy_root)[:4]
    labels = coco.labels
    if case == "missing image":
        rows[2][0] = "val2014/nope.jpg"
    elif case == "unknown label":
        rows[2][1] += ";zebra"
    elif case == "duplicate row":
        rows[3][0] = rows[1][0]
    elif case == "empty label set":
        rows[2][1] = ""
    elif case == "field count":
        rows[2].append("x")
    elif case in ("bad 0/1 value", "unknown column"):
        names = list(labels.names) + (["zebra"] if case == "unknown column" else [])
        rows = [["image", *names]] + [[r[0], *("1" if n in r[1].split(";") else "0" for n in names)] for r in rows[1:]]
        if case == "bad 0/1 value":
            rows[2][1 + names.index("person")] = "2"
    path = _write(tmp_path / "bad.csv", rows)
    with pytest.raises(CsvDataError, match=match) as e:
        load_csv_split(path, toy_root, labels=labels)
    assert str(e.value).startswith(f"{path}:{line}: ") and isinstance(e.value, CocoDataError)
    if case == "empty label set":                 # --keep-empty: an all-negative row
        kept = load_csv_split(path, toy_root, keep_empty=True, labels=labels)
        assert len(kept) == 3 and kept.targets[1].sum() == 0 and kept.num_empty == 1


def test_probres_train_reports_csv_usage_and_data_errors_in_one_line(toy_root: Path, tmp_path: Path, capsys):
    from train.__main__ import main

    rows = _list_rows(load_coco_split(toy_root, "train2014"), toy_root)
    good = _write(tmp_path / "t.csv", rows)
    rows[5][0] = "train2014/nope.jpg"
    bad = _write(tmp_path / "bad.csv", rows)
    out = ["--out", str(tmp_path / "run")]
    for args, want in ((["--train-csv", str(good), "--val-frac", "0.2"], "--train-csv needs --images"),
                       (["--train-csv", str(good), "--images", str(toy_root)], "exactly one of --val-csv"),
                       (["--coco-root", str(toy_root), "--train-csv", str(good)], "not both"),
                       (["--train-csv", str(good), "--images", str(toy_root), "--val-frac", "0.9"], "--val-frac must"),
                       (["--train-csv", str(bad), "--images", str(toy_root), "--val-frac", "0.2", "--device", "cpu"],
                        f"{bad}:6: image {toy_root / 'train2014/nope.jpg'} not found")):
        assert main(args + out) == 2
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, err


def test_a_csv_dataset_trains_exports_and_evaluates_end_to_end(toy_root: Path, tmp_path: Path, capsys):
    """probres-train on a CSV (--val-frac), export.onnx of best.pt (the calibrated model), probres-infer, and
    probres-eval --csv RUN/val.csv: eval's mAP equals sklearn's on probres-infer's probabilities."""
    from sklearn.metrics import average_precision_score

    from export.onnx import main as export_main
    from runtime.eval import main as eval_main
    from runtime.infer import main as infer_main
    from train.__main__ import main as train_main
    from train.checkpoint import load_checkpoint

    train_csv = _write(tmp_path / "train.csv", _list_rows(load_coco_split(toy_root, "train2014"), toy_root))
    run = tmp_path / "run"
    assert train_main(["--train-csv", str(train_csv), "--val-frac", "0.25", "--images", str(toy_root),
                       "--out", str(run), "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                       "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
                       "--holdout-frac", "0.3"]) == 0
    log = (run / "train.log").read_text()                                    # the log names the CSV's split, not COCO's
    assert "selected on the --val-frac 0.25 split of --train-csv" in log and "val2014" not in log
    best = load_checkpoint(run / "best.pt")
    assert "calibration" in best.extra and (run / "best_raw.pt").is_file()       # best.pt is the model to ship
    assert best.contract.labels.names == load_csv_split(train_csv, toy_root).labels.names
    val = load_csv_split(run / "val.csv", toy_root, labels=best.contract.labels)
    assert 0 < len(val) < 48
    assert export_main(["--checkpoint", str(run / "best.pt"), "--output", str(tmp_path / "m.onnx"),
                        "--verify-images", str(toy_root / "val2014")]) == 0
    paths = tmp_path / "paths.txt"
    paths.write_text("".join(f"{p}\n" for p in val.image_paths))
    assert infer_main(["--engine", str(tmp_path / "m.onnx"), "--from-list", str(paths), "--top-k", "all",
                       "--output", str(tmp_path / "p.jsonl")]) == 0
    recs = {r["image"]: {q["label"]: q["probability"] for q in r["predictions"]}
            for r in records((tmp_path / "p.jsonl").read_text().splitlines())}      # header skipped
    probs = np.array([[recs[str(p)][n] for n in best.contract.labels.names] for p in val.image_paths])
    capsys.readouterr()
    assert eval_main(["--engine", str(tmp_path / "m.onnx"), "--csv", str(run / "val.csv"), "--images", str(toy_root),
                      "--reference", str(run / "best.pt"), "--json", str(tmp_path / "rep.json")]) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    have = [k for k in range(probs.shape[1]) if val.targets[:, k].any()]
    want = np.mean([average_precision_score(val.targets[:, k], probs[:, k]) for k in have])
    assert rep["num_images"] == len(val) and rep["engine"]["mAP"] == pytest.approx(want, abs=2e-3)
    assert rep["max_abs_prob_diff"] < 1e-4
