"""Calibration and thresholds on the held-out split, folded into the checkpoint and its contract.

    python -m train.calibrate --checkpoint runs/toy/best.pt --coco-root data/toy_coco [--out runs/toy/best_calibrated.pt]
        [--label-dependency] [--holdout runs/toy/holdout.json]

(probres-train runs this at the end unless --no-calibrate.) On the logits z of the held-out
train2014 images (RUN_DIR/holdout.json, never trained on; val2014 is only reported):
  1. optionally the label-dependency layer z' = z + W sigmoid(z) + b (train/label_dependency.py);
  2. per-class Platt scaling p = sigmoid(a_k z'_k + c_k), a_k > 0 (a_k = exp(.)), minimising
     NLL with a prior toward the tied case (one (a, c) fitted on all labels pooled); a class
     with fewer than MIN_POSITIVES held-out positives takes the tied case itself. a_k > 0
     keeps every class's ranking, so mAP does not move (up to float32 ties);
  3. thresholds on the calibrated held-out probabilities: each class's F1-optimal one, or, with
     fewer than MIN_POSITIVES positives, the one global threshold that maximises OF1; estimated
     as F*/2 (half the best F1, optimal for calibrated probabilities) unless --threshold-rule argmax;
  4. the fold: fc.weight[k] *= a_k, fc.bias[k] = a_k * bias[k] + c_k (or the layer's scale,
     W rows and b), so ONNX and TensorRT compute calibrated probabilities with no extra op.
Writes OUT (the contract gains the thresholds; "calibration" holds the parameters and the
before/after figures; val_metrics are the calibrated model's), OUT_STEM.calibration.json,
OUT_STEM_reliability.png, OUT_STEM_thresholds.png, cooccurrence.json and cooccurrence.png
into OUT's directory. Exit 2 on a usage or data error (one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from runtime.coco import CocoDataError, CocoSplit, load_coco_split
from runtime.fileio import atomic_write_text, strict_json
from runtime.preprocess import ImageDecodeError
from runtime.metrics import (calibration_error, calibration_error_floor, f1_optimal_thresholds, multilabel_metrics,
                             of1_optimal_threshold)
from train import label_dependency as LD
from train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from train.coco import CocoDataset
from train.holdout import HOLDOUT_FILE, HoldoutError, read_holdout, select_ids

MIN_POSITIVES = 20          # held-out positives a class needs for its own Platt fit and threshold
PRIOR_WEIGHT = 10.0         # per-class Platt: strength of the prior toward the tied fit, in held-out images
THRESHOLD_RANGE = (1e-4, 1 - 1e-4)   # contract thresholds must lie in (0, 1)
THRESHOLD_RULES = ("half-f1", "argmax")   # choose_thresholds: F*/2 (default) or the held-out argmax cut
FIGURES = ("mAP", "CF1", "OF1", "CF1_contract", "OF1_contract", "ECE", "Brier")


class CalibrationError(ValueError):
    """Bad input to calibration (already calibrated, no held-out split...); one line, exit 2."""


@torch.no_grad()
def logits(model: nn.Module, split: CocoSplit, spec: Any, device: torch.device, batch_size: int) -> np.ndarray:
    """(N, C) float64 logits of `split` under the runtime's preprocessing (train/coco.py eval mode)."""
    ds = CocoDataset(split, spec, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval().to(device)
    out = []
    for x, _, index in loader:
        bad = index < 0                   # an image that did not decode comes back as zeros: refuse it
        if bool(bad.any()):
            raise CalibrationError(ds.bad_image_message(int(-1 - index[bad][0])))
        out.append(model(x.to(device).contiguous(memory_format=torch.channels_last)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.fc.out_features))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def fit_platt(z: np.ndarray, y: np.ndarray, min_positives: int = MIN_POSITIVES,
              prior: float = PRIOR_WEIGHT) -> dict[str, Any]:
    """Per-class (a_k > 0, c_k) for sigmoid(a_k z_k + c_k), shrunk toward one tied fit shared by all classes.

    z, y: (N, C) logits and 0/1 targets. The tied fit (a0, c0) minimises the mean NLL of all
    labels pooled. Each class with >= min_positives positives then minimises its summed NLL plus
    prior/2 * ((log a_k - log a0)^2 + (c_k - c0)^2): a Gaussian prior centred on the tied fit,
    worth about `prior` images, so a class with little data stays near the pooled answer and a
    class with plenty gets its own (prior=0: the unpenalised ML fit, as sklearn's). Classes with
    fewer positives take (a0, c0). Returns {"a": (C,), "c": (C,), "per_class": (C,) bool,
    "tied": (a0, c0), "temperature": 1/a0}.
    """
    zt = torch.as_tensor(z, dtype=torch.float64)
    yt = torch.as_tensor(y > 0, dtype=torch.float64)
    c = zt.shape[1]
    bce = nn.functional.binary_cross_entropy_with_logits

    def minimise(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> None:
        opt = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        opt.step(closure)

    # Tied: one (a0, c0) for every label. Not a temperature alone (c0 = 0): a ResNet trained by
    # README's CPU recipe is over-confident below p ~ 0.3 and under-confident above it, a shift
    # plus a sharpening. Fitted on 450 toy val images and scored on 456 others (a design check,
    # RESULTS.md), a temperature left 0.82x the ECE, (a0, c0) 0.53x.
    log_a0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    c0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    minimise([log_a0, c0], lambda: bce(zt * log_a0.exp() + c0, yt))
    la0, cc0 = log_a0.detach(), c0.detach()
    log_a = la0.repeat(c).clone().requires_grad_(True)
    bias = cc0.repeat(c).clone().requires_grad_(True)
    # The classes' problems are independent: the sum over classes has each class's optimum as its optimum.
    minimise([log_a, bias], lambda: bce(zt * log_a.exp() + bias, yt, reduction="sum")
             + prior / 2 * (((log_a - la0) ** 2).sum() + ((bias - cc0) ** 2).sum()))
    per_class = (np.asarray(y) > 0).sum(0) >= min_positives
    a0, b0 = float(la0.exp()), float(cc0)
    a = np.where(per_class, log_a.detach().exp().numpy(), a0)
    cc = np.where(per_class, bias.detach().numpy(), b0)
    return {"a": a, "c": cc, "per_class": per_class, "tied": (a0, b0), "temperature": 1 / a0}


def choose_thresholds(p: np.ndarray, y: np.ndarray, min_positives: int = MIN_POSITIVES,
                      rule: str = "half-f1") -> dict[str, Any]:
    """Contract thresholds from calibrated held-out probabilities p and targets y, both (N, C).

    Each class with >= min_positives positives gets its own F1-maximising threshold, the others
    the one global threshold that maximises OF1. rule "argmax": the cut that maximises F1 on the
    held-out set itself. rule "half-f1" (default): F*/2, F* being that maximal F1; for calibrated
    probabilities the F1-optimal threshold is half the optimal F1 (Lipton, Elkan & Narayanaswamy,
    "Optimal thresholding of classifiers to maximize F1", ECML 2014). F* is a maximum over a flat
    curve and moves little between samples, the argmax cut moves a lot: on README's toy recipe
    (18 held-out images) the argmax cut lost 0.031 val CF1 against 0.5 and F*/2 lost 0.0005.
    """
    if rule not in THRESHOLD_RULES:
        raise CalibrationError(f"threshold rule {rule!r}: expected one of {', '.join(THRESHOLD_RULES)}")
    per, f_per = f1_optimal_thresholds(p, y)
    glob, f_glob = of1_optimal_threshold(p, y)
    if rule == "half-f1":
        per, glob = f_per / 2, f_glob / 2
    own = ((np.asarray(y) > 0).sum(0) >= min_positives) & ~np.isnan(per)
    thr = np.clip(np.where(own, per, glob), *THRESHOLD_RANGE)
    return {"thresholds": thr, "per_class": own, "global": float(np.clip(glob, *THRESHOLD_RANGE)), "rule": rule}


def fold(model: nn.Module, a: np.ndarray, c: np.ndarray, dep: dict[str, np.ndarray] | None) -> nn.Module:
    """Put a * z' + c into the head's parameters (in place): fc's weight/bias, or the dependency layer's."""
    fc = model.fc
    at = torch.as_tensor(a, dtype=torch.float64, device=fc.weight.device)
    ct = torch.as_tensor(c, dtype=torch.float64, device=fc.weight.device)
    with torch.no_grad():
        if dep is None:
            if isinstance(fc, LD.DependentLinear):
                raise CalibrationError("the checkpoint already has a label-dependency head; calibrate the uncalibrated one")
            fc.weight.copy_((fc.weight.double() * at[:, None]).to(fc.weight.dtype))
            fc.bias.copy_((fc.bias.double() * at + ct).to(fc.bias.dtype))
        else:
            LD.attach(model)
            fc = model.fc
            d = {k: torch.as_tensor(v, dtype=torch.float64, device=at.device) for k, v in dep.items()}
            fc.dep_scale.copy_(d["scale"] * at)
            fc.dep_weight.copy_(d["weight"] * at[:, None])
            fc.dep_bias.copy_(d["bias"] * at + ct)
    return model


def _figures(m: dict[str, Any]) -> dict[str, float]:
    return {k: m[k] for k in FIGURES if k in m}


def calibrate(checkpoint: str | Path, coco_root: str | Path, out: str | Path | None = None,
              holdout: str | Path | None = None, label_dependency: bool = False, device: Any = "cpu",
              batch_size: int = 32, log: Callable[[str], None] = print,
              threshold_rule: str = "half-f1") -> dict[str, Any]:
    """Calibrate `checkpoint` on its held-out split; write OUT and the pictures. Returns the calibration record."""
    from runtime import plots

    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_name(checkpoint.stem + "_calibrated.pt")
    if out.resolve() == checkpoint.resolve():
        raise CalibrationError(f"--out {out}: would overwrite the input checkpoint; choose another file")
    ckpt = load_checkpoint(checkpoint)
    if "calibration" in ckpt.extra:
        raise CalibrationError(f"{checkpoint}: already calibrated; calibrate the uncalibrated checkpoint (best.pt)")
    holdout = Path(holdout) if holdout else checkpoint.parent / HOLDOUT_FILE
    ids = read_holdout(holdout)
    keep_empty = bool(ckpt.config.get("keep_empty", False))
    labels, spec = ckpt.contract.labels, ckpt.contract.preprocess
    train = load_coco_split(coco_root, "train2014", keep_empty=keep_empty, labels=labels)
    held = select_ids(train, ids, "train2014 held-out")
    val = load_coco_split(coco_root, "val2014", keep_empty=keep_empty, labels=labels)
    if len(held) == 0:
        raise CalibrationError("the held-out split is empty; train with --holdout-frac > 0")
    device = torch.device(device)
    yh, yv = held.targets, val.targets
    model = ckpt.build()
    if LD.has_label_dependency(ckpt.state_dict):
        raise CalibrationError(f"{checkpoint}: already has a label-dependency head; calibrate the uncalibrated one")
    log(f"calibrate: {len(held)} held-out images ({holdout}), reporting on {len(val)} val images")
    zh, zv = logits(model, held, spec, device, batch_size), logits(model, val, spec, device, batch_size)

    dep = LD.fit(zh, yh) if label_dependency else None
    zh2, zv2 = LD.apply(dep, zh), LD.apply(dep, zv)
    platt = fit_platt(zh2, yh)
    ph = _sigmoid(platt["a"] * zh2 + platt["c"])
    thr = choose_thresholds(ph, yh, rule=threshold_rule)
    t = thr["thresholds"]

    fold(model, platt["a"], platt["c"], dep)
    pv_after = _sigmoid(logits(model, val, spec, device, batch_size))              # as served: the folded head
    fold_err = float(np.abs(_sigmoid(logits(model, held, spec, device, batch_size)) - ph).max())
    pv_before, ph_before = _sigmoid(zv), _sigmoid(zh)
    before = multilabel_metrics(pv_before, yv, contract_thresholds=np.full(len(t), 0.5))
    after = multilabel_metrics(pv_after, yv, contract_thresholds=t)
    train_part = train.targets[~np.isin(train.image_ids, held.image_ids)]      # the images trained on
    cond = LD.cooccurrence(train_part)
    partner_before, n_partner = LD.absent_partner_probability(pv_before, yv, cond)
    partner_after, _ = LD.absent_partner_probability(pv_after, yv, cond)
    record = {
        "method": "platt" + (" + label-dependency" if dep is not None else ""),
        "heldout_images": len(held), "min_positives": MIN_POSITIVES,
        "a": platt["a"].tolist(), "c": platt["c"].tolist(), "per_class_platt": platt["per_class"].tolist(),
        "tied_temperature": platt["temperature"], "tied_a_c": list(platt["tied"]), "prior_weight": PRIOR_WEIGHT,
        "thresholds": t.tolist(), "per_class_threshold": thr["per_class"].tolist(), "global_threshold": thr["global"],
        "threshold_rule": thr["rule"],
        "label_dependency": None if dep is None else {k: v.tolist() for k, v in dep.items()} | {"l2": LD.L2},
        "fold_max_abs_dprob_heldout": fold_err,
        "heldout": {"ECE_before": calibration_error(ph_before, yh)[0], "ECE_after": calibration_error(ph, yh)[0]},
        "val_before": _figures(before) | {"absent_partner_prob": partner_before,
                                          "ECE_floor": calibration_error_floor(pv_before)},
        "val_after": _figures(after) | {"absent_partner_prob": partner_after, "absent_partner_cases": n_partner,
                                        "ECE_floor": calibration_error_floor(pv_after)},
        "val_note": "val2014 is only reported here: nothing is fitted on it",
    }
    contract = ckpt.contract.with_thresholds(t.tolist())
    save_checkpoint(out, Checkpoint(ckpt.arch, model.state_dict(), contract, ckpt.config, ckpt.epoch,
                                    {k: v for k, v in after.items() if k not in ("AP", "ECE_per_class")},
                                    ckpt.weights, {"calibration": record, "calibrated_from": str(checkpoint)}))
    stem = out.with_suffix("")
    atomic_write_text(f"{stem}.calibration.json", strict_json(record, indent=1) + "\n")   # no case: null
    atomic_write_text(out.parent / "cooccurrence.json", json.dumps(
        {"labels": list(labels.names), "P_j_given_i": cond.tolist(), "images": int(len(train_part))}) + "\n")
    plots.reliability_diagram(f"{stem}_reliability.png", [("held-out, before", ph_before, yh),
                              ("held-out, after", ph, yh), ("val, before", pv_before, yv), ("val, after", pv_after, yv)])
    plots.thresholds_bar(f"{stem}_thresholds.png", labels.names, t, thr["per_class"], thr["global"])
    plots.cooccurrence_heatmap(out.parent / "cooccurrence.png", labels.names, cond)
    b, a = record["val_before"], record["val_after"]
    log(f"calibrate: {record['method']}; {int(platt['per_class'].sum())}/{len(t)} classes with their own Platt fit, "
        f"tied a {platt['tied'][0]:.3f} c {platt['tied'][1]:+.3f}; {int(thr['per_class'].sum())} own thresholds "
        f"({thr['rule']}), global {thr['global']:.3f}; fold max |dp| {fold_err:.1e}")
    log(f"calibrate: val mAP {b['mAP']:.4f} -> {a['mAP']:.4f}, ECE {b['ECE']:.4f} -> {a['ECE']:.4f}, "
        f"(a perfectly calibrated model: {a['ECE_floor']:.4f} on this many images), "
        f"Brier {b['Brier']:.4f} -> {a['Brier']:.4f}; CF1/OF1 at 0.5 {b['CF1']:.4f}/{b['OF1']:.4f} uncalibrated, "
        f"{a['CF1']:.4f}/{a['OF1']:.4f} calibrated, "
        f"at the contract's thresholds {a['CF1_contract']:.4f}/{a['OF1_contract']:.4f} -> {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt (uncalibrated)")
    ap.add_argument("--coco-root", required=True, help="the COCO root the run trained on")
    ap.add_argument("--out", default=None, help="calibrated checkpoint (default: CHECKPOINT stem + _calibrated.pt)")
    ap.add_argument("--holdout", default=None, help="holdout.json (default: beside the checkpoint)")
    ap.add_argument("--label-dependency", action="store_true", help="also fit the label-dependency layer")
    ap.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="half-f1",
                    help="F*/2 (default: half the best held-out F1, optimal for calibrated probabilities) "
                         "or argmax (the held-out F1-maximising cut)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("calibrate: error: --device cuda: no CUDA device available", file=sys.stderr)
        return 2
    try:
        calibrate(args.checkpoint, args.coco_root, args.out, args.holdout, args.label_dependency,
                  args.device, args.batch_size, threshold_rule=args.threshold_rule)
    except (CalibrationError, CheckpointError, HoldoutError, CocoDataError, ImageDecodeError) as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"calibrate: error: cannot write: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
