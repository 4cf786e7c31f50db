"""Calibration, thresholds and the label-dependency layer: metrics against hand computations and brute force,
the fold against the explicit formula, the contract's thresholds through every artifact.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_calibration.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.contract import ContractError, LabelSet, ModelContract, PreprocessSpec
from runtime.fileio import strict_json
from runtime.metrics import (average_precision, brier_score, calibration_error, f1_optimal_thresholds,
                             multilabel_metrics, of1_optimal_threshold)
from train import label_dependency as LD
from train.calibrate import choose_thresholds, fit_platt, fold
from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from train.holdout import MIN_TRAIN_POSITIVES, holdout_rows

TOY = LabelSet.from_categories([(1, "person"), (3, "car"), (85, "clock")])


# ------------------------------------------------------------------------------------------- metrics

def test_ece_and_brier_against_a_hand_computation():
    p = np.array([[0.05, 0.2], [0.05, 0.8], [0.95, 1.0], [0.5, 0.0]])
    y = np.array([[0, 0], [1, 1], [1, 1], [1, 0]])
    overall, per_class = calibration_error(p, y)
    # label 0: bin 0 holds 0.05, 0.05 (targets 0, 1): 2/4 * |0.5 - 0.05|; bin 7 holds 0.5 (1): 1/4 * 0.5;
    # bin 14 holds 0.95 (1): 1/4 * 0.05.  label 1: bins 3 (0.2, 0), 12 (0.8, 1): 0.2 / 4 each; 1.0 and 0.0 exact.
    assert per_class == pytest.approx([0.225 + 0.125 + 0.0125, 0.1])
    # pooled, 8 pairs: bin 0 {0.05:0, 0.05:1, 0.0:0} |1 - 0.1|; bin 3 0.2; bin 7 0.5; bin 12 0.2; bin 14 {0.95, 1.0} 0.05
    assert overall == pytest.approx((0.9 + 0.2 + 0.5 + 0.2 + 0.05) / 8)
    assert brier_score(p, y) == pytest.approx((0.0025 + 0.9025 + 0.0025 + 0.25 + 0.04 + 0.04) / 8)
    m = multilabel_metrics(p, y)
    assert m["ECE"] == pytest.approx(overall) and m["ECE_per_class"] == pytest.approx(per_class)


def _f1_at(s: np.ndarray, t: np.ndarray, thr: float) -> float:
    pred = s >= thr
    tp = (pred & t).sum()
    return 2 * tp / (pred.sum() + t.sum())


def test_f1_optimal_thresholds_match_a_brute_force_search():
    rng = np.random.default_rng(3)
    s = np.round(rng.random((120, 6)), 2)                 # rounded: many ties
    t = rng.random((120, 6)) < np.linspace(0.05, 0.5, 6)
    thr, f1 = f1_optimal_thresholds(s, t)
    for k in range(6):
        brute = max(_f1_at(s[:, k], t[:, k], c) for c in np.unique(s[:, k]))
        assert f1[k] == pytest.approx(brute)
        assert _f1_at(s[:, k], t[:, k], thr[k]) == pytest.approx(brute)     # the threshold reaches it
        assert 0 < thr[k] < 1
    g, of1 = of1_optimal_threshold(s, t)
    assert of1 == pytest.approx(max(_f1_at(s.ravel(), t.ravel(), c) for c in np.unique(s)))
    m = multilabel_metrics(s, t, contract_thresholds=np.full(6, g))
    assert m["OF1_contract"] == pytest.approx(of1)


def test_contract_thresholds_are_per_class_only_with_enough_positives():
    rng = np.random.default_rng(0)
    p = rng.random((200, 3))
    y = np.zeros((200, 3), dtype=np.uint8)
    y[:60, 0] = 1
    y[:5, 1] = 1                                           # too few positives: takes the global threshold
    y[:30, 2] = 1
    out = choose_thresholds(p, y, min_positives=20, rule="argmax")
    assert out["per_class"].tolist() == [True, False, True]
    assert out["thresholds"][1] == out["global"] == pytest.approx(of1_optimal_threshold(p, y)[0])
    per, f_per = f1_optimal_thresholds(p, y)
    assert out["thresholds"][[0, 2]] == pytest.approx(per[[0, 2]])
    half = choose_thresholds(p, y, min_positives=20)             # default: F*/2
    assert half["rule"] == "half-f1" and half["per_class"].tolist() == [True, False, True]
    assert half["thresholds"][[0, 2]] == pytest.approx(f_per[[0, 2]] / 2)
    assert half["thresholds"][1] == half["global"] == pytest.approx(of1_optimal_threshold(p, y)[1] / 2)


def test_half_the_best_f1_is_the_f1_optimal_threshold_of_calibrated_probabilities():
    # Labels drawn from the probabilities themselves (calibrated by construction), many of them:
    # the held-out argmax cut and F*/2 must agree (Lipton et al. 2014), at several base rates.
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2.5, (200_000, 3)) + np.array([-3.0, -1.0, 0.5])
    p = 1 / (1 + np.exp(-z))
    y = rng.random(p.shape) < p
    per, f_per = f1_optimal_thresholds(p, y)
    assert np.abs(per - f_per / 2).max() < 0.02                  # the F1 curve is flat near its top ...
    for k in range(3):                                            # ... and F*/2 reaches the top of it
        assert _f1_at(p[:, k], y[:, k], f_per[k] / 2) >= f_per[k] - 1e-3


# --------------------------------------------------------------------------------------------- Platt

def test_platt_matches_sklearn_and_keeps_the_ranking():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 2))
    y = rng.random((3000, 2)) < 1 / (1 + np.exp(-(np.array([0.4, 2.5]) * z + np.array([-0.5, 1.0]))))
    fit = fit_platt(z, y, min_positives=20, prior=0.0)       # no prior: the plain ML fit per class
    for k in range(2):
        ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z[:, k:k + 1], y[:, k])   # unpenalised ML logistic fit
        assert fit["a"][k] == pytest.approx(ref.coef_[0, 0], rel=1e-4)
        assert fit["c"][k] == pytest.approx(ref.intercept_[0], abs=1e-4)
    p = 1 / (1 + np.exp(-(fit["a"] * z + fit["c"])))
    assert np.array_equal(average_precision(p, y), average_precision(z, y))


def test_tied_platt_is_the_pooled_logistic_fit_and_the_prior_shrinks_thin_classes_toward_it():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    n = 4000
    z = rng.normal(0, 2, (n, 3))
    truth_a, truth_c = np.array([1.5, 0.6, 1.0]), np.array([-1.0, 0.5, 0.0])
    y = (rng.random((n, 3)) < 1 / (1 + np.exp(-(truth_a * z + truth_c)))).astype(np.uint8)
    fit = fit_platt(z, y, min_positives=20)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z.reshape(-1, 1), y.reshape(-1))
    assert fit["tied"][0] == pytest.approx(ref.coef_[0, 0], rel=1e-4)        # all labels pooled
    assert fit["tied"][1] == pytest.approx(ref.intercept_[0], abs=1e-4)
    # With 4000 images a prior worth 10 barely moves a class off its own ML fit ...
    own = fit_platt(z, y, min_positives=20, prior=0.0)
    assert np.abs(np.log(fit["a"]) - np.log(own["a"])).max() < 0.03
    assert np.abs(fit["c"] - own["c"]).max() < 0.03
    # ... with 30 images it holds the class much nearer the tied fit than its own ML fit is.
    few = fit_platt(z[:30], y[:30], min_positives=1)
    few_ml = fit_platt(z[:30], y[:30], min_positives=1, prior=0.0)
    a0, c0 = few["tied"]
    dist = lambda f: np.abs(np.log(f["a"]) - np.log(a0)) + np.abs(f["c"] - c0)   # noqa: E731
    assert (dist(few) < 0.6 * dist(few_ml)).all()
    # A class below min_positives takes the tied fit exactly.
    y2 = y.copy()
    y2[:, 1] = 0
    y2[:5, 1] = 1
    thin = fit_platt(z, y2, min_positives=20)
    assert not thin["per_class"][1] and (thin["a"][1], thin["c"][1]) == thin["tied"]


# -------------------------------------------------------------------------------------------- fold

def test_fold_into_the_head_equals_applying_a_z_plus_c(toy_checkpoint: Path):
    ck = load_checkpoint(toy_checkpoint)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32))
    model = ck.build()
    with torch.no_grad():
        z = model(x).double().numpy()                      # (5, C) logits before calibration
    c = z.shape[1]
    rng = np.random.default_rng(2)
    a, cc = rng.uniform(0.3, 3, c), rng.normal(0, 1, c)
    dep = {"scale": np.ones(c), "weight": rng.normal(0, 0.5, (c, c)) * (1 - np.eye(c)), "bias": rng.normal(0, 0.3, c)}
    for d in (None, dep):
        want = 1 / (1 + np.exp(-(a * LD.apply(d, z) + cc)))
        folded = fold(ck.build(), a, cc, d)
        with torch.no_grad():
            got = torch.sigmoid(folded(x)).double().numpy()
        assert np.abs(got - want).max() <= 1e-6
        # ... and it survives a checkpoint round trip (the dependency head is rebuilt from its keys).
        path = toy_checkpoint.parent / f"folded_{d is None}.pt"
        save_checkpoint(path, Checkpoint(ck.arch, folded.state_dict(), ck.contract))
        with torch.no_grad():
            again = torch.sigmoid(load_checkpoint(path).build()(x)).double().numpy()
        assert np.abs(again - want).max() <= 1e-6


def test_label_dependency_fit_learns_a_co_occurrence_and_keeps_a_zero_diagonal():
    rng = np.random.default_rng(4)
    n = 2000
    y0 = rng.random(n) < 0.5
    y1 = np.where(y0, rng.random(n) < 0.9, rng.random(n) < 0.1)      # label 1 mostly comes with label 0
    y = np.stack([y0, y1], 1)
    z = np.stack([np.where(y0, 3.0, -3.0), rng.normal(0, 1, n)], 1)  # label 0 seen clearly, label 1 not at all
    dep = LD.fit(z, y)
    assert dep["weight"][0, 0] == dep["weight"][1, 1] == 0.0
    assert dep["weight"][1, 0] > 1.0                                 # label 0's presence raises label 1
    bce = lambda zz: -np.mean(y * np.log(1 / (1 + np.exp(-zz))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-zz))))
    assert bce(LD.apply(dep, z)) < bce(z) - 0.1
    cond = LD.cooccurrence(y)
    assert cond[0, 1] == pytest.approx(y1[y0].mean()) and cond[0, 0] == 1.0


# ------------------------------------------------------------------------------------------ holdout

def test_holdout_is_deterministic_stratified_and_disjoint():
    rng = np.random.default_rng(5)
    t = (rng.random((1000, 4)) < [0.3, 0.3, 0.3, 0.0]).astype(np.uint8)
    t[rng.choice(1000, MIN_TRAIN_POSITIVES, replace=False), 3] = 1     # a rare class: exactly 20 positives
    rows = holdout_rows(t, 0.01, seed=0)
    assert len(rows) >= 10 and t[rows, 3].sum() >= 1
    assert np.array_equal(rows, holdout_rows(t, 0.01, seed=0))
    assert not np.array_equal(rows, holdout_rows(t, 0.01, seed=1))
    assert len(holdout_rows(t, 0.0, seed=0)) == 0


# ------------------------------------------------------------------------------- the contract's thresholds

def test_threshold_outside_0_1_is_refused_naming_the_label():
    for bad in (0.0, 1.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ContractError, match="'car'.*category 3.*in \\(0, 1\\)"):
            ModelContract(TOY, PreprocessSpec(size=32), (0.5, bad, 0.5))
    d = ModelContract(TOY, PreprocessSpec(size=32), (0.5, 0.4, 0.3)).to_dict()
    d["thresholds"][2] = 1.2
    with pytest.raises(ContractError, match="'clock'"):
        ModelContract.from_dict(d)
    with pytest.raises(ContractError, match="2 thresholds for 3 labels"):
        ModelContract(TOY, PreprocessSpec(size=32), (0.5, 0.4))


def test_thresholds_round_trip_through_checkpoint_onnx_metadata_and_sidecar(tmp_path: Path, toy_checkpoint: Path):
    import onnx
    from onnx import TensorProto, helper

    from export.onnx import probres_metadata, set_metadata
    from runtime.onnx_meta import OnnxMetaError, read_onnx_meta
    from runtime.trt_manifest import TrtManifest, read_manifest, write_manifest

    ck = load_checkpoint(toy_checkpoint)
    thr = tuple(np.linspace(0.11, 0.83, ck.contract.labels.num_classes).tolist())
    contract = ck.contract.with_thresholds(thr)
    path = tmp_path / "cal.pt"
    save_checkpoint(path, Checkpoint(ck.arch, ck.state_dict, contract))
    back = load_checkpoint(path).contract
    assert back == contract and back.thresholds == thr

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    set_metadata(m, probres_metadata(load_checkpoint(path), "0" * 64, "dynamo", "fp32"))
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert read_onnx_meta(tmp_path / "m.onnx").contract == contract

    plan = tmp_path / "m.plan"
    write_manifest(plan, TrtManifest(tensorrt_version="10.13.3.9", gpu_name="x", compute_capability="8.7",
                                     precision="fp16", input_name="images", output_name="probs",
                                     min_batch=1, opt_batch=1, max_batch=1, image_size=contract.preprocess.size,
                                     onnx_sha256="a" * 64, plan_sha256="b" * 64, contract=contract))
    assert read_manifest(plan).contract == contract

    # A stored threshold edited out of range is refused on load, naming the label and the file.
    meta = {p.key: p.value for p in m.metadata_props}
    d = json.loads(meta["probres.contract"])
    d["thresholds"][0] = 1.5
    meta["probres.contract"] = json.dumps(d)
    set_metadata(m, meta)
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(OnnxMetaError, match=f"bad.onnx.*{contract.labels.names[0]!r}"):
        read_onnx_meta(tmp_path / "bad.onnx")


# ------------------------------------------------------------------------------------ train.calibrate

def test_calibrate_cli_writes_the_calibrated_checkpoint_and_its_pictures(tmp_path: Path, toy_root: Path,
                                                                         toy_checkpoint: Path, capsys):
    import shutil

    import matplotlib.image

    from runtime.coco import load_coco_split
    from train.calibrate import main
    from train.holdout import split_train, write_holdout

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(toy_checkpoint, run / "best.pt")
    args = ["--checkpoint", str(run / "best.pt"), "--coco-root", str(toy_root)]
    assert main(args) == 2 and "holdout.json: no such file" in capsys.readouterr().err
    _, held = split_train(load_coco_split(toy_root, "train2014"), 0.3, seed=0)
    write_holdout(run, held, 0.3, 0)
    raw_bytes = (run / "best.pt").read_bytes()
    assert main(args) == 0
    # One checkpoint to ship: best.pt is now the calibrated model, best_raw.pt the file it was.
    ck = load_checkpoint(run / "best.pt")
    rec = ck.extra["calibration"]
    assert (run / "best_raw.pt").read_bytes() == raw_bytes and ck.extra["calibrated_from"] == str(run / "best_raw.pt")

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    # Strict JSON (no NaN/Infinity: jq and JavaScript refuse them), with the checkpoint's record.
    saved = json.loads((run / "best.calibration.json").read_text(), parse_constant=refuse)
    assert saved["thresholds"] == rec["thresholds"] and saved["a"] == rec["a"] and saved["val_after"]["mAP"] == rec["val_after"]["mAP"]
    assert json.loads(strict_json({"p": float("nan"), "q": [1.5, float("inf")]}), parse_constant=refuse) == {"p": None, "q": [1.5, None]}
    assert ck.contract.thresholds is not None and list(ck.contract.thresholds) == rec["thresholds"]
    assert rec["fold_max_abs_dprob_heldout"] <= 1e-6 and min(rec["a"]) > 0
    assert abs(rec["val_after"]["mAP"] - rec["val_before"]["mAP"]) <= 1e-4       # a_k > 0: ranking kept
    assert ck.val_metrics["CF1_contract"] == rec["val_after"]["CF1_contract"]
    for name in ("best_reliability.png", "best_thresholds.png", "cooccurrence.png"):
        assert matplotlib.image.imread(str(run / name)).ndim == 3
    cond = np.array(json.loads((run / "cooccurrence.json").read_text())["P_j_given_i"])
    assert cond.shape == (8, 8) and np.allclose(np.diag(cond)[np.diag(cond) > 0], 1.0)
    # Calibrating best.pt again starts from best_raw.pt (the same fit); --out leaves the input alone.
    assert main(args) == 0 and (run / "best_raw.pt").read_bytes() == raw_bytes
    assert load_checkpoint(run / "best.pt").extra["calibration"]["a"] == rec["a"]
    # The layer: its head is in the checkpoint; calibrating a calibrated checkpoint is refused.
    assert main(["--checkpoint", str(run / "best_raw.pt"), "--coco-root", str(toy_root),
                 "--label-dependency", "--out", str(run / "ld.pt")]) == 0
    assert (run / "best_raw.pt").read_bytes() == raw_bytes
    assert LD.has_label_dependency(load_checkpoint(run / "ld.pt").state_dict)
    capsys.readouterr()
    assert main(["--checkpoint", str(run / "ld.pt"), "--coco-root", str(toy_root)]) == 2
    err = capsys.readouterr().err
    assert "already calibrated" in err and len(err.strip().splitlines()) == 1


def test_ece_floor_is_what_perfectly_calibrated_labels_score():
    from runtime.metrics import calibration_error_floor

    p = np.random.default_rng(6).random((400, 5))
    floor = calibration_error_floor(p, draws=50)
    assert 0 < floor < 0.05                      # finite-sample bias only
    assert calibration_error_floor(np.random.default_rng(6).random((20, 5)), draws=50) > floor   # fewer samples, more


def test_the_runtime_pytorch_backend_runs_a_label_dependency_checkpoint(tmp_path: Path, toy_checkpoint: Path):
    """runtime.checkpoint builds the dependency head itself (the runtime never imports train)."""
    from runtime.backends import open_backend

    ck = load_checkpoint(toy_checkpoint)
    c = ck.contract.labels.num_classes
    rng = np.random.default_rng(7)
    dep = {"scale": np.ones(c), "weight": rng.normal(0, 0.5, (c, c)) * (1 - np.eye(c)), "bias": rng.normal(0, 0.3, c)}
    model = fold(ck.build(), np.full(c, 1.3), np.zeros(c), dep)
    save_checkpoint(tmp_path / "ld.pt", Checkpoint(ck.arch, model.state_dict(), ck.contract))
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    b = open_backend(str(tmp_path / "ld.pt"), device="cpu")
    try:
        assert np.abs(b.infer(x) - want).max() <= 1e-6
    finally:
        b.close()


def test_calibrate_refuses_an_unreadable_image_instead_of_scoring_zeros(tmp_path: Path, toy_root: Path,
                                                                        toy_checkpoint: Path, capsys):
    """A val image that does not decode must stop calibration (naming it), not enter the figures as a zero image."""
    import shutil

    from runtime.coco import load_coco_split
    from train.calibrate import main
    from train.holdout import split_train, write_holdout

    root = tmp_path / "coco"
    shutil.copytree(toy_root, root)
    bad = load_coco_split(root, "val2014").image_paths[3]
    Path(bad).write_bytes(b"not an image")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(toy_checkpoint, run / "best.pt")
    _, held = split_train(load_coco_split(root, "train2014"), 0.3, seed=0)
    write_holdout(run, held, 0.3, 0)
    assert main(["--checkpoint", str(run / "best.pt"), "--coco-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert Path(bad).name in err and len(err.strip().splitlines()) == 1
    assert (run / "best.pt").read_bytes() == Path(toy_checkpoint).read_bytes() and not (run / "best_raw.pt").exists()


# ------------------------------------------------------------- a calibration that cannot do harm (issue 23/24)

def _served_ap(z: np.ndarray, y: np.ndarray):
    """val_ap(a, c) as a float32 head computes it: a*z + c and the sigmoid in float32, then sklearn's AP."""
    from sklearn.metrics import average_precision_score

    z32 = np.asarray(z, dtype=np.float32)

    def val_ap(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):          # exp overflow is sigmoid's saturation to 0, as in float32 heads
            p = (1 / (1 + np.exp(-(z32 * np.float32(a) + np.float32(c))))).astype(np.float32)
        return np.array([average_precision_score(y[:, k], p[:, k]) for k in range(y.shape[1])])
    return val_ap


def test_a_fit_without_signal_collapses_to_ties_and_the_guard_refuses_it():
    """Held-out logits that carry no signal drive the tied slope to ~0 (the issue's 2e-8); folded, the
    ranking collapses into float32 ties. The guard refuses it: identity, val mAP exactly unchanged."""
    from train.calibration_guard import MIN_SLOPE, guard

    rng = np.random.default_rng(3)
    zh = rng.normal(0, 2, (12, 4))
    yh = (zh < -1).astype(np.uint8)                 # anti-correlated: the best a > 0 is a -> 0
    platt = fit_platt(zh, yh)
    assert platt["tied"][0] < 1e-3 and not platt["per_class"].any()
    zv = rng.normal(0, 3, (300, 4))
    yv = (zv + rng.normal(0, 2, zv.shape) > 1).astype(np.uint8)
    val_ap = _served_ap(zv, yv)
    before = val_ap(np.ones(4), np.zeros(4)).mean()
    a0, c0 = platt["tied"]
    assert abs(val_ap(np.full(4, a0), np.full(4, c0)).mean() - before) > 1e-3     # unguarded: mAP moves
    g = guard(platt, val_ap)
    assert g["source"] == ["identity"] * 4 and f"< {MIN_SLOPE}" in g["tied_refused"]
    assert np.array_equal(g["a"], np.ones(4)) and np.array_equal(g["c"], np.zeros(4))
    assert abs(val_ap(g["a"], g["c"]).mean() - before) <= 1e-4


def test_a_fit_that_moves_a_class_ranking_falls_back_to_tied_then_identity():
    """Class 0: a degenerate own fit -> tied. Class 1: an own fit that saturates float32 probabilities
    moves its AP -> tied, which moves it too -> identity. Class 2: a sound own fit is kept."""
    from train.calibration_guard import MAX_AP_CHANGE, guard

    rng = np.random.default_rng(4)
    zv = rng.normal(0, 1, (400, 3)) * np.array([1.0, 12.0, 1.0])    # class 1's logits reach float32 saturation
    yv = (zv / np.array([1.0, 12.0, 1.0]) + rng.normal(0, 1, zv.shape) > 0.5).astype(np.uint8)
    platt = {"a": np.array([1e-9, 6.0, 0.8]), "c": np.array([0.0, 0.0, -0.2]), "per_class": np.array([True] * 3),
             "tied": (3.0, 0.0), "temperature": 1 / 3.0}
    val_ap = _served_ap(zv, yv)
    g = guard(platt, val_ap)
    assert g["source"] == ["tied", "identity", "own"]
    assert "own fit: slope" in g["refused"][0] and g["refused"][1].count("moves val AP") == 2 and 2 not in g["refused"]
    change = np.abs(val_ap(g["a"], g["c"]) - val_ap(np.ones(3), np.zeros(3)))
    assert change.max() <= MAX_AP_CHANGE and g["a"][2] == 0.8


def _run_with_holdout(tmp_path: Path, toy_root: Path, toy_checkpoint: Path, n_held: int) -> Path:
    import shutil

    from runtime.coco import load_coco_split
    from train.holdout import subset, write_holdout

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(toy_checkpoint, run / "best.pt")
    train = load_coco_split(toy_root, "train2014")
    write_holdout(run, subset(train, np.arange(n_held), "held"), n_held / len(train), 0)
    return run


def test_a_near_zero_slope_on_a_few_held_out_images_leaves_val_map_unchanged(tmp_path: Path, toy_root: Path,
                                                                            toy_checkpoint: Path, monkeypatch, capsys):
    """calibrate() end to end with a tied slope of 1e-9 (what 9 held-out images gave after one epoch): refused,
    best.pt's head is the raw head, val mAP unchanged; the same fit folded unguarded would have moved it."""
    import train.calibrate as C

    run = _run_with_holdout(tmp_path, toy_root, toy_checkpoint, 10)
    real_fit = C.fit_platt

    def degenerate(z, y):
        f = real_fit(z, y)
        return f | {"tied": (1e-9, f["tied"][1]), "a": np.full_like(f["a"], 1e-9)}
    monkeypatch.setattr(C, "fit_platt", degenerate)
    assert C.main(["--checkpoint", str(run / "best.pt"), "--coco-root", str(toy_root)]) == 0
    log = capsys.readouterr().out
    rec = json.loads((run / "best.calibration.json").read_text())
    assert rec["method"] == "identity" and set(rec["fit_source"]) == {"identity"} and "slope" in rec["tied_refused"]
    assert "WARNING: tied fit refused" in log and "held-out positives: tied fit" in log
    assert rec["heldout_images"] == 10 and rec["heldout_positives_tied"] == sum(rec["heldout_positives"]) >= 10
    assert abs(rec["val_after"]["mAP"] - rec["val_before"]["mAP"]) <= 1e-4
    cal, raw = load_checkpoint(run / "best.pt"), load_checkpoint(run / "best_raw.pt")
    assert all(torch.equal(cal.state_dict[k], raw.state_dict[k]) for k in ("fc.weight", "fc.bias"))
    assert cal.contract.thresholds is None               # nothing calibrated: F*/2 would not apply; 0.5
    # Control: the refused fit, folded into the head, does move val mAP (so this test can fail).
    from runtime.coco import load_coco_split
    val = load_coco_split(toy_root, "val2014", labels=raw.contract.labels)
    model = fold(raw.build(), np.full(8, 1e-9), np.full(8, degenerate(np.zeros((2, 8)), np.eye(2, 8))["tied"][1]), None)
    z, _ = C.logits(model, val, raw.contract.preprocess, torch.device("cpu"), 32)
    assert abs(multilabel_metrics(1 / (1 + np.exp(-z)), val.targets)["mAP"] - rec["val_before"]["mAP"]) > 1e-3


def test_two_held_out_images_give_the_identity_and_a_warning(tmp_path: Path, toy_root: Path, toy_checkpoint: Path,
                                                             capsys):
    """Issue 24 row 7: 2 held-out images once gave a = 9.4e-10 and 0.666666 for every label. Now: identity."""
    from train.calibrate import main

    run = _run_with_holdout(tmp_path, toy_root, toy_checkpoint, 2)
    assert main(["--checkpoint", str(run / "best.pt"), "--coco-root", str(toy_root)]) == 0
    log = capsys.readouterr().out
    assert "WARNING: the held-out set is too small to fit on (2 images" in log
    rec = load_checkpoint(run / "best.pt").extra["calibration"]
    assert rec["method"] == "identity" and rec["a"] == [1.0] * 8 and rec["c"] == [0.0] * 8
    assert rec["val_after"]["mAP"] == rec["val_before"]["mAP"] and rec["thresholds"] is None
    assert load_checkpoint(run / "best.pt").contract.thresholds is None
