"""PyTorch backend: a training checkpoint (best.pt) run as the reference the exported models are checked against.

    python -c "from runtime.backends.torch_backend import TorchBackend as B; print(B('runs/x/best.pt').describe())"

Needs the training extra (torch, torchvision). torch and train.checkpoint are imported inside
the constructor, so the runtime package itself never imports torch. The checkpoint's network
outputs logits; one sigmoid per label turns them into probabilities, as the export does.
"""

from __future__ import annotations

import os

import numpy as np

from runtime.backends.base import Backend, BackendError


class TorchBackend(Backend):
    """Checkpoint.build() in eval mode, FP32, on the CPU or a CUDA device."""

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None) -> None:
        try:
            import torch

            from train.checkpoint import CheckpointError, load_checkpoint
        except ImportError as e:
            raise BackendError(f"{path}: a .pt checkpoint needs the training extra (pip install -e '.[train]'): {e}") from None
        self.path = str(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: this torch build sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            raise BackendError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:  # a dict missing keys
            raise BackendError(f"{path}: incomplete checkpoint ({e.__class__.__name__}: {e})") from None
        try:
            model = ckpt.build()
        except (RuntimeError, ValueError, KeyError) as e:  # state_dict does not fit the arch
            raise BackendError(f"{path}: checkpoint weights do not build a {ckpt.arch} "
                               f"({str(e).strip().splitlines()[0][:200]})") from None
        self._torch = torch
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self.contract = ckpt.contract
        self.precision = "fp32"
        self.val_metrics = dict(ckpt.val_metrics) or None
        self.name = f"pytorch[{device}]"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device)
            probs = torch.sigmoid(self._model(x).float())   # (N, C) logits -> probabilities
        return probs.cpu().numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        self._model = None
