"""probres-eval: exported ONNX (FP32, FP16) against the PyTorch checkpoint on the toy val set.

    .venv/bin/python -m pytest -q tests/test_eval.py

An untrained network scores about chance, where a damaged copy can score higher by luck. So
the checkpoint here gets a real signal first: the untrained resnet18 @64's pooled features
are fitted to the toy val labels by ridge regression into its fc layer (a parity test
needs a model whose mAP means something, not one that generalizes). Its PyTorch val metrics
are stored in the checkpoint, so export.onnx copies them into the ONNX metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.eval import compare, main
from runtime.metrics import multilabel_metrics

RIDGE = 3000.0


def torch_val_probs(model, paths, spec) -> np.ndarray:
    import torch

    from runtime.preprocess import preprocess
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(preprocess([str(p) for p in paths], spec=spec)))).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory, toy_root, toy_checkpoint):
    """{"ckpt", "fp32", "fp16", "damaged", "dir"}: a fitted checkpoint and its exports."""
    import onnx
    import torch

    from export.onnx import main as export_main
    from runtime.coco import load_coco_split
    from runtime.preprocess import preprocess
    from train.checkpoint import load_checkpoint, save_checkpoint

    d = tmp_path_factory.mktemp("eval")
    ckpt = load_checkpoint(toy_checkpoint)
    model = ckpt.build()
    spec = ckpt.contract.preprocess
    val = load_coco_split(toy_root, "val2014", labels=ckpt.contract.labels)
    x = torch.from_numpy(preprocess([str(p) for p in val.image_paths], spec=spec))
    with torch.no_grad():
        fc = model.fc
        model.fc = torch.nn.Identity()
        feats = model(x).double().numpy()                    # (N, 512) pooled features
        model.fc = fc
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    a = np.hstack([(feats - mu) / sd, np.ones((len(feats), 1))])
    w = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ (6.0 * (val.targets - 0.5)))   # (513, C)
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy((w[:-1] / sd[:, None]).T))
        model.fc.bias.copy_(torch.from_numpy(w[-1] - (mu / sd) @ w[:-1]))
    ckpt.state_dict = model.state_dict()
    probs = torch_val_probs(model, val.image_paths, spec)
    ckpt.val_metrics = {k: v for k, v in multilabel_metrics(probs, val.targets).items()}
    assert 0.9 < ckpt.val_metrics["mAP"] < 1.0                # a real, not saturated, signal
    save_checkpoint(d / "best.pt", ckpt)
    assert export_main(["--checkpoint", str(d / "best.pt"), "--output", str(d / "model.onnx"), "--fp16",
                        "--verify-images", str(toy_root / "val2014")]) == 0
    # Damaged: every conv/fc weight of the FP32 graph perturbed by 30% Gaussian noise.
    m = onnx.load(str(d / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.ndim >= 2 and arr.dtype == np.float32:
            noisy = arr + rng.normal(scale=0.3 * (arr.std() + 1e-8), size=arr.shape).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
    onnx.save(m, str(d / "damaged.onnx"))
    return {"ckpt": d / "best.pt", "fp32": d / "model.onnx", "fp16": d / "model_fp16.onnx",
            "damaged": d / "damaged.onnx", "dir": d, "probs": probs, "targets": val.targets, "split": val}


def run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fp32_onnx_matches_checkpoint(models, toy_root, capsys):
    from sklearn.metrics import average_precision_score

    rep_path = models["dir"] / "fp32.json"
    rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root, "--reference", models["ckpt"],
                        "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    print(out)
    assert rc == 0 and rep["passed"] and "PASSED" in out
    assert abs(rep["map_drop"]) <= 0.0005 and rep["max_abs_prob_diff"] < 1e-4
    assert rep["num_images"] == len(models["targets"]) == models["split"].num_with_objects
    assert f"{models['split'].num_empty} without (dropped)" in rep["image_set"] and "dropped" in err
    assert models["split"].num_empty > 0                    # so dropping them is actually exercised
    # The reference column is PyTorch's own mAP, as sklearn computes it from PyTorch run directly.
    t, p = models["targets"], models["probs"]
    sk = np.mean([average_precision_score(t[:, k], p[:, k]) for k in range(t.shape[1]) if t[:, k].any()])
    assert rep["reference"]["mAP"] == pytest.approx(sk, abs=1e-9)
    first_words = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert first_words[1:8] == ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]


def test_fp16_onnx_within_tolerance(models, toy_root, capsys):
    rep_path = models["dir"] / "fp16.json"
    rc, out, _ = run(["--engine", models["fp16"], "--coco-root", toy_root, "--reference", models["ckpt"],
                      "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    print(out)
    assert rc == 0 and rep["passed"] and abs(rep["map_drop"]) <= 0.002
    assert rep["engine_model"]["precision"] == "fp16" and 0 < rep["max_abs_prob_diff"] < 5e-3


def test_damaged_model_fails(models, toy_root, capsys):
    rep_path = models["dir"] / "damaged.json"
    rc, out, _ = run(["--engine", models["damaged"], "--coco-root", toy_root, "--reference", models["ckpt"],
                      "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    print(out)
    assert rc == 1 and not rep["passed"] and "FAILED" in out
    assert rep["map_drop"] > 0.002 and rep["label_set_diffs"] > 0


def test_reference_engine_limit_and_keep_empty(models, toy_root, capsys):
    rep_path = models["dir"] / "pair.json"
    rc, _, _ = run(["--engine", models["fp16"], "--coco-root", toy_root, "--reference-engine", models["fp32"],
                    "--limit", 5, "--keep-empty", "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    assert rc == 0 and rep["num_images"] == 5 and rep["reference_model"]["kind"] == "engine"
    assert "kept as all-negative" in rep["image_set"] and "first 5" in rep["image_set"]


def test_without_reference_uses_metadata_metrics(models, toy_root, tmp_path, capsys):
    import onnx

    rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root], capsys)
    assert rc == 0 and "no reference given" in err and "stored" in out
    m = onnx.load(str(models["fp32"]))                 # claim PyTorch scored 5 points more than it did
    for p in m.metadata_props:
        if p.key == "probres.val_metrics":
            metrics = json.loads(p.value)
            metrics["mAP"] += 0.05
            p.value = json.dumps(metrics)
    onnx.save(m, str(tmp_path / "claims.onnx"))
    rc, out, _ = run(["--engine", tmp_path / "claims.onnx", "--coco-root", toy_root], capsys)
    assert rc == 1 and "FAILED" in out


def test_errors_exit_2(models, toy_root, tmp_path, capsys):
    import onnx
    m = onnx.load(str(models["fp32"]))
    del m.metadata_props[:]
    m.metadata_props.add(key="probres.contract", value=[p.value for p in onnx.load(
        str(models["fp32"])).metadata_props if p.key == "probres.contract"][0])
    onnx.save(m, str(tmp_path / "nometrics.onnx"))
    cases = [(["--engine", models["fp32"], "--coco-root", tmp_path / "nowhere"], "image directory not found"),
             (["--engine", tmp_path / "nometrics.onnx", "--coco-root", toy_root], "no PyTorch val metrics"),
             (["--engine", tmp_path / "x.onnx", "--coco-root", toy_root], "no such model file"),
             (["--engine", models["fp32"], "--coco-root", toy_root, "--max-map-drop", "2"], "fraction")]
    for args, msg in cases:
        rc, out, err = run(args, capsys)
        assert rc == 2 and msg in err and "Traceback" not in err, err


def test_compare_counts_by_hand():
    pe = np.array([[0.9, 0.2], [0.6, 0.49], [0.1, 0.8]], dtype=np.float32)
    pr = np.array([[0.9, 0.2], [0.4, 0.51], [0.1, 0.8]], dtype=np.float32)
    t = np.array([[1, 0], [1, 1], [0, 1]])
    half = np.full(2, 0.5)
    rep = compare(pe, pr, t, half, half)
    assert rep["label_set_diffs"] == 1                       # only image 1 flips (both labels)
    assert rep["max_abs_prob_diff"] == pytest.approx(0.2, abs=1e-6)
    # each model decides with its own thresholds: label 1 at 0.45 makes the engine's image 1 whole again
    rep = compare(pe, pr, t, np.array([0.5, 0.45]), half)
    assert rep["engine"]["CR_contract"] == 1.0 and rep["engine"]["CR"] == 0.75


def _with_thresholds(src: Path, dst: Path, thresholds: list[float], exporter: str | None = None) -> Path:
    """A copy of the ONNX file whose stored contract carries `thresholds` (as an edit of the file would);
    `exporter` rewrites probres.exporter too (another file of the same model, another sha256)."""
    import onnx

    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key == "probres.contract":
            d = json.loads(p.value)
            d["thresholds"] = thresholds
            p.value = json.dumps(d)
        if p.key == "probres.exporter" and exporter:
            p.value = exporter
    onnx.save(m, str(dst))
    return dst


def test_gate_uses_the_contract_thresholds_and_fails_when_they_are_edited(models, toy_root, tmp_path, capsys):
    c = len(models["targets"][0])
    good = _with_thresholds(models["fp32"], tmp_path / "good.onnx", [0.4] * c)
    twin = _with_thresholds(models["fp32"], tmp_path / "twin.onnx", [0.4] * c, exporter="twin")   # same checkpoint
    edited = _with_thresholds(models["fp32"], tmp_path / "edited.onnx", [0.99] * c)
    rc, out, _ = run(["--engine", twin, "--coco-root", toy_root, "--reference-engine", good,
                      "--json", tmp_path / "good.json", "--plot", tmp_path / "plots"], capsys)
    rep = json.loads((tmp_path / "good.json").read_text())
    assert rc == 0 and rep["passed"] and rep["threshold"] == "contract"
    want = multilabel_metrics(models["probs"], models["targets"], contract_thresholds=np.full(c, 0.4))
    assert rep["engine"]["CF1_contract"] == pytest.approx(want["CF1_contract"], abs=1e-3)
    assert rep["engine"]["ECE"] == pytest.approx(want["ECE"], abs=1e-3)
    assert "CF1@thr" in out and "ECE" in out
    png = tmp_path / "plots" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(str(png)).ndim == 3           # a real, decodable image

    rc, out, _ = run(["--engine", edited, "--coco-root", toy_root, "--reference-engine", good,
                      "--json", tmp_path / "edited.json"], capsys)
    rep = json.loads((tmp_path / "edited.json").read_text())
    assert rc == 1 and not rep["passed"] and "FAILED" in out
    assert rep["gates"]["map_drop"]["passed"] and rep["gates"]["ece_rise"]["passed"]   # same probabilities
    assert rep["gates"]["cf1_drop"]["value"] > 0.005 and not rep["gates"]["cf1_drop"]["passed"]
    # --threshold 0.5 overrides every stored threshold: then both decide alike and it passes.
    rc, _, _ = run(["--engine", edited, "--coco-root", toy_root, "--reference-engine", good, "--threshold", "0.5"],
                   capsys)
    assert rc == 0


def test_unwritable_plot_dir_is_refused_before_any_work(tmp_path, capsys):
    """--plot under a regular file: one line and exit 2 before the model loads (was a NotADirectoryError traceback)."""
    (tmp_path / "afile").write_text("x")
    rc, out, err = run(["--engine", tmp_path / "m.onnx", "--coco-root", tmp_path,
                        "--plot", tmp_path / "afile" / "plots"], capsys)
    assert rc == 2 and "not a directory" in err and "Traceback" not in err, err
    rc, out, err = run(["--engine", tmp_path / "m.onnx", "--coco-root", tmp_path,
                        "--plot", tmp_path / "afile"], capsys)
    assert rc == 2 and "exists and is not a directory" in err, err


# ---------------------------------------------------------------- the reference must be the model's source (issue 24)

def test_a_reference_that_is_not_the_source_checkpoint_is_refused(models, toy_root, toy_checkpoint, tmp_path, capsys):
    """Row 3: the engine exported from the fitted best.pt, checked against another checkpoint
    (toy_checkpoint: the same arch and labels, other weights) used to pass; now exit 2, or with
    --allow-different-model a comparison reported as a different model, never PASSED."""
    rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root, "--reference", toy_checkpoint], capsys)
    assert rc == 2 and "not the model" in err and "--allow-different-model" in err, err
    assert len(err.strip().splitlines()) == 1 and out == ""
    rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root, "--reference", toy_checkpoint,
                        "--allow-different-model", "--json", tmp_path / "diff.json"], capsys)
    rep = json.loads((tmp_path / "diff.json").read_text())
    assert rc == 1 and not rep["passed"] and "DIFFERENT MODEL" in out and "PASSED" not in out
    assert rep["reference_model"]["relation"] == "different model"


def test_a_model_compared_with_itself_is_refused(models, toy_root, tmp_path, capsys):
    """Row 4: model.onnx as its own reference (as --reference, as --reference-engine, as a copy)."""
    import shutil

    shutil.copyfile(models["fp32"], tmp_path / "copy.onnx")
    cases = [(["--reference", models["fp32"]], "takes the PyTorch checkpoint"),
             (["--reference-engine", models["fp32"]], "is the model under test itself"),
             (["--reference-engine", tmp_path / "copy.onnx"], "is the model under test itself"),
             (["--reference", models["dir"] / "missing.pt"], "no such model file")]
    for extra, msg in cases:
        rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root, *extra], capsys)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_another_export_of_the_same_checkpoint_is_a_valid_reference(models, toy_root, capsys):
    """FP16 against the FP32 file of the same checkpoint: accepted, relation "source"."""
    rep_path = models["dir"] / "sibling.json"
    rc, _, _ = run(["--engine", models["fp16"], "--coco-root", toy_root, "--reference-engine", models["fp32"],
                    "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    assert rc == 0 and rep["reference_model"]["relation"] == "source"


def test_an_export_without_a_recorded_source_is_refused(models, toy_root, tmp_path, capsys):
    import onnx

    m = onnx.load(str(models["fp32"]))
    keep = [(p.key, p.value) for p in m.metadata_props if p.key != "probres.checkpoint_sha256"]
    del m.metadata_props[:]
    for k, v in keep:
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(tmp_path / "old.onnx"))
    rc, _, err = run(["--engine", tmp_path / "old.onnx", "--coco-root", toy_root, "--reference", models["ckpt"]],
                     capsys)
    assert rc == 2 and "records no source checkpoint" in err, err


def test_per_image_divergence_fails_the_gate_when_the_metrics_pass(models, toy_root, capsys):
    """The FP16 file held to FP32's per-image tolerance (max |dprob| 1e-4): mAP, CF1 and ECE pass,
    the per-image gate fails it; and the share of differing label sets is a gate of its own."""
    rep_path = models["dir"] / "strict.json"
    rc, out, _ = run(["--engine", models["fp16"], "--coco-root", toy_root, "--reference", models["ckpt"],
                      "--max-dprob", "1e-4", "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    g = rep["gates"]
    assert g["map_drop"]["passed"] and g["cf1_drop"]["passed"] and g["ece_rise"]["passed"]
    assert not g["max_dprob"]["passed"] and rc == 1 and "FAILED" in out
    assert g["max_dprob"]["value"] == pytest.approx(rep["max_abs_prob_diff"])
    assert g["max_dprob"]["tolerance"] == 1e-4
    # the default tolerances by precision
    rc, _, _ = run(["--engine", models["fp16"], "--coco-root", toy_root, "--reference", models["ckpt"],
                    "--json", rep_path], capsys)
    rep = json.loads(rep_path.read_text())
    assert rc == 0 and rep["gates"]["max_dprob"]["tolerance"] == 5e-3
    assert rep["gates"]["label_diff_share"]["tolerance"] == 0.02


def test_per_image_gates_by_hand():
    from runtime.eval import per_image_gates

    rep = {"max_abs_prob_diff": 0.2, "label_set_diffs": 3}
    g = per_image_gates(rep, 20, max_dprob=0.25, max_share=0.1)
    assert g["label_diff_share"]["value"] == pytest.approx(0.15) and not g["label_diff_share"]["passed"]
    assert g["max_dprob"]["passed"]
    assert per_image_gates(rep, 30, 0.1, 0.1)["label_diff_share"]["passed"]          # 3/30 = 0.1: on the edge
    assert not per_image_gates(rep, 30, 0.1, 0.1)["max_dprob"]["passed"]


def test_without_reference_on_a_subset_is_indicative_not_failed(models, toy_root, capsys):
    """Row 18: the stored metrics cover the whole split, --limit 3 does not: exit 0, said so."""
    rc, out, err = run(["--engine", models["fp32"], "--coco-root", toy_root, "--limit", "3"], capsys)
    assert rc == 0 and "INDICATIVE" in out and "FAILED" not in out and "not gated" in err, (out, err)
