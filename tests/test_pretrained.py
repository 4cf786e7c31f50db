"""--pretrained imagenet: torchvision's weights through torch's hub cache, hash-checked; --pretrained PATH.

    .venv/bin/python -m pytest -q tests/test_pretrained.py

Nothing is fetched from the internet: the weights are a random resnet18 state_dict saved under a
torchvision-style name (resnet18-<first 8 hex of its sha256>.pth), served by a loopback server
or pre-seeded in a temporary TORCH_HOME, and train.pretrained.imagenet_source is pointed at it.
The hash checks themselves (torch.hub's on download, ours on a cached file) run for real: a file
whose bytes do not match its name is refused both ways.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
import torchvision

import train.pretrained as P
from loopback_http import LoopbackServer, closed_port_url
from train.__main__ import main, parse_args, resolve_config
from train.model import ARCHS, PretrainedWeightsError, build_model
from train.trainer import init_note

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1",
        "--device", "cpu", "--no-progress", "--no-calibrate", "--holdout-frac", "0"]


@pytest.fixture(scope="module")
def weights() -> tuple[str, bytes, dict]:
    """(torchvision-style file name, file bytes, the state_dict) of a random resnet18."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, state


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME; returns its hub/checkpoints directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _source(monkeypatch: pytest.MonkeyPatch, url: str) -> P.WeightsSource:
    src = P.WeightsSource("ResNet18_Weights.TEST", url, 69.758)
    monkeypatch.setattr(P, "imagenet_source", lambda arch: src)
    return src


def test_imagenet_is_torchvisions_best_published_weights() -> None:
    from torchvision.models import get_model_weights
    for arch in ARCHS:
        best = max(get_model_weights(arch), key=lambda w: w.meta["_metrics"]["ImageNet-1K"]["acc@1"])
        src = P.imagenet_source(arch)
        assert src.url == best.url and src.acc1 == best.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    src = P.imagenet_source("resnet101")
    assert (src.name, src.file_name, src.hash_prefix) == ("ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth",
                                                          "cd907fc2")


def test_download_is_hash_checked_then_reused_from_the_cache(weights, hub: Path, monkeypatch) -> None:
    name, data, state = weights
    with LoopbackServer({f"/models/{name}": data}) as srv:
        _source(monkeypatch, f"{srv.url}/models/{name}")
        path, note = P.resolve_pretrained("imagenet", "resnet18")
        assert path == hub / name and path.read_bytes() == data
        assert "checked on download" in note and "ResNet18_Weights.TEST" in note
        path2, note2 = P.resolve_pretrained("imagenet", "resnet18")
        assert path2 == path and "checked on download" not in note2
        assert len(srv.log) == 1                      # the second call reused the cached file
    model = build_model("resnet18", 5, path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and model.fc.out_features == 5


def test_download_with_the_wrong_hash_is_refused(weights, hub: Path, monkeypatch) -> None:
    name, data, _ = weights
    with LoopbackServer({f"/models/{name}": data[:-1] + bytes([data[-1] ^ 1])}) as srv:
        _source(monkeypatch, f"{srv.url}/models/{name}")
        with pytest.raises(PretrainedWeightsError, match="invalid hash value"):
            P.resolve_pretrained("imagenet", "resnet18")
    assert not (hub / name).exists() and not list(hub.glob("*.partial"))


def test_cached_file_with_the_wrong_hash_is_refused(weights, hub: Path, monkeypatch, toy_root: Path,
                                                    tmp_path: Path, capsys) -> None:
    name, data, _ = weights
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data[: len(data) // 2])   # a truncated copy put in place by hand
    _source(monkeypatch, f"{closed_port_url()}/models/{name}")
    assert main(["--coco-root", str(toy_root), "--out", str(tmp_path / "run"), "--pretrained", "imagenet", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{hub / name} has sha256" in err and "not the" in err
    assert not (tmp_path / "run").exists()


def test_offline_without_cache_is_one_line_exit_2(weights, hub: Path, monkeypatch, toy_root: Path,
                                                  tmp_path: Path, capsys) -> None:
    name, _, _ = weights
    src = _source(monkeypatch, f"{closed_port_url()}/models/{name}")
    assert main(["--coco-root", str(toy_root), "--out", str(tmp_path / "run"), "--pretrained", "imagenet", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"probres-train: error: --pretrained imagenet: cannot download {name}")
    assert src.url in err[0] and str(hub / name) in err[0]          # where it comes from, where to put it
    assert not (hub / name).exists()


def test_preseeded_cache_trains_offline_and_the_log_says_which_weights(weights, hub: Path, monkeypatch,
                                                                      toy_root: Path, tmp_path: Path) -> None:
    name, data, _ = weights
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    _source(monkeypatch, f"{closed_port_url()}/models/{name}")      # any download attempt would fail
    assert main(["--coco-root", str(toy_root), "--out", str(tmp_path / "run"), "--pretrained", "imagenet", *TINY]) == 0
    first = (tmp_path / "run" / "train.log").read_text().splitlines()[0]
    assert first.startswith(f"probres-train: weights: ImageNet backbone from torchvision ResNet18_Weights.TEST "
                            f"(ImageNet-1k top-1 69.758%) from {hub / name}, sha256 {name[9:17]} checked")
    # --pretrained PATH keeps working: the same file given by path, named as given (no hash rule for local files)
    cfg, _ = resolve_config(*parse_args(["--coco-root", str(toy_root), "--out", str(tmp_path / "run2"),
                                         "--pretrained", str(hub / name), *TINY]))
    assert (cfg.pretrained_file, cfg.pretrained_note) == (str(hub / name), str(hub / name))
    assert init_note("resnet18", 32, cfg.pretrained_note, False)[0] == \
        f"weights: ImageNet backbone from {hub / name}, new resnet18 head"
