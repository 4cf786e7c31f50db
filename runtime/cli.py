"""What every probres command shares: argument types, the usage error, exit codes.

    probres-infer --engine model.onnx photos/ --threshold 0.4 --top-k 3 --batch-size 8

The command modules (runtime.infer, runtime.eval, ...) parse flags with these types and turn
a ProbresError into one stderr line and an exit status with `fail`; below this layer nothing
sees argparse (the library, runtime.api, takes plain keyword arguments).
"""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ProbresError, UsageError  # noqa: F401  (UsageError: the one usage-error class)

EXIT_OK = 0              # every input classified / the gate passed
EXIT_FAILED = 1          # some inputs failed / the gate failed
EXIT_USAGE = 2           # a usage, model or data error: one line, no traceback
EXIT_INTERRUPTED = 130   # Ctrl-C


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


def fail(prog: str, e: BaseException | str, code: int = EXIT_USAGE) -> int:
    """Print `prog: error: e` (one line) on stderr; return the exit status `code` for main to return."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return code
