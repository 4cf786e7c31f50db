"""The pictures of calibration: reliability diagrams, per-class thresholds, the co-occurrence heatmap (matplotlib).

    probres-eval --engine model.onnx --coco-root data/toy_coco --plot plots/   (reliability.png)

matplotlib is imported inside each function (Agg backend, no display), so the runtime needs it
only when a picture is asked for (`pip install matplotlib`, or the `plot` extra). Every PNG is
written through runtime.fileio (temp file, then rename). Reliability bins are the ECE's
(runtime.metrics.ECE_BINS equal-width bins, all labels pooled).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.fileio import atomic_write_bytes
from runtime.metrics import ECE_BINS, calibration_error


class PlotError(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("pictures need matplotlib: pip install matplotlib (or the 'plot' extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)          # pyplot keeps every figure until closed (clf() only empties it): memory, warnings
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled over labels: (mean probability, fraction positive, count) of each non-empty bin."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = (np.asarray(targets) > 0).ravel().astype(np.float64)
    b = np.minimum((p * bins).astype(np.int64), bins - 1).clip(0)
    n = np.bincount(b, minlength=bins)
    mp = np.bincount(b, weights=p, minlength=bins)
    my = np.bincount(b, weights=y, minlength=bins)
    ok = n > 0
    return mp[ok] / n[ok], my[ok] / n[ok], n[ok]


def reliability_diagram(path: str | Path, curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
                        title: str = "Reliability (all labels pooled)") -> Path:
    """One PNG: fraction positive vs mean probability per bin for each (name, probs (N, C), targets (N, C))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for name, probs, targets in curves:
        mp, my, _ = reliability_bins(probs, targets)
        ece, _ = calibration_error(probs, targets)
        ax.plot(mp, my, marker="o", ms=4, label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="fraction of positives",
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def thresholds_bar(path: str | Path, names: Sequence[str], thresholds: Sequence[float],
                   per_class: Sequence[bool], global_threshold: float) -> Path:
    """Bar chart of the contract's per-label thresholds (per-class F1 fits vs the global OF1 one)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * len(names) + 2), 3.6))
    colours = ["tab:blue" if pc else "tab:grey" for pc in per_class]
    ax.bar(range(len(names)), thresholds, color=colours)
    ax.axhline(global_threshold, c="tab:orange", lw=1, label=f"global (OF1) {global_threshold:.3f}")
    ax.axhline(0.5, c="black", lw=0.8, ls=":", label="0.5")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="threshold", title="Contract thresholds (blue: own F1 fit; grey: global)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def cooccurrence_heatmap(path: str | Path, names: Sequence[str], cond: np.ndarray) -> Path:
    """Heatmap of P(j | i): row i (present), column j."""
    plt = _pyplot()
    c = len(names)
    side = max(4.5, 0.16 * c + 3)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(cond, vmin=0, vmax=1, cmap="viridis")
    fs = 7 if c <= 20 else 4
    ax.set_xticks(range(c), names, rotation=90, fontsize=fs)
    ax.set_yticks(range(c), names, fontsize=fs)
    ax.set(xlabel="label j", ylabel="given label i", title="Training-set co-occurrence P(j | i)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
