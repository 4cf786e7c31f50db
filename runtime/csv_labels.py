"""Multi-label CSV datasets: one row per image, read into the same CocoSplit that COCO-2014 gives.

    python -c "from runtime.csv_labels import load_csv_split; print(load_csv_split('labels.csv', 'images').describe())"

Two forms, told apart by the header (the first row):
  image,labels             one `;`-separated label list per row:  `dogs/1.jpg,dog;person`
  image,cat,dog,person     one 0/1 column per label (NVIDIA TAO's form):  `dogs/1.jpg,0,1,1`
The first column names the image, relative to the images directory (--images DIR); its header
may be any name. Quoting is the csv module's (a name with a comma: "a,b.jpg"); UTF-8, a BOM
is ignored; blank lines are skipped.

Label names and their order come from the file: the columns in order, or for the list form
the order of first appearance. They become the model contract's label set, with ids 1..C in
that order. Given a label set (a model's contract, or training's labels for the val file),
rows are read against it by name: a name it lacks is an error, a label it has that the file
never uses is simply never positive (a 0/1 file must still have a column for every label).

Errors raise CsvDataError (a runtime.coco.CocoDataError, so every tool that reports COCO data
errors reports these) naming the file and line: a missing image, an unknown label, a
duplicate row, a value other than 0/1, and an image with no label at all unless keep_empty
(then it is an all-negative row, as runtime.coco keeps empty images). Image ids are a stable
hash of the image's name, so train/holdout.py's holdout.json works unchanged.
numpy + the standard library only: this ships with the runtime (probres-eval --csv).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from runtime.coco import CocoDataError, CocoSplit
from runtime.contract import LabelSet

LIST_COLUMN = "labels"
SEPARATOR = ";"


class CsvDataError(CocoDataError):
    """A label CSV is malformed or does not match its images; the message names the file and line."""


def image_id(name: str) -> int:
    """A stable 48-bit id for an image name (exact in JSON, the same on every machine)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=6).digest(), "big")


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row, header included."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CsvDataError(f"{path}: label file not found") from None
    except UnicodeDecodeError as e:
        raise CsvDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CsvDataError(f"{path}: cannot read ({e.strerror or e})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    out = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                out.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as e:
        raise CsvDataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return out


def _file_labels(path: Path, header: list[str], rows: list[tuple[int, list[str]]], listed: bool) -> list[str]:
    """The label names a file declares (0/1 form) or uses (list form: `listed`), in the file's order."""
    if listed:
        seen: dict[str, None] = {}
        for _, cells in rows:
            if len(cells) > 1:
                seen.update((n.strip(), None) for n in cells[1].split(SEPARATOR) if n.strip())
        return list(seen)
    names = header[1:]
    for k, n in enumerate(names):
        if not n:
            raise CsvDataError(f"{path}:1: column {k + 2} of the header has no label name")
        if n in names[:k]:
            raise CsvDataError(f"{path}:1: label {n!r} is named by two columns")
    return names


def load_csv_split(csv_path: str | os.PathLike[str], images: str | os.PathLike[str], keep_empty: bool = False,
                   labels: LabelSet | None = None, name: str | None = None) -> CocoSplit:
    """Read a label CSV (module docstring) with image names relative to `images` into a CocoSplit.

    labels: the label set to index targets by (default: the file's own, ids 1..C in its order).
    keep_empty: keep rows without any label as all-negative (default: an error naming the line).
    Raises CsvDataError naming the file and line; every image is checked to exist up front.
    """
    path, root = Path(csv_path), Path(images)
    if not root.is_dir():
        raise CsvDataError(f"--images {root}: no such directory (the CSV's image names are relative to it)")
    rows = _rows(path)
    if not rows:
        raise CsvDataError(f"{path}: empty (expected a header row: image,labels or image,<label>,<label>...)")
    (_, header), rows = rows[0], rows[1:]
    if len(header) < 2:
        raise CsvDataError(f"{path}:1: the header needs an image column and a labels column, or one column per label")
    listed = len(header) == 2 and header[1].lower() == LIST_COLUMN
    names = _file_labels(path, header, rows, listed)
    if labels is None:
        if not names:
            raise CsvDataError(f"{path}: no row has a label (nothing to train on)")
        labels = LabelSet(tuple(range(1, len(names) + 1)), tuple(names))
    col = {n: i for i, n in enumerate(labels.names)}
    if not listed:
        unknown = [n for n in names if n not in col]
        if unknown:
            raise CsvDataError(f"{path}:1: unknown label {unknown[0]!r} (the labels are: {', '.join(labels.names)})")
        lacking = [n for n in labels.names if n not in names]
        if lacking:
            raise CsvDataError(f"{path}:1: no column for label {lacking[0]!r} (a 0/1 file needs one per label)")
    targets, paths, ids, first_line = [], [], [], {}
    empty = 0
    for line, cells in rows:
        if len(cells) != len(header):
            raise CsvDataError(f"{path}:{line}: {len(cells)} fields, the header has {len(header)}")
        img = cells[0]
        if not img:
            raise CsvDataError(f"{path}:{line}: no image name")
        if img in first_line:
            raise CsvDataError(f"{path}:{line}: duplicate row: {img} is already listed on line {first_line[img]}")
        first_line[img] = line
        t = np.zeros(labels.num_classes, dtype=np.uint8)
        if listed:
            for n in (n.strip() for n in cells[1].split(SEPARATOR)):
                if not n:
                    continue
                if n not in col:
                    raise CsvDataError(f"{path}:{line}: unknown label {n!r} (the labels are: {', '.join(labels.names)})")
                t[col[n]] = 1
        else:
            for n, v in zip(header[1:], cells[1:]):
                if v not in ("0", "1"):
                    raise CsvDataError(f"{path}:{line}: label {n!r} is {v!r}; a 0/1 column holds 0 or 1")
                t[col[n]] = v == "1"
        if not t.any():
            empty += 1
            if not keep_empty:
                raise CsvDataError(f"{path}:{line}: {img} has no label; pass --keep-empty to keep such images "
                                   f"as all-negative (or remove the row)")
        p = root / img
        if not p.is_file():
            raise CsvDataError(f"{path}:{line}: image {p} not found (names are relative to --images {root})")
        targets.append(t)
        paths.append(p)
        ids.append(image_id(img))
    if len(set(ids)) != len(ids):      # 48-bit hashes of distinct names: astronomically rare, never silent
        raise CsvDataError(f"{path}: two image names hash to the same id; rename one of them")
    y = np.stack(targets) if targets else np.zeros((0, labels.num_classes), dtype=np.uint8)
    return CocoSplit(split=name or path.name, image_paths=paths, image_ids=ids, targets=y, labels=labels,
                     num_with_objects=len(rows) - empty, num_empty=empty, keep_empty=keep_empty)


def write_csv(path: str | os.PathLike[str], split: CocoSplit, images: str | os.PathLike[str],
              form: str = "labels") -> Path:
    """Write `split` as a label CSV whose image names are relative to `images` (atomically).

    form "labels": image,labels with `;`-separated names; "columns": one 0/1 column per label.
    """
    from runtime.fileio import atomic_write_text

    if form not in ("labels", "columns"):
        raise ValueError(f"form must be 'labels' or 'columns', got {form!r}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(split.labels.names)
    w.writerow(["image", LIST_COLUMN] if form == "labels" else ["image", *names])
    for p, t in zip(split.image_paths, split.targets):
        rel = Path(os.path.relpath(p, images)).as_posix()
        if form == "labels":
            w.writerow([rel, SEPARATOR.join(n for n, on in zip(names, t) if on)])
        else:
            w.writerow([rel, *(int(on > 0) for on in t)])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def add_eval_args(ap) -> None:
    """probres-eval's --csv FILE --images DIR (the reference labels as a CSV instead of --coco-root)."""
    ap.add_argument("--csv", metavar="FILE", help="reference labels as a CSV (docs/datasets-csv.md) instead of "
                    "--coco-root; image names relative to --images")
    ap.add_argument("--images", metavar="DIR", help="with --csv: the directory the CSV's image names are relative to")


def eval_data(csv: str | None, images: str | None, coco_root: str | None, split: str
              ) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(a usage error or None, the (flag, path) inputs to protect) for probres-eval's data flags."""
    from runtime.coco import annotation_path

    if csv is not None or images is not None:
        if coco_root is not None:
            return "give either --coco-root or --csv with --images, not both", []
        if csv is None or images is None:
            return "--csv and --images go together", []
        return None, [("--csv", csv), ("--images", images)]
    if coco_root is None:
        return "give --coco-root DIR, or --csv FILE with --images DIR", []
    return None, [("annotations", annotation_path(coco_root, split)), ("images", f"{coco_root}/{split}")]


def load_eval_split(labels: LabelSet, *, csv: str | None = None, images: str | None = None,
                    coco_root: str | None = None, split: str = "val2014", keep_empty: bool = False) -> CocoSplit:
    """probres-eval's images and reference labels: the CSV (csv, images) or coco_root/<split>."""
    from runtime.coco import load_coco_split

    if csv is not None:
        return load_csv_split(csv, images, keep_empty=keep_empty, labels=labels)
    return load_coco_split(coco_root, split, keep_empty=keep_empty, labels=labels)
