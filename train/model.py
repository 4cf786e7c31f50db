"""The model: torchvision's ResNet with its 1000-way fc replaced by a C-way linear head.

    python -c "from train.model import build_model; print(build_model('resnet101', 80))"

The network outputs logits (N, C); one sigmoid per label turns them into independent
Bernoulli probabilities. Training applies BCE-with-logits; export appends the sigmoid.
Nothing here downloads: ImageNet initialisation comes from a local file (train/pretrained.py
puts torchvision's into torch's hub cache for --pretrained imagenet).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from runtime.checkpoint import ARCHS, build_network

__all__ = ["ARCHS", "PretrainedWeightsError", "WithSigmoid", "build_model"]

# Where torchvision's own ImageNet weights come from (train/pretrained.py fetches them for --pretrained imagenet).
PRETRAINED_HINT = (
    "use --pretrained imagenet (torchvision's weights, downloaded once into torch's hub cache), or pass a local "
    "torchvision state_dict such as https://download.pytorch.org/models/resnet101-cd907fc2.pth (IMAGENET1K_V2)"
)


class PretrainedWeightsError(ValueError):
    """The --pretrained file is missing or is not a matching torchvision state_dict."""


def build_model(arch: str = "resnet101", num_classes: int = 80, pretrained: str | Path | None = None) -> nn.Module:
    """A torchvision ResNet with a `num_classes`-way head (logits).

    pretrained: a local torchvision ImageNet state_dict (.pth) for the backbone; the fc
    layer is re-initialised for the new head. Loaded with weights_only=True.
    """
    model = build_network(arch, num_classes)          # the same network the runtime's reader builds
    if pretrained is not None:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(f"--pretrained {path}: no such file; {PRETRAINED_HINT}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or non-torch file
            raise PretrainedWeightsError(f"--pretrained {path}: not a loadable state_dict ({e.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise PretrainedWeightsError(
                f"--pretrained {path}: does not match {arch} ({len(missing)} missing, {len(unexpected)} unexpected keys)"
            )
    return model


class WithSigmoid(nn.Module):
    """logits -> probabilities, the form that is exported and served."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N,3,S,S) -> (N,C)
        return torch.sigmoid(self.model(images))
