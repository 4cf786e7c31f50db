"""Multi-label metrics as the literature reports them: mAP and CP, CR, CF1, OP, OR, OF1 (numpy only).

    python -c "import numpy as np; from runtime.metrics import multilabel_metrics as m; \
print(m(np.random.rand(100, 5), np.random.rand(100, 5) > .7)['mAP'])"

AP is non-interpolated, as ASL (helper_functions.py) and ML-GCN (util.py) compute it:
precision averaged at the rank of each positive. Tied scores are handled the way
sklearn.metrics.average_precision_score handles them: a run of equal scores is one
threshold, and every positive in it gets the precision at the end of the run. So the value
does not depend on the order of tied items (FP16 outputs near 1.0 tie often), and on
tie-free scores it equals the plain rank formula.

CP/CR/CF1/OP/OR/OF1 follow ML-GCN's definitions: predict label k when p_k >= threshold;
CP and CR are the means of per-class precision and recall (a class never predicted counts
precision 0), CF1 = 2*CP*CR/(CP+CR) (not the mean of per-class F1s); OP/OR pool all
decisions, OF1 likewise. "_top3" variants first keep only each image's 3 highest scores (and any tied with the 3rd).
Classes with no positive target have no AP or recall: they are skipped from every
class-averaged figure, and reported in "skipped_classes".

Decisions at per-class thresholds (the model contract's): label k is predicted when
p_k >= t_k; CP..OF1 are then computed exactly as above ("_contract" keys).

Calibration (Guo et al. 2017's ECE, applied per label): each label's N probabilities are put
into ECE_BINS equal-width bins [0, 1/15), [1/15, 2/15), ..., [14/15, 1] (1.0 in the last);
ECE_k = sum over bins b of (n_b / N) * |mean of targets in b - mean of probabilities in b|,
i.e. sum_b |sum of targets in b - sum of probabilities in b| / N. The overall ECE pools all
N * C (probability, target) pairs of all labels into the same 15 bins (what a pooled
reliability diagram shows). Brier score: the mean of (p - y)^2 over all N * C pairs.
Every label counts here, with or without positives.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class non-interpolated AP of (N, C) scores against (N, C) {0,1} targets.

    Returns (C,) float64, NaN for classes without positives. Vectorized over classes;
    works on (C, N) rows so each class's sort runs over contiguous memory.
    """
    s = np.ascontiguousarray(np.asarray(scores).T)            # (C, N), float32 stays float32
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    t = np.ascontiguousarray(np.asarray(targets).T > 0)       # (C, N) bool
    c, n = s.shape
    if n == 0:
        return np.full(c, np.nan)
    # Any sort order will do (no stable sort needed): tied runs are scored as one threshold.
    order = np.argsort(-s, axis=1)                            # (C, N) best first
    s = np.take_along_axis(s, order, axis=1)
    t = np.take_along_axis(t, order, axis=1)
    tp = np.cumsum(t, axis=1, dtype=np.float64)               # true positives up to rank i
    # Index of the last item of each run of tied scores: runs end where the next score differs.
    cols = np.broadcast_to(np.arange(n), (c, n))
    is_end = np.ones((c, n), dtype=bool)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    end = np.where(is_end, cols, n - 1)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]  # (C, N) run end for each rank
    precision_at_end = np.take_along_axis(tp, end, axis=1) / (end + 1)
    npos = t.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(t, precision_at_end, 0.0).sum(axis=1) / npos
    ap[npos == 0] = np.nan
    return ap


def _safe_div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def threshold_metrics(pred: np.ndarray, targets: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1 over the class indices `classes`; OP, OR, OF1 over all decisions."""
    pred, targets = np.asarray(pred, bool), np.asarray(targets) > 0
    nc = (pred & targets).sum(axis=0)       # (C,) correct positive predictions
    npred = pred.sum(axis=0)                # (C,) predicted positives
    ngt = targets.sum(axis=0)               # (C,) ground-truth positives
    cp = float(_safe_div(nc[classes], npred[classes]).mean()) if len(classes) else 0.0
    cr = float(_safe_div(nc[classes], ngt[classes]).mean()) if len(classes) else 0.0
    op = float(_safe_div(nc.sum(), npred.sum()))
    orr = float(_safe_div(nc.sum(), ngt.sum()))
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr)}


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, C) bool: True where a score is among its row's k highest.

    A score tied with the k-th highest is kept too, so the result never depends on the
    order of tied labels.
    """
    k = min(k, scores.shape[1])
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:].min(axis=1, keepdims=True)
    return scores >= kth


ECE_BINS = 15


def calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> tuple[float, np.ndarray]:
    """(overall ECE over all pooled labels, (C,) per-label ECE) of (N, C) probabilities; see the module docstring."""
    p = np.asarray(probs, dtype=np.float64)
    y = (np.asarray(targets) > 0).astype(np.float64)
    n, c = p.shape
    if n == 0:
        return float("nan"), np.full(c, np.nan)
    b = np.minimum((p * bins).astype(np.int64), bins - 1).clip(0)       # (N, C) bin of each probability
    flat = (b + bins * np.arange(c)).ravel()                            # (N*C,) per-label bins, label-major
    gap = np.bincount(flat, weights=(y - p).ravel(), minlength=c * bins).reshape(c, bins)  # sum(y) - sum(p)
    per_class = np.abs(gap).sum(axis=1) / n
    pooled = np.abs(gap.sum(axis=0)).sum() / (n * c)
    return float(pooled), per_class


def calibration_error_floor(probs: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The pooled ECE a perfectly calibrated model would still show on this many (N, C) samples.

    Mean over `draws` of calibration_error(probs, y ~ Bernoulli(probs)): ECE is biased upward
    by finite bins, so on a small test set it cannot reach 0; figures near this floor are noise.
    """
    p = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([calibration_error(p, rng.random(p.shape) < p)[0] for _ in range(draws)]))


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error (p - y)^2 over all N * C (probability, target) pairs."""
    p = np.asarray(probs, dtype=np.float64)
    return float(np.mean((p - (np.asarray(targets) > 0)) ** 2)) if p.size else float("nan")


def f1_optimal_thresholds(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds maximising each class's F1 under `predict k when p_k >= t_k`.

    scores, targets: (N, C). Returns ((C,) thresholds, (C,) the F1 they reach); NaN for a
    class without positives. Every cut between two distinct scores is tried (a run of tied
    scores is one cut); the threshold returned lies halfway between the lowest kept score
    and the next lower one (half the lowest score when all are kept), so small numerical
    differences (FP16) at the boundary do not flip a decision.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets) > 0
    n, c = s.shape
    thr, best = np.full(c, np.nan), np.full(c, np.nan)
    for k in range(c):
        npos = int(t[:, k].sum())
        if npos == 0 or n == 0:
            continue
        order = np.argsort(-s[:, k], kind="stable")
        sk, tk = s[order, k], t[order, k]
        tp = np.cumsum(tk)
        ends = np.flatnonzero(np.r_[sk[:-1] != sk[1:], True])          # last index of each tied run
        f1 = 2 * tp[ends] / (ends + 1 + npos)
        j = int(np.argmax(f1))
        e = ends[j]
        lo = sk[e + 1] if e + 1 < n else 0.0
        cut = (sk[e] + lo) / 2
        thr[k] = cut if lo < cut < sk[e] else sk[e]          # (adjacent floats: no midpoint between them)
        best[k] = f1[j]
    return thr, best


def of1_optimal_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(one threshold for every label maximising OF1, that OF1): the F1 search over all pooled decisions."""
    t, f = f1_optimal_thresholds(np.asarray(scores).reshape(-1, 1), np.asarray(targets).reshape(-1, 1))
    return float(t[0]), float(f[0])


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5,
                       contract_thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """All the figures the multi-label literature reports, as fractions in 0..1.

    scores: (N, C) probabilities; targets: (N, C) multi-hot {0, 1}.
    Returns "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", the same with "_top3", "AP" (a
    per-class list, None for skipped classes), "skipped_classes" (indices without
    positives), "num_images", "num_classes_evaluated" and "threshold"; "ECE" (pooled),
    "ECE_per_class" (list) and "Brier"; with contract_thresholds ((C,) per-label
    thresholds), also CP..OF1 at them as "CP_contract" .. "OF1_contract" and "thresholds".
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {scores.shape} and {targets.shape}")
    ap = average_precision(scores, targets)
    evaluated = np.flatnonzero(~np.isnan(ap))
    out: dict[str, Any] = {"mAP": float(ap[evaluated].mean()) if len(evaluated) else float("nan")}
    out.update(threshold_metrics(scores >= threshold, targets, evaluated))
    top3 = threshold_metrics((scores >= threshold) & top_k_mask(scores, 3), targets, evaluated)
    out.update({f"{k}_top3": v for k, v in top3.items()})
    out["AP"] = [None if np.isnan(a) else float(a) for a in ap]
    out["skipped_classes"] = [int(i) for i in np.flatnonzero(np.isnan(ap))]
    out["num_images"] = int(scores.shape[0])
    out["num_classes_evaluated"] = int(len(evaluated))
    out["threshold"] = float(threshold)
    ece, ece_k = calibration_error(scores, targets)
    out.update({"ECE": ece, "ECE_per_class": [float(e) for e in ece_k], "Brier": brier_score(scores, targets)})
    if contract_thresholds is not None:
        thr = np.asarray(contract_thresholds, dtype=np.float64).reshape(1, -1)
        if thr.shape[1] != scores.shape[1]:
            raise ValueError(f"{thr.shape[1]} thresholds for {scores.shape[1]} classes")
        at = threshold_metrics(scores >= thr, targets, evaluated)
        out.update({f"{k}_contract": v for k, v in at.items()})
        out["thresholds"] = [float(v) for v in thr[0]]
    return out
