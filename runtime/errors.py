"""probres's errors: one base class, three kinds; every message is one line naming the file or argument.

    python -c "import runtime; print(issubclass(runtime.errors.ImageError, runtime.ProbresError))"

    ProbresError            catch this to catch anything probres reports about your inputs or model
      UsageError            a bad argument, flag, list file or output path (the commands exit 2)
      ModelError            the model cannot be loaded or run here (missing file, wrong device, bad contract)
      ImageError            one input is not a readable image (a bad item in a list: its Prediction.error)

The modules' own errors (runtime.inputs.InputError, runtime.backends.BackendError,
runtime.preprocess.ImageDecodeError, ...) subclass these, so `except ProbresError` covers them.
This module imports nothing: every other module can import it.
"""


class ProbresError(Exception):
    """Base class of every error probres reports; str() is one line for a user."""


class UsageError(ProbresError):
    """A bad argument, flag or file named on the command line (exit status 2)."""


class ModelError(ProbresError):
    """The model file cannot be loaded or run here (exit status 2)."""


class ImageError(ProbresError):
    """An input that is not a readable image; the message names it."""
