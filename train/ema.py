"""Model EMA: an exponential moving average of the weights, updated every optimizer step.

    python -c "import torch; from train.ema import ModelEma; e = ModelEma.from_epochs(torch.nn.Linear(2, 2), 5.2, 641); print(e.decay)"

The averaging horizon is set in epochs (--ema-epochs), not as a per-step decay, so that it
means the same thing at any batch size and number of GPUs: a decay d averages over about
1 / (1 - d) steps, so d = 1 - 1 / (ema_epochs * steps_per_epoch). ASL's 0.9997 per step at a
global batch of 128 (641 steps per COCO epoch) is a 3,333-step horizon, 5.2 epochs: the
default. (A fixed 0.9997 at a global batch of 512 would average over 20 epochs; with the
old 2,000-step warm-up over 6,400 steps it mostly averaged over 1-24 steps instead.)
Warm-up: at step t the EMA averages over the last half of the steps so far, capped at the
horizon: d_t = 1 - 1 / clamp(t / 2, 1, H). That is the same in epochs at any steps-per-epoch,
unlike YOLOv5's d * (1 - exp(-t / tau)) used before, whose late-run excess 1 - d_t grows with
the horizon in steps (tests/test_train_recipe.py measures 7% at 1 GPU vs 1% at 8). A short
run's EMA never sits at the random initialisation. Floating-point buffers (BatchNorm running statistics) are
averaged too; integer buffers (num_batches_tracked) are copied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

WARMUP_FRACTION = 0.5     # during warm-up, the horizon is this fraction of the steps done


class ModelEma:
    """Holds `module`, an eval-mode fp32 copy of the model, and updates it from the live weights."""

    def __init__(self, model: nn.Module, horizon_steps: float = 1 / (1 - 0.9997)) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.horizon = max(float(horizon_steps), 1.0)
        self.updates = 0

    @classmethod
    def from_epochs(cls, model: nn.Module, ema_epochs: float, steps_per_epoch: int) -> "ModelEma":
        """An EMA averaging over `ema_epochs` epochs of `steps_per_epoch` optimizer steps."""
        return cls(model, ema_epochs * steps_per_epoch)

    @property
    def decay(self) -> float:
        """The per-step decay once warmed up."""
        return 1.0 - 1.0 / self.horizon

    def decay_at(self, updates: int) -> float:
        return 1.0 - 1.0 / min(self.horizon, max(1.0, WARMUP_FRACTION * updates))

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
        return {"module": self.module.state_dict(), "updates": self.updates, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
