"""Platt scaling, contract thresholds and the fold into the head: the numbers train.calibrate writes.

    python -c "import numpy as np; from train.platt import fit_platt; z = np.random.randn(200, 3); print(fit_platt(z, z > 0.5)['a'])"

Arrays in, arrays out (and, for fold, a model changed in place); train/calibrate.py reads the
held-out split, runs these, checks them (train/calibration_guard.py) and writes the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from runtime.metrics import f1_optimal_thresholds, of1_optimal_threshold
from train import label_dependency as LD

MIN_POSITIVES = 20          # held-out positives a class needs for its own Platt fit and threshold
PRIOR_WEIGHT = 10.0         # per-class Platt: strength of the prior toward the tied fit, in held-out images
THRESHOLD_RANGE = (1e-4, 1 - 1e-4)   # contract thresholds must lie in (0, 1)
THRESHOLD_RULES = ("half-f1", "argmax")   # choose_thresholds: F*/2 (default) or the held-out argmax cut


class CalibrationError(ValueError):
    """Bad input to calibration (already calibrated, no held-out split...); one line, exit 2."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise (float64 in, float64 out)."""
    return 1 / (1 + np.exp(-x))


def fit_platt(z: np.ndarray, y: np.ndarray, min_positives: int = MIN_POSITIVES,
              prior: float = PRIOR_WEIGHT) -> dict[str, Any]:
    """Per-class (a_k > 0, c_k) for sigmoid(a_k z_k + c_k), shrunk toward one tied fit shared by all classes.

    z, y: (N, C) logits and 0/1 targets. The tied fit (a0, c0) minimises the mean NLL of all
    labels pooled. Each class with >= min_positives positives then minimises its summed NLL plus
    prior/2 * ((log a_k - log a0)^2 + (c_k - c0)^2): a Gaussian prior centred on the tied fit,
    worth about `prior` images, so a class with little data stays near the pooled answer and a
    class with plenty gets its own (prior=0: the unpenalised ML fit, as sklearn's). Classes with
    fewer positives take (a0, c0). Returns {"a": (C,), "c": (C,), "per_class": (C,) bool,
    "tied": (a0, c0), "temperature": 1/a0}.
    """
    zt = torch.as_tensor(z, dtype=torch.float64)
    yt = torch.as_tensor(y > 0, dtype=torch.float64)
    c = zt.shape[1]
    bce = nn.functional.binary_cross_entropy_with_logits

    def minimise(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
        opt = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        opt.step(closure)

    # Tied: one (a0, c0) for every label. Not a temperature alone (c0 = 0): a ResNet trained by
    # README's CPU recipe is over-confident below p ~ 0.3 and under-confident above it, a shift
    # plus a sharpening. Fitted on 450 toy val images and scored on 456 others (a design check,
    # RESULTS.md), a temperature left 0.82x the ECE, (a0, c0) 0.53x.
    log_a0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    c0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    minimise([log_a0, c0], lambda: bce(zt * log_a0.exp() + c0, yt))
    la0, cc0 = log_a0.detach(), c0.detach()
    log_a = la0.repeat(c).clone().requires_grad_(True)
    bias = cc0.repeat(c).clone().requires_grad_(True)
    # The classes' problems are independent: the sum over classes has each class's optimum as its optimum.
    minimise([log_a, bias], lambda: bce(zt * log_a.exp() + bias, yt, reduction="sum")
             + prior / 2 * (((log_a - la0) ** 2).sum() + ((bias - cc0) ** 2).sum()))
    per_class = (np.asarray(y) > 0).sum(0) >= min_positives
    a0, b0 = float(la0.exp()), float(cc0)
    a = np.where(per_class, log_a.detach().exp().numpy(), a0)
    cc = np.where(per_class, bias.detach().numpy(), b0)
    return {"a": a, "c": cc, "per_class": per_class, "tied": (a0, b0), "temperature": 1 / a0}


def choose_thresholds(p: np.ndarray, y: np.ndarray, min_positives: int = MIN_POSITIVES,
                      rule: str = "half-f1") -> dict[str, Any]:
    """Contract thresholds from calibrated held-out probabilities p and targets y, both (N, C).

    Each class with >= min_positives positives gets its own F1-maximising threshold, the others
    the one global threshold that maximises OF1. rule "argmax": the cut that maximises F1 on the
    held-out set itself. rule "half-f1" (default): F*/2, F* being that maximal F1; for calibrated
    probabilities the F1-optimal threshold is half the optimal F1 (Lipton, Elkan & Narayanaswamy,
    "Optimal thresholding of classifiers to maximize F1", ECML 2014). F* is a maximum over a flat
    curve and moves little between samples, the argmax cut moves a lot: on README's toy recipe
    (18 held-out images) the argmax cut lost 0.031 val CF1 against 0.5 and F*/2 lost 0.0005.
    """
    if rule not in THRESHOLD_RULES:
        raise CalibrationError(f"threshold rule {rule!r}: expected one of {', '.join(THRESHOLD_RULES)}")
    per, f_per = f1_optimal_thresholds(p, y)
    glob, f_glob = of1_optimal_threshold(p, y)
    if rule == "half-f1":
        per, glob = f_per / 2, f_glob / 2
    own = ((np.asarray(y) > 0).sum(0) >= min_positives) & ~np.isnan(per)
    thr = np.clip(np.where(own, per, glob), *THRESHOLD_RANGE)
    return {"thresholds": thr, "per_class": own, "global": float(np.clip(glob, *THRESHOLD_RANGE)), "rule": rule}


def fold(model: nn.Module, a: np.ndarray, c: np.ndarray, dep: dict[str, np.ndarray] | None) -> nn.Module:
    """Put a * z' + c into the head's parameters (in place): fc's weight/bias, or the dependency layer's."""
    fc = model.fc
    at = torch.as_tensor(a, dtype=torch.float64, device=fc.weight.device)
    ct = torch.as_tensor(c, dtype=torch.float64, device=fc.weight.device)
    with torch.no_grad():
        if dep is None:
            if isinstance(fc, LD.DependentLinear):
                raise CalibrationError("the checkpoint already has a label-dependency head; calibrate the uncalibrated one")
            fc.weight.copy_((fc.weight.double() * at[:, None]).to(fc.weight.dtype))
            fc.bias.copy_((fc.bias.double() * at + ct).to(fc.bias.dtype))
        else:
            LD.attach(model)
            fc = model.fc
            d = {k: torch.as_tensor(v, dtype=torch.float64, device=at.device) for k, v in dep.items()}
            fc.dep_scale.copy_(d["scale"] * at)
            fc.dep_weight.copy_(d["weight"] * at[:, None])
            fc.dep_bias.copy_(d["bias"] * at + ct)
    return model
