"""Trainer pieces against hand-computed references: losses, EMA, samplers, optimizer groups, one r101 step.

    .venv/bin/python -m pytest -q tests/test_train_units.py
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn

from train.distributed import ResumableSampler, ShardSampler, gather_scores
from train.ema import ModelEma
from train.engine import StepContext, build_optimizer, build_scheduler, param_groups, resolve_amp, train_step
from train.losses import AsymmetricLoss, BCELoss, build_loss
from train.model import build_model


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_bce_is_per_image_sum_over_labels() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 7)) * 3, (rng.random((5, 7)) > 0.6).astype(np.float64)
    p = _np_sigmoid(x)
    ref = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1).mean()
    got = BCELoss()(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_asl_matches_the_paper_formula_and_reduces_to_bce() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 9)) * 3, (rng.random((6, 9)) > 0.7).astype(np.float64)
    p = _np_sigmoid(x)
    gn, gp, m = 4.0, 1.0, 0.05
    pm = np.maximum(p - m, 0)
    ref = -(y * (1 - p) ** gp * np.log(p) + (1 - y) * pm ** gn * np.log(1 - pm)).sum(1).mean()
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    assert AsymmetricLoss(gn, gp, m)(xt, yt).item() == pytest.approx(ref, rel=1e-5)
    assert AsymmetricLoss(0, 0, 0)(xt, yt).item() == pytest.approx(BCELoss()(xt, yt).item(), rel=1e-6)
    # Easy negatives (p < clip) cost nothing: the probability shift zeroes them.
    assert AsymmetricLoss()(torch.full((1, 3), -6.0), torch.zeros(1, 3)).item() == 0.0
    assert isinstance(build_loss("asl"), AsymmetricLoss)
    with pytest.raises(ValueError, match="--loss"):
        build_loss("mse")


def test_losses_are_fp32_under_bf16_logits() -> None:
    x = torch.randn(4, 80).bfloat16()
    y = (torch.rand(4, 80) > 0.9).float()
    for fn in (BCELoss(), AsymmetricLoss()):
        assert fn(x, y).dtype == torch.float32


def test_ema_follows_the_warmed_up_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, horizon_steps=2.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 1
        ema.update(model)
        d = 1 - 1 / min(2.0, max(1.0, t / 2))        # 0, 0, 1/3, 1/2, 1/2 (warm-up, then the horizon)
        assert ema.decay_at(t) == pytest.approx(d)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 5
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_no_weight_decay_on_biases_and_batchnorm() -> None:
    model = build_model("resnet18", 5)
    decay, no_decay = param_groups(model, 1e-4)
    bn_and_bias = {id(p) for n, p in model.named_parameters() if "bn" in n or "downsample.1" in n or n.endswith("bias")}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_onecycle_peaks_at_20_percent() -> None:
    opt = build_optimizer(nn.Linear(2, 2), "adam", 1e-3, 1e-4, 8)
    sched = build_scheduler(opt, 1e-3, epochs=5, steps_per_epoch=20)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == 19 and max(lrs) == pytest.approx(1e-3)
    assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[-1] < 1e-5
    for total in (1, 2, 3, 5, 7):     # tiny runs: no ZeroDivisionError, lr stays finite and positive
        opt = build_optimizer(nn.Linear(2, 2), "adam", 1e-3, 0.0, 8)
        sched = build_scheduler(opt, 1e-3, epochs=1, steps_per_epoch=total)
        for _ in range(total):
            opt.step()
            sched.step()
            assert 0 < sched.get_last_lr()[0] <= 1e-3


def test_amp_resolution() -> None:
    assert resolve_amp("auto", torch.device("cpu")) is None           # fp32 on CPU (measured faster)
    assert resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp("off", torch.device("cuda")) is None


@pytest.mark.parametrize("n, world", [(21, 2), (10, 3), (5, 8), (0, 2)])
def test_shard_sampler_covers_every_index_once(n: int, world: int) -> None:
    seen = sorted(i for r in range(world) for i in ShardSampler(n, r, world))
    assert seen == list(range(n))
    assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def test_gather_scores_orders_and_checks() -> None:
    idx = torch.tensor([3, 0, 2, 1])
    scores = torch.arange(8.0).reshape(4, 2)
    out = gather_scores(idx, scores, 4)
    assert out[3].tolist() == [0.0, 1.0] and out[1].tolist() == [6.0, 7.0]
    with pytest.raises(RuntimeError, match="duplicates or gaps"):
        gather_scores(torch.tensor([0, 0, 1, 2]), scores, 4)


def test_resumable_sampler_skips_into_the_same_permutation() -> None:
    data = list(range(30))
    full = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    full.set_epoch(3)
    order = list(full)
    part = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5, drop_last=True)
    part.set_epoch(3)
    part.set_start(4)
    assert list(part) == order[4:] and len(part) == len(order) - 4 == 11


def test_one_resnet101_448_training_step_cpu() -> None:
    """The production model at the production size: one real optimizer step, batch 2."""
    torch.manual_seed(0)
    model = build_model("resnet101", 80).to(memory_format=torch.channels_last)
    ema = ModelEma(model)
    opt = build_optimizer(model, "adam", 1e-4, 1e-4, 2)
    sched = build_scheduler(opt, 1e-4, epochs=1, steps_per_epoch=10)
    ctx = StepContext(model, BCELoss(), opt, sched, None, ema, torch.device("cpu"), None)
    model.train()
    images = torch.randn(2, 3, 448, 448).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(2, 80) > 0.95).float()
    w0 = model.fc.weight.detach().clone()
    conv0 = model.conv1.weight.detach().clone()
    rm0 = model.bn1.running_mean.clone()
    loss = train_step(ctx, images, targets)
    assert torch.isfinite(loss) and 80 * 0.1 < loss.item() < 80 * 2   # ~80 labels x log 2 at init
    assert not torch.equal(model.fc.weight, w0) and not torch.equal(model.conv1.weight, conv0)
    assert not torch.equal(model.bn1.running_mean, rm0)
    assert sched.last_epoch == 1 and ema.updates == 1
    assert not torch.equal(ema.module.fc.weight, w0)     # EMA moved towards the new weights


def test_train_step_benchmark_smoke(toy_root, tmp_path) -> None:
    """benchmarks/train_step.py runs end to end (tiny settings) and writes its JSON.

    With a forked worker after this process ran OpenCV (the toy_root fixture): this hung
    before make_loader set cv2.setNumThreads(1).
    """
    import json

    from benchmarks.train_step import main as bench

    out = tmp_path / "bench.json"
    assert bench(["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                  "--device", "cpu", "--workers", "1", "--toy-root", str(toy_root), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["synthetic"]["images_per_s"] > 0 and r["loader"]["images_per_s"] > 0
    assert 0 <= r["loader"]["data_wait_frac"] <= 1 and r["loader_only"]["images_per_s"] > 0
    assert r["amp"] == "fp32" and r["channels_last"] is True


def test_cli_arch_list_matches_the_model() -> None:
    from train.__main__ import ARCHS as CLI_ARCHS
    from train.model import ARCHS

    assert CLI_ARCHS == ARCHS


class _Dataset:
    """Just what drop_bad_images asks of a CocoDataset: the path and the decode error of image i."""

    split = type("Split", (), {"image_paths": [f"/data/train2014/img{i}.jpg" for i in range(12)]})()

    def bad_image_message(self, i: int) -> str:
        return f"{self.split.image_paths[i]}: not a decodable image"


class _Loader(list):
    dataset = _Dataset()


def _batch(first: int, bad: set[int]) -> tuple:
    """A loader batch of 4: images first..first+3, the ones in `bad` marked undecodable (index -1 - i)."""
    index = torch.tensor([-1 - i if i in bad else i for i in range(first, first + 4)])
    return torch.rand(4, 3, 16, 16), (torch.rand(4, 3) > 0.5).float(), index


def test_a_wholly_unreadable_batch_is_skipped_alone_and_resume_starts_after_it() -> None:
    from train.distributed import DistInfo
    from train.engine import BadImageError, EpochProgress, drop_bad_images, train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(model, BCELoss(), opt, None, None, None, torch.device("cpu"), None, skip_bad_images=True)
    loader = _Loader([_batch(0, set()), _batch(4, {4, 5, 6, 7}), _batch(8, {9})])
    prog = train_one_epoch(ctx, loader, 1, 1, DistInfo(), EpochProgress(), progress_bar=False)
    # Two optimizer steps, but three batches taken: a resume must start after the third (the sampler
    # offset is batches x batch size), not re-train the one after the skipped batch.
    assert (prog.steps, prog.batches, prog.skipped) == (2, 3, 5)
    # With several processes the others would wait in the all-reduce of the step this one leaves out.
    with pytest.raises(BadImageError, match=r"img4\.jpg.*every image of this process's batch of 4.*2 processes"):
        drop_bad_images(_batch(4, {4, 5, 6, 7}), _Dataset(), True, None, processes=2)
    images, _, index = drop_bad_images(_batch(8, {9}), _Dataset(), True, None, processes=2)   # partly bad: fine
    assert index.tolist() == [8, 10, 11] and len(images) == 3
