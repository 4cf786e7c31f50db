"""What every probres command shares: argument types, the usage error, and the steps of a run
that end in one stderr line and an exit status (the output's lock, the model's loading, a failed write).

    probres-infer --engine model.onnx photos/ --threshold 0.4 --top-k 3 --batch-size 8

The command modules (runtime.infer, runtime.eval, ...) parse flags with these types and turn a
ProbresError into one stderr line and exit status 2 (runtime.outputs.exit_code for signals);
below this layer nothing sees argparse (the library, runtime.api, takes plain keyword arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Callable

from runtime.backends import Backend, BackendError, open_backend
from runtime.errors import UsageError  # noqa: F401  (the one usage-error class, for the commands)
from runtime.fileio import OutputLock, OutputLocked
from runtime.outputs import OutputError, exit_code, interrupted_by
from runtime.provenance import header

if TYPE_CHECKING:
    from runtime.infer import InferJob


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


# probres-infer's steps, shared by its image route (runtime.infer) and video route (runtime.video).

def lock_output(hold: contextlib.ExitStack, output: str | None) -> None:
    """Hold --output's lock on `hold` for the run; OutputError (one line, exit 2) when another run writes it."""
    try:
        hold.enter_context(OutputLock(output))
    except OutputLocked as e:
        raise OutputError(f"--output {e}") from None


def job_header(job: "InferJob") -> dict | None:
    """The run's provenance header (the model and the rule); None when the model cannot be read (loading it says why)."""
    try:
        return header(job.engine, job.threshold, job.top_k)
    except OSError:
        return None


def open_model(job: "InferJob", prog: str, load: Callable[..., Backend] = open_backend) -> Backend | int:
    """The job's backend (`load`: runtime.backends.open_backend, or the caller's), or the exit code after
    one stderr line (2: cannot load; 130/143/129: interrupted)."""
    try:
        return load(job.engine, device=job.device, threads=job.threads, **job.backend_options)
    except BackendError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:                # loading can take minutes (--compile, a big plan)
        print(f"{prog}: interrupted{interrupted_by(e)} while loading {job.engine}", file=sys.stderr)
        return exit_code(e)


def write_failed(e: OSError, output: str | None, prog: str) -> int:
    """The exit code for an output that failed: 1, quietly, for a closed pipe (`probres-infer ... | head`),
    else 2 after a 'cannot write' line (--output not writable, disk full)."""
    if isinstance(e, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    print(f"{prog}: error: cannot write {output or 'stdout'}: {e.strerror or e}", file=sys.stderr)
    return 2
