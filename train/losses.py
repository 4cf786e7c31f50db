"""Multi-label losses on logits: binary cross-entropy (default) and the asymmetric loss (ASL).

    python -c "import torch; from train.losses import build_loss; print(build_loss('asl')(torch.zeros(2, 3), torch.ones(2, 3)))"

Both return the per-image loss summed over labels and averaged over the images of the batch,
(N, C) -> (). Summing over labels is what ASL's code does. Over images ASL SUMS, and the
reduction matters: Adam normalizes the gradient's scale away, except against the coupled L2
term wd * w, which does not scale with the loss. On a mean-reduced loss the recipe's decay
(1e-4 on a loss summed over a batch of 128) is therefore 128x too strong; so
train.engine.build_optimizer divides Adam's coupled decay by the global batch, which is exactly
(up to Adam's eps) the recipe's sum-reduced loss (tests/test_train_recipe.py). AdamW's decoupled
decay does not see the loss and is used as given. Averaging over images keeps the learning
rate independent of the batch size and of the number of GPUs.
Computed in float32 whatever the autocast dtype: log-sigmoid of bf16 logits loses the
small per-label terms that dominate a 80-label sum.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("bce", "asl")


class BCELoss(nn.Module):
    """One sigmoid per label, binary cross-entropy: the paper's loss."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")  # (N, C)
        return loss.sum(1).mean()


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al., ICCV 2021): focal down-weighting of easy negatives plus probability shifting.

    L+ = (1-p)^gamma_pos * log(p);  L- = p_m^gamma_neg * log(1-p_m),  p_m = max(p - clip, 0).
    Defaults are the paper's COCO setting (gamma_neg=4, gamma_pos=0, clip=0.05); with
    gamma_neg = gamma_pos = clip = 0 it is exactly BCE. Answers class imbalance: an image
    has ~3 positive and ~77 negative labels on COCO.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = logits.float(), targets.float()                   # (N, C)
        p = torch.sigmoid(x)
        if self.clip > 0:
            # log(1 - p_m) with the shifted probability; 1 - p_m >= 1 - p, never 0 when clip > 0.
            p_neg = (p - self.clip).clamp(min=0)
            log_neg = torch.log1p(-p_neg).clamp(min=-100)
        else:
            p_neg = p
            log_neg = F.logsigmoid(-x)                           # log(1 - p), stable
        log_pos = F.logsigmoid(x)                                # log(p), stable
        loss = y * log_pos + (1 - y) * log_neg
        if self.gamma_pos > 0 or self.gamma_neg > 0:
            # The focusing weights are constants w.r.t. the gradient, as in ASL's code
            # (disable_torch_grad_focal_loss=True in its published training).
            with torch.no_grad():
                w = torch.where(y > 0, (1 - p).pow(self.gamma_pos), p_neg.pow(self.gamma_neg))
            loss = loss * w
        return -loss.sum(1).mean()


def build_loss(name: str) -> nn.Module:
    """'bce' or 'asl'."""
    if name == "bce":
        return BCELoss()
    if name == "asl":
        return AsymmetricLoss()
    raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {name!r}")
