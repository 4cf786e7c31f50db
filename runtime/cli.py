"""What every probres command shares: argument types and the usage error.

    probres-infer --engine model.onnx photos/ --threshold 0.4 --top-k 3 --batch-size 8

The command modules (runtime.infer, runtime.eval, ...) parse flags with these types and turn a
ProbresError into one stderr line and exit status 2 (runtime.outputs.exit_code for signals);
below this layer nothing sees argparse (the library, runtime.api, takes plain keyword arguments).
"""

from __future__ import annotations

import argparse

from runtime.errors import UsageError  # noqa: F401  (the one usage-error class, for the commands)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def top_k_arg(text: str) -> int | str:
    """argparse type of --top-k: a positive integer or 'all'."""
    return "all" if text.strip().lower() == "all" else positive_int(text)


def probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return v


def threshold_arg(text: str) -> str | float:
    """--threshold: 'contract' (the model's per-label thresholds) or one probability for every label."""
    return "contract" if text.strip().lower() == "contract" else probability(text)

