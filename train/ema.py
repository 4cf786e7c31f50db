"""Model EMA: an exponential moving average of the weights, updated every optimizer step.

    python -c "import torch; from train.ema import ModelEma; e = ModelEma(torch.nn.Linear(2, 2)); print(e.decay_at(100))"

The recipe's decay is 0.9997 per step, an average over the last ~3,300 steps: fine for
40 COCO epochs, but a toy run of a few hundred steps would leave the EMA at its random
initialisation. So the decay is warmed up, d_t = decay * (1 - exp(-t / tau)), tau=2000
(YOLOv5's ModelEMA; ASL uses the fixed decay): early on the EMA follows the weights
closely, later it averages over the full horizon.
Floating-point buffers (BatchNorm running statistics) are averaged too; integer buffers
(num_batches_tracked) are copied.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


class ModelEma:
    """Holds `module`, an eval-mode fp32 copy of the model, and updates it from the live weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9997, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau = decay, tau
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * model, after one optimizer step of `model` (unwrapped)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        ema_f, new_f = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                ema_f.append(e)
                new_f.append(m.detach())
            else:
                e.copy_(m)
        # One fused multi-tensor op instead of ~300 small kernels per step (resnet101).
        torch._foreach_lerp_(ema_f, new_f, 1.0 - d)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
