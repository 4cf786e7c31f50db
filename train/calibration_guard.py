"""The checks that keep calibration from doing harm: degenerate fits and moved rankings are refused per class.

    python -m train.calibrate --checkpoint runs/toy/best.pt     (train.calibrate runs guard() on every fit)

Platt scaling with a_k > 0 keeps each class's ranking in exact arithmetic, so val mAP "cannot
move". In the float32 head it is served with, it can: a slope near 0 (the maximum-likelihood
answer when the held-out logits carry no signal, e.g. 9 held-out images after one epoch gave
a = 2e-8) folds the head into a near-constant, the ranking collapses into float32 ties and
val mAP fell from 0.3546 to 0.2928. So, per class:
  1. a held-out set too small to fit on (fewer than MIN_FIT_LABELS positive or negative labels
     pooled over all classes) gives the identity for every class, and a warning;
  2. a fit that degenerates (a non-finite a or c, or a < MIN_SLOPE) is refused: a class's own
     fit falls back to the tied fit, a degenerate tied fit to the identity;
  3. a fit that moves the class's val AP, as the folded float32 head computes it, by more than
     MAX_AP_CHANGE is refused the same way (own -> tied -> identity), until none moves.
The identity (a = 1, c = 0) folds into exactly the uncalibrated head, so the result never
scores worse than no calibration: each class's AP is within MAX_AP_CHANGE, hence val mAP too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

MIN_SLOPE = 0.05        # a below this is a 20x temperature: no trained net is that over-confident; it is a collapse
MIN_FIT_LABELS = 10     # pooled held-out positives (and negatives) the tied fit needs
MAX_AP_CHANGE = 1e-4    # per class, as served; mAP is their mean, so it moves by no more


def too_small(y_held: np.ndarray) -> str | None:
    """Why the held-out targets (N, C) are too few to fit on, or None."""
    y = np.asarray(y_held) > 0
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if min(pos, neg) >= MIN_FIT_LABELS:
        return None
    return (f"the held-out set is too small to fit on ({len(y)} images: {pos} positive and {neg} negative labels, "
            f"fewer than {MIN_FIT_LABELS} of either)")


def _degenerate(a: float, c: float) -> str | None:
    if not (np.isfinite(a) and np.isfinite(c)):
        return f"non-finite fit (a {a}, c {c})"
    if a < MIN_SLOPE:
        return f"slope a {a:.2g} < {MIN_SLOPE}"
    return None


def parameters(platt: dict[str, Any], source: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) per class for each class's source: its own fit, the tied fit or the identity."""
    a0, c0 = platt["tied"]
    a = np.array([platt["a"][k] if s == "own" else a0 if s == "tied" else 1.0 for k, s in enumerate(source)])
    c = np.array([platt["c"][k] if s == "own" else c0 if s == "tied" else 0.0 for k, s in enumerate(source)])
    return a, c


def guard(platt: dict[str, Any], val_ap: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Each class's accepted source ("own", "tied", "identity") and why any fit was refused.

    platt: train.calibrate.fit_platt's result ("per_class" says which classes have their own
    fit). val_ap(a, c): (C,) val AP of the head folded with (a, c), as served (NaN for a class
    without val positives). Returns {"source": [..], "refused": {k: reason}, "tied_refused":
    reason or None, "a", "c", "max_ap_change"}.
    """
    c_count = len(platt["a"])
    tied_refused = _degenerate(*platt["tied"])
    source = ["own" if platt["per_class"][k] else "tied" for k in range(c_count)]
    refused: dict[int, str] = {}

    def demote(k: int, why: str) -> None:
        refused[k] = why if k not in refused else f"{refused[k]}; {why}"
        source[k] = "tied" if source[k] == "own" and tied_refused is None else "identity"

    for k in range(c_count):
        if source[k] == "own" and (why := _degenerate(float(platt["a"][k]), float(platt["c"][k]))):
            demote(k, f"own fit: {why}")
        if source[k] == "tied" and tied_refused is not None:
            demote(k, f"tied fit: {tied_refused}")
    ap0 = np.asarray(val_ap(np.ones(c_count), np.zeros(c_count)), dtype=np.float64)
    while True:
        a, c = parameters(platt, source)
        change = np.abs(np.asarray(val_ap(a, c), dtype=np.float64) - ap0)
        moved = [k for k in range(c_count) if source[k] != "identity" and np.nan_to_num(change[k]) > MAX_AP_CHANGE]
        if not moved:
            break
        for k in moved:
            demote(k, f"{source[k]} fit moves val AP by {change[k]:.2g} (> {MAX_AP_CHANGE:g}) as served in float32")
    return {"source": source, "refused": refused, "tied_refused": tied_refused, "a": a, "c": c,
            "max_ap_change": float(np.nanmax(change)) if np.isfinite(change).any() else 0.0}
