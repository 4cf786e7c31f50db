"""One of each: image extensions, network builder, graph-facts reader, and one-way preprocessing imports.

    .venv/bin/python -m pytest -q tests/test_structure.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import PreprocessSpec
from runtime.pipeline import IMAGE_EXTENSIONS, iter_image_paths
from runtime.preprocess import preprocess


def _write(path: Path, seed: int) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def test_export_lists_the_images_probres_infer_reads_tiff_included(tmp_path: Path) -> None:
    """--calib-images and --verify-images take every file probres-infer takes from a directory, in its order."""
    pytest.importorskip("onnx")
    from export.int8 import calibration_paths
    from export.verify import list_images, verification_images

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = [_write(d / n, i) for i, n in enumerate(["a.jpg", "b.tif", "c.TIFF", "sub/d.png", "e.webp"])]
    (d / "notes.txt").write_text("not an image")
    infer_order = [Path(p) for p in iter_image_paths([str(d)])]
    assert sorted(infer_order) == sorted(files) and len(IMAGE_EXTENSIONS) >= 9
    assert calibration_paths(d, 100) == infer_order
    assert calibration_paths(d, 2) == infer_order[:2]
    assert list_images(d, 100) == infer_order

    tiffs = tmp_path / "tiffs"                       # a TIFF-only directory: verified on those images
    tiffs.mkdir()
    only = [_write(tiffs / f"{i}.tiff", 10 + i) for i in range(2)]
    spec = PreprocessSpec(size=32)
    x, where = verification_images(spec, {}, tiffs, n=3)
    assert "2 images from" in where
    assert np.array_equal(x, preprocess([str(only[0]), str(only[1]), str(only[0])], spec=spec))


@pytest.mark.parametrize("label_dependency", [False, True])
def test_train_and_runtime_build_the_same_network_for_every_arch(label_dependency: bool) -> None:
    """train.model.build_model (+ train.label_dependency.attach, as calibration does) and the runtime's
    build_network give the same parameter and buffer names, shapes and head class for each arch in ARCHS.
    Built on torch's meta device: no weights are allocated, so resnet152 costs no more than resnet18."""
    torch = pytest.importorskip("torch")
    from runtime.checkpoint import ARCHS, build_network
    from train.label_dependency import attach
    from train.model import ARCHS as TRAIN_ARCHS, build_model

    assert TRAIN_ARCHS is ARCHS
    for arch in ARCHS:
        with torch.device("meta"):
            trained = build_model(arch, 5)
            if label_dependency:
                attach(trained)
            served = build_network(arch, 5, label_dependency)
        a = {k: tuple(v.shape) for k, v in trained.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in served.state_dict().items()}
        assert a == b, arch
        assert type(trained.fc) is type(served.fc) and ("fc.dep_weight" in a) == label_dependency


def test_a_training_checkpoint_builds_what_the_pytorch_backend_runs(tmp_path: Path) -> None:
    """Checkpoint.build (train, export, calibration) and runtime.checkpoint.load_network (the PyTorch backend)
    give the same network: same keys, same outputs, with and without the label-dependency head."""
    torch = pytest.importorskip("torch")
    from runtime.checkpoint import load_network
    from runtime.contract import LabelSet, ModelContract
    from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from train.label_dependency import attach
    from train.model import build_model

    contract = ModelContract(LabelSet.from_categories([{"id": i + 1, "name": f"c{i}"} for i in range(3)]),
                             PreprocessSpec(size=32))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for ld in (False, True):
        torch.manual_seed(1)
        net = build_model("resnet18", 3)
        if ld:
            attach(net)
            with torch.no_grad():
                net.fc.dep_weight.copy_(torch.rand(3, 3) * (1 - torch.eye(3)))
        path = tmp_path / f"ld{ld}.pt"
        save_checkpoint(path, Checkpoint("resnet18", net.state_dict(), contract))
        built = load_checkpoint(path).build()
        served, _, _ = load_network(path)
        assert not built.training and not served.training
        assert list(built.state_dict()) == list(served.state_dict())
        with torch.inference_mode():
            assert torch.equal(built(x), served(x)) and torch.allclose(built(x), net.eval()(x))
