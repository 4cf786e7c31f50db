"""The held-out split: a deterministic part of train2014 kept out of training, for calibration and thresholds.

    probres-train --coco-root data/toy_coco --out runs/toy --holdout-frac 0.05   (writes RUN_DIR/holdout.json)

val2014 stays the test set: calibration (train/calibrate.py) and the contract's thresholds
are fitted on these images only. The split is a function of the image ids, the targets,
the fraction and the seed, so a resumed run gets the same one (and checks it against
RUN_DIR/holdout.json). Stratified just enough: every class with at least MIN_TRAIN_POSITIVES
train positives gets at least one held-out positive (rarest class first), then the
remaining places are filled in a seeded random order. The held-out part can therefore be
a few images larger than round(frac * N) when many classes are rare.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from runtime.coco import CocoSplit
from runtime.fileio import atomic_write_text

HOLDOUT_FORMAT = "probres-holdout/1"
HOLDOUT_FILE = "holdout.json"
MIN_TRAIN_POSITIVES = 20
MAX_FRAC = 0.5
HOLDOUT_STREAM = 20140      # the random stream of the held-out draw (--val-frac draws from its own)


class HoldoutError(ValueError):
    """A bad --holdout-frac or a holdout.json that does not match this run; the message names it."""


def holdout_rows(targets: np.ndarray, frac: float, seed: int, stream: int = HOLDOUT_STREAM) -> np.ndarray:
    """Sorted row indices of the held-out images of (N, C) multi-hot `targets`.

    frac 0 -> none. Every class with >= MIN_TRAIN_POSITIVES positives has >= 1 held-out positive.
    stream: another value draws an independent split (train.coco's --val-frac uses one).
    """
    if not 0.0 <= frac <= MAX_FRAC:
        raise HoldoutError(f"--holdout-frac must be in [0, {MAX_FRAC}], got {frac}")
    n = len(targets)
    want = int(round(frac * n))
    if want == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.asarray(targets) > 0                     # (N, C)
    order = np.random.default_rng([seed, stream]).permutation(n)
    chosen = np.zeros(n, dtype=bool)
    counts = pos.sum(axis=0)
    for k in np.argsort(counts, kind="stable"):       # rarest first: a rare class's image also covers others
        if counts[k] < MIN_TRAIN_POSITIVES or (chosen & pos[:, k]).any():
            continue
        chosen[order[pos[order, k]][0]] = True        # the first image with class k in the seeded order
    for i in order:
        if chosen.sum() >= want:
            break
        chosen[i] = True
    return np.flatnonzero(chosen)


def subset(split: CocoSplit, rows: np.ndarray, name: str) -> CocoSplit:
    """The rows `rows` of `split` as a split of its own called `name`."""
    rows = np.asarray(rows, dtype=np.int64)
    targets = split.targets[rows]
    with_objects = int((targets.sum(axis=1) > 0).sum())
    return dataclasses.replace(split, split=name, image_paths=[split.image_paths[i] for i in rows],
                               image_ids=[split.image_ids[i] for i in rows], targets=targets,
                               num_with_objects=with_objects, num_empty=len(rows) - with_objects)


def split_train(split: CocoSplit, frac: float, seed: int, stream: int = HOLDOUT_STREAM,
                held_name: str | None = None) -> tuple[CocoSplit, CocoSplit]:
    """(training part, held-out part) of train2014 (or of a CSV's rows: --val-frac passes its own
    random stream and name)."""
    held = holdout_rows(split.targets, frac, seed, stream)
    keep = np.setdiff1d(np.arange(len(split)), held)
    return subset(split, keep, split.split), subset(split, held, held_name or f"{split.split} held-out")


def write_holdout(run_dir: str | Path, held: CocoSplit, frac: float, seed: int) -> Path:
    """RUN_DIR/holdout.json: the held-out image ids; an existing file must list the same ones."""
    path = Path(run_dir) / HOLDOUT_FILE
    doc = {"format": HOLDOUT_FORMAT, "split": "train2014", "frac": frac, "seed": seed,
           "min_train_positives": MIN_TRAIN_POSITIVES, "image_ids": [int(i) for i in held.image_ids]}
    if path.is_file():
        if read_holdout(path) != doc["image_ids"]:
            raise HoldoutError(f"{path}: lists other held-out images than this run's data and "
                               f"--holdout-frac/--seed give; the data changed since the run started")
        return path
    atomic_write_text(path, json.dumps(doc) + "\n")
    return path


def read_holdout(path: str | Path) -> list[int]:
    """The held-out image ids in a holdout.json; HoldoutError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise HoldoutError(f"{path}: no such file (the run has no held-out split; train with --holdout-frac > 0, "
                           f"or pass --holdout FILE)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != HOLDOUT_FORMAT:
            raise ValueError(f"not a {HOLDOUT_FORMAT} file")
        return [int(i) for i in doc["image_ids"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HoldoutError(f"{path}: not a readable holdout file ({e})") from None


def select_ids(split: CocoSplit, image_ids: list[int], name: str) -> CocoSplit:
    """The images of `split` whose ids are `image_ids` (all must be there)."""
    where = {iid: r for r, iid in enumerate(split.image_ids)}
    missing = [i for i in image_ids if i not in where]
    if missing:
        raise HoldoutError(f"{len(missing)} held-out image ids (e.g. {missing[0]}) are not in {split.split}")
    return subset(split, np.array(sorted(where[i] for i in image_ids), dtype=np.int64), name)
