"""Issue 11's recipe against independent references: EMA horizon, weight decay, augmentation, fp32 eval, bad images.

    .venv/bin/python -m pytest -q tests/test_train_recipe.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fnn
import torchvision.transforms.v2 as v2

from runtime.contract import PreprocessSpec
from train.__main__ import main
from train.augment import BatchAugment, worker_geometry
from train.ema import ModelEma
from train.engine import build_optimizer, coupled_decay, predict
from train.losses import BCELoss
from train.model import build_model
from train.trainer import effective_lr, init_note

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
        "--device", "cpu", "--no-progress", "--epochs", "1"]


def _weight_of_last_epochs(ema: ModelEma, steps_per_epoch: int, epochs: int, last: int) -> float:
    """After `epochs` epochs, the EMA's total weight on the updates of the last `last` epochs."""
    keep = 1.0
    for t in range((epochs - last) * steps_per_epoch + 1, epochs * steps_per_epoch + 1):
        keep *= ema.decay_at(t)
    return 1.0 - keep


def test_ema_horizon_is_the_same_for_1_and_8_processes() -> None:
    images, per_device = 82_081, 16                  # COCO train images with objects; 16 per GPU
    m = nn.Linear(2, 2)
    one = ModelEma.from_epochs(m, 5.2, images // per_device)           # 5130 steps per epoch
    eight = ModelEma.from_epochs(m, 5.2, images // (8 * per_device))   # 641 steps per epoch
    for e in (2, 10, 40):
        w1 = _weight_of_last_epochs(one, images // per_device, e, 1)
        w8 = _weight_of_last_epochs(eight, images // (8 * per_device), e, 1)
        assert w1 == pytest.approx(w8, abs=2e-3), e
    # After warm-up the last epoch carries 1 - exp(-1/5.2) of the average; at 8 GPUs x 16 the
    # per-step decay is ASL's 0.9997 (batch 128).
    assert _weight_of_last_epochs(eight, 641, 40, 1) == pytest.approx(1 - math.exp(-1 / 5.2), abs=2e-3)
    assert eight.decay == pytest.approx(0.9997, abs=1e-6)
    # A fixed per-step decay (the old behaviour) is not: at 8x the steps per epoch the last epoch weighs far more.
    fixed = ModelEma(m, 1 / (1 - 0.9997))
    assert _weight_of_last_epochs(fixed, 641, 10, 1) < _weight_of_last_epochs(fixed, 5130, 10, 1) / 4


def test_adam_decay_on_mean_loss_equals_the_recipe_on_a_summed_loss() -> None:
    """ASL: Adam, coupled L2 1e-4 (not on biases), loss summed over the batch. Ours: image-mean loss."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 10), (torch.rand(32, 5) > 0.7).float()
    ref_model = nn.Linear(10, 5)
    our_model = nn.Linear(10, 5)
    our_model.load_state_dict(ref_model.state_dict())
    wd, lr = 1e-1, 1e-2                     # large, so that the decay visibly moves the weights
    ref_opt = torch.optim.Adam([{"params": [ref_model.weight], "weight_decay": wd},
                                {"params": [ref_model.bias], "weight_decay": 0.0}], lr=lr, eps=1e-12)
    our_opt = build_optimizer(our_model, "adam", lr, wd, global_batch=32)
    for g in our_opt.param_groups:
        g["eps"] = 1e-12                     # (eps is the only term that sees the loss scale)
    naive = nn.Linear(10, 5)
    naive.load_state_dict(ref_model.state_dict())
    naive_opt = build_optimizer(naive, "adam", lr, wd, global_batch=1)   # the decay not rescaled
    for g in naive_opt.param_groups:
        g["eps"] = 1e-12
    for _ in range(20):
        for model, opt, loss_fn in ((ref_model, ref_opt, lambda z: Fnn.binary_cross_entropy_with_logits(z, y, reduction="sum")),
                                    (our_model, our_opt, lambda z: BCELoss()(z, y)),
                                    (naive, naive_opt, lambda z: BCELoss()(z, y))):
            opt.zero_grad()
            loss_fn(model(x)).backward()
            opt.step()
    assert torch.allclose(our_model.weight, ref_model.weight, atol=1e-5, rtol=1e-4)
    assert (naive.weight - ref_model.weight).abs().max() > 1e-2      # 32x the decay: a different run
    assert coupled_decay(1e-4, 128) == pytest.approx(1e-4 / 128)
    # AdamW's decoupled decay is used as given.
    assert build_optimizer(nn.Linear(2, 2), "adamw", 1e-3, 1e-2, 128).param_groups[0]["weight_decay"] == 1e-2


def test_asl_geometry_squashes_the_whole_image() -> None:
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 120, 200), dtype=torch.uint8)     # 5:3, not square
    spec = PreprocessSpec(size=64)
    out = worker_geometry(spec, "asl")(img)
    assert out.shape == (3, 64, 64)
    whole = v2.functional.resize(img, [64, 64], antialias=True)      # the entire image, aspect squashed
    assert torch.equal(out, whole)
    crop = worker_geometry(spec, "crop")
    assert any(not torch.equal(crop(img), whole) for _ in range(3))


def test_asl_cutout_on_every_image_half_side_random_colour() -> None:
    torch.manual_seed(1)
    n, s = 48, 64
    x = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8)
    out = BatchAugment(PreprocessSpec(size=s), "asl").cutout(x)
    full = 0
    colours = set()
    for k in range(n):
        changed = (out[k] != x[k]).any(0)                              # (S, S)
        ys, xs = torch.nonzero(changed, as_tuple=True)
        assert len(ys) > 0, k                                          # every image is cut
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box = out[k][:, y0:y1, x0:x1]
        assert (box == box[:, :1, :1]).all()                           # one colour fills the box
        assert y1 - y0 <= s // 2 and x1 - x0 <= s // 2
        full += int(y1 - y0 == s // 2 and x1 - x0 == s // 2)
        colours.add(tuple(box[:, 0, 0].tolist()))
    assert full >= n // 5 and len(colours) > n // 2                    # clipped at edges only; colours vary


def test_batched_randaugment_is_torchvision_per_sample() -> None:
    torch.manual_seed(2)
    aug = BatchAugment(PreprocessSpec(size=48), "asl")
    x = torch.randint(0, 256, (24, 3, 48, 48), dtype=torch.uint8)
    ops = aug.sample_ops(24, 48, 48)
    assert len({tuple(r[k] for r in ops) for k in range(24)}) > 12     # per-sample operations, not one per batch
    got = aug.randaugment(x, ops)
    ra = v2.RandAugment(num_ops=2, magnitude=9)
    for k in range(24):
        ref = x[k]
        for row in ops:
            name, mag = row[k]
            ref = ra._apply_image_or_video_transform(ref, name, mag, interpolation=ra.interpolation, fill=ra._fill)
        assert torch.equal(got[k], ref), (k, [r[k] for r in ops])
    # The full transform: uint8 in, normalized float32 out, on CPU tensors as on the GPU.
    y = aug(x)
    assert y.dtype == torch.float32 and y.shape == x.shape


def test_eval_logits_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 7).eval()
    images = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)   # as predict feeds it
    class Loader(list):              # two batches in order; no unreadable rows, so no dataset needed
        dataset = None
    loader = Loader([(images[:3], None, torch.arange(3)), (images[3:], None, torch.arange(3, 6))])
    scores = predict(model, loader, torch.device("cpu"), torch.bfloat16, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # same batches as predict's
        feats = torch.cat([torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(b))))))))), 1) for b, _, _ in loader])
        bf16_logits = torch.cat([model(b) for b, _, _ in loader])
    with torch.no_grad():
        ref = torch.sigmoid(feats.double() @ model.fc.weight.double().T + model.fc.bias.double()).numpy()
    assert np.abs(scores - ref).max() < 1e-6                          # float32 resolution
    assert np.abs(torch.sigmoid(bf16_logits.float()).numpy() - ref).max() > 1e-4   # what bf16 logits lose


def test_init_note_and_lr_reference() -> None:
    note, warn = init_note("resnet101", 448, None, resumed=False)
    assert "from scratch" in note and warn.startswith("WARNING: resnet101 @ 448 from scratch")
    assert init_note("resnet101", 448, "/m/r101.pth", resumed=False) == ("weights: ImageNet backbone from /m/r101.pth, new resnet101 head", None)
    assert init_note("resnet18", 64, None, resumed=False)[1] is None
    assert effective_lr(1e-4, 512, "linear")[0] == pytest.approx(4e-4)
    lr, note = effective_lr(1e-4, 512, "none")
    assert lr == 1e-4 and "not the reference 128" in note


def _root_with_corrupt_image(toy_root: Path, dst: Path) -> tuple[Path, Path]:
    """12 training images (3 steps of 4: a short run), one of them corrupt; val2014 linked."""
    shutil.copytree(toy_root / "annotations", dst / "annotations")
    (dst / "val2014").symlink_to(toy_root / "val2014", target_is_directory=True)
    (dst / "train2014").mkdir()
    doc = json.loads((toy_root / "annotations/instances_train2014.json").read_text())
    keep = sorted({a["image_id"] for a in doc["annotations"]})[:12]
    doc["images"] = [i for i in doc["images"] if i["id"] in keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    (dst / "annotations/instances_train2014.json").write_text(json.dumps(doc))
    for i in doc["images"]:
        os.symlink(toy_root / "train2014" / i["file_name"], dst / "train2014" / i["file_name"])
    bad = dst / "train2014" / doc["images"][5]["file_name"]
    bad.unlink()
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG " * 20)
    return dst, bad


def test_corrupt_training_jpeg_is_one_line_or_skipped(toy_root: Path, tmp_path: Path, capsys) -> None:
    root, bad = _root_with_corrupt_image(toy_root, tmp_path / "coco")
    assert main(["--coco-root", str(root), "--out", str(tmp_path / "stop"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "--skip-bad-images" in err[0] and "Traceback" not in err[0]
    # Skipped and counted; also the device-side augmentation path (uint8 batches), here on CPU tensors.
    run = tmp_path / "skip"
    assert main(["--coco-root", str(root), "--out", str(run), *TINY, "--skip-bad-images", "--augment-on", "device"]) == 0
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["epochs"][0]["skipped_images"] == 1 and doc["epochs"][0]["skipped_paths"] == [str(bad)]
    log = (run / "train.log").read_text().splitlines()
    assert log[0].startswith("probres-train: weights: random initialisation") and "(on the device)" in log[0]
    assert "skipped 1 unreadable training images" in [line for line in log if line.startswith("epoch ")][-1]
    assert doc["config"]["ema_decay_per_step"] == pytest.approx(1 - 1 / (5.2 * doc["config"]["steps_per_epoch"]))
