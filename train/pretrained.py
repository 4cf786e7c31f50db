"""--pretrained: torchvision's ImageNet weights from torch's hub cache (hash-checked), or a local file.

    probres-train --coco-root data/coco --out runs/r101 --pretrained imagenet
    python -c "from train.pretrained import resolve_pretrained; print(resolve_pretrained('imagenet', 'resnet18'))"

`imagenet` means the best ImageNet-1k weights torchvision publishes for the architecture
(its Weights.DEFAULT: IMAGENET1K_V2 for resnet50/101/152, V1 for resnet18/34). The file
goes where torch.hub keeps downloads ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints
by default) under torchvision's own name, e.g. resnet101-cd907fc2.pth, whose hex part is the
start of the file's sha256. torch.hub checks that hash when it downloads, but not when it
reuses a cached file; this module checks it then too, so that a truncated or swapped file
(copied in by hand on an offline machine, say) is refused rather than trained from.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from runtime.fileio import sha256_file
from train.model import PRETRAINED_HINT, PretrainedWeightsError

DOWNLOAD_TIMEOUT_S = 60.0     # per socket operation: an unreachable network fails instead of hanging


@dataclass(frozen=True)
class WeightsSource:
    """One published weights file: its torchvision name, URL and ImageNet-1k top-1."""

    name: str          # e.g. "ResNet101_Weights.IMAGENET1K_V2"
    url: str
    acc1: float

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix torchvision's file names carry ("resnet101-cd907fc2.pth" -> "cd907fc2")."""
        m = re.search(r"-([a-f0-9]+)\.", self.file_name)
        if m is None:
            raise PretrainedWeightsError(f"{self.url}: the file name carries no sha256 prefix to check")
        return m.group(1)


def imagenet_source(arch: str) -> WeightsSource:
    """torchvision's best ImageNet-1k weights for `arch` (its Weights.DEFAULT)."""
    from torchvision.models import get_model_weights
    w = get_model_weights(arch).DEFAULT
    return WeightsSource(f"{type(w).__name__}.{w.name}", w.url, float(w.meta["_metrics"]["ImageNet-1K"]["acc@1"]))


def hub_checkpoints_dir() -> Path:
    """Where torch.hub.load_state_dict_from_url keeps files: $TORCH_HOME/hub/checkpoints."""
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torch.hub's urlopen takes no timeout; the process default is the only handle on it.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def fetch_imagenet(arch: str) -> tuple[Path, str]:
    """(the cached weights file, a description for the log), downloading it on first use.

    Raises PretrainedWeightsError with one line naming the file, where it goes and where it
    comes from when the download fails or the file's sha256 does not match its name.
    """
    import torch.hub
    src = imagenet_source(arch)
    cache = hub_checkpoints_dir()
    path = cache / src.file_name
    where = (f"on a machine with internet download {src.url} and put it at {path} (torch's hub cache: "
             f"$TORCH_HOME/hub/checkpoints), or pass a local file with --pretrained PATH")
    cache.mkdir(parents=True, exist_ok=True)
    # One download per machine when torchrun starts several processes: the others wait here, then reuse it.
    with open(cache / f".{src.file_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(f"probres-train: downloading {src.url} to {path}", flush=True)   # (stdout, as torch.hub does)
            try:
                with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                    torch.hub.download_url_to_file(src.url, str(path), src.hash_prefix, progress=True)
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                reason = str(getattr(e, "reason", None) or e).splitlines()[0]
                raise PretrainedWeightsError(f"--pretrained imagenet: cannot download {src.file_name} "
                                             f"({reason}); {where}") from None
            checked = "checked on download"
        else:
            digest = sha256_file(path)
            if not digest.startswith(src.hash_prefix):
                raise PretrainedWeightsError(
                    f"--pretrained imagenet: {path} has sha256 {digest[:12]}..., not the {src.hash_prefix} its "
                    f"name promises (a partial or different file); delete it to download again, or {where}")
            checked = "checked"
    note = (f"torchvision {src.name} (ImageNet-1k top-1 {src.acc1:g}%) from {path}, sha256 {src.hash_prefix} "
            f"{checked}")
    return path, note


def resolve_pretrained(value: str, arch: str) -> tuple[Path, str]:
    """--pretrained VALUE -> (state_dict file, what the log's first line calls it).

    VALUE is `imagenet` (torchvision's weights via the hub cache) or a local state_dict path.
    """
    if value == "imagenet":
        return fetch_imagenet(arch)
    path = Path(value)
    if not path.is_file():
        raise PretrainedWeightsError(f"--pretrained {value}: no such file; {PRETRAINED_HINT}")
    return path, str(path)
