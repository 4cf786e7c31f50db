"""The label-dependency layer and the co-occurrence statistics it is judged by.

    python -m train.calibrate --checkpoint runs/toy/best.pt --coco-root data/toy_coco --label-dependency

Layer (a one-step mean-field update over the label graph): with the backbone's logits z (N, C),
    z' = s * z + sigmoid(z) @ W.T + b,      W (C, C) with a zero diagonal, s and b (C,)
so label i's evidence is moved by the believed presence of every other label j (W[i, j] > 0:
j makes i likelier). It costs one C x C matrix product per image. It is fitted by
train.calibrate on the held-out logits of the frozen backbone (BCE + L2 on W), with s = 1;
calibration then folds its Platt parameters into s, W's rows and b (so the exported graph
has no extra calibration op). It lives inside the head: DependentLinear is an nn.Linear
whose forward adds the update, so ONNX export, the PyTorch backend and checkpoints
(keys fc.dep_scale, fc.dep_weight, fc.dep_bias) need nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from runtime.checkpoint import dependent_linear_class, has_label_dependency  # noqa: F401 (re-exported)

L2 = 1e-3            # penalty on sum(W^2), added to the mean BCE; keeps W small on a few held-out images
COOCCUR_MIN = 0.5    # "usually co-occur": P(j | i) >= this on the training set


DependentLinear = dependent_linear_class()     # defined in runtime.checkpoint (the runtime builds it too)


def attach(model: nn.Module) -> nn.Module:
    """Replace model.fc (nn.Linear) by a DependentLinear with the same weights and a zero update."""
    fc = model.fc
    head = DependentLinear(fc.in_features, fc.out_features)
    with torch.no_grad():
        head.weight.copy_(fc.weight)
        head.bias.copy_(fc.bias)
    model.fc = head.to(fc.weight.device)
    return model


def apply(params: dict[str, np.ndarray] | None, z: np.ndarray) -> np.ndarray:
    """z' of (N, C) logits under fitted {"scale", "weight", "bias"} (float64); z itself when None."""
    if params is None:
        return z
    return params["scale"] * z + (1 / (1 + np.exp(-z))) @ params["weight"].T + params["bias"]


def fit(z: np.ndarray, y: np.ndarray, l2: float = L2) -> dict[str, np.ndarray]:
    """W (zero diagonal) and b minimising mean BCE(z', y) + l2 * sum(W^2) on held-out logits z (N, C)."""
    zt = torch.as_tensor(z, dtype=torch.float64)
    yt = torch.as_tensor(y > 0, dtype=torch.float64)
    c = zt.shape[1]
    off = 1 - torch.eye(c, dtype=torch.float64)                        # (C, C) mask: no self-edge
    w = torch.zeros(c, c, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    sz = torch.sigmoid(zt)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = zt + sz @ (w * off).T + b
        loss = nn.functional.binary_cross_entropy_with_logits(out, yt) + l2 * (w * off).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"scale": np.ones(c), "weight": (w * off).detach().numpy(), "bias": b.detach().numpy()}


def cooccurrence(targets: np.ndarray) -> np.ndarray:
    """(C, C) P(j | i) = #images with i and j / #images with i (row i; 0 for a label never present)."""
    t = (np.asarray(targets) > 0).astype(np.float64)
    both = t.T @ t                                                      # (C, C) joint counts
    n_i = np.diag(both)[:, None]
    return np.divide(both, n_i, out=np.zeros_like(both), where=n_i > 0)


def absent_partner_probability(probs: np.ndarray, targets: np.ndarray, cond: np.ndarray,
                               min_cond: float = COOCCUR_MIN) -> tuple[float, int]:
    """The seed's failure mode: mean probability of absent labels j that usually co-occur with a present i.

    Over every (image, j) where j is absent and some present label i has P(j | i) >= min_cond
    (cond: the training set's co-occurrence, i != j). Returns (mean, how many (image, j)).
    """
    t = np.asarray(targets) > 0
    usual = (np.asarray(cond) >= min_cond) & ~np.eye(cond.shape[0], dtype=bool)   # (C, C) i -> j
    expected = (t.astype(np.int64) @ usual.astype(np.int64)) > 0                    # (N, C): some present i -> j
    sel = expected & ~t
    return (float(np.asarray(probs, dtype=np.float64)[sel].mean()) if sel.any() else float("nan")), int(sel.sum())
