"""Calibration and thresholds on the held-out split, folded into the checkpoint and its contract.

    python -m train.calibrate --checkpoint runs/toy/best.pt [--coco-root data/toy_coco] [--out OTHER.pt]
        [--label-dependency] [--holdout runs/toy/holdout.json]

(probres-train runs this at the end unless --no-calibrate.) One checkpoint to ship: without
--out, CHECKPOINT itself becomes the calibrated model (its contract with the thresholds) and
the uncalibrated one is kept beside it as STEM_raw.pt (RUN_DIR/best.pt and best_raw.pt), so
exporting best.pt, as anyone would, exports the calibrated model. A calibrated CHECKPOINT is
calibrated again from its STEM_raw.pt. --out writes elsewhere and leaves CHECKPOINT alone.
The data are the run's own (its config: the COCO root, or the label CSVs of
docs/datasets-csv.md) unless --coco-root names another tree.

On the logits z of the held-out training images (RUN_DIR/holdout.json, never trained on;
val is only reported, and checked for an unchanged ranking):
  1. optionally the label-dependency layer z' = z + W sigmoid(z) + b (train/label_dependency.py);
  2. per-class Platt scaling p = sigmoid(a_k z'_k + c_k), a_k > 0 (a_k = exp(.)), minimising
     NLL with a prior toward the tied case (one (a, c) fitted on all labels pooled); a class
     with fewer than MIN_POSITIVES held-out positives takes the tied case itself;
  3. train/calibration_guard.py: a held-out set too small to fit on gives the identity (and a
     warning); a degenerate fit (slope near 0, non-finite) or one that moves a class's val AP
     as served (float32 ties) by more than 1e-4 is refused for that class: its own fit falls
     back to the tied fit, then to the identity. Val mAP therefore stays within 1e-4; the log
     and the calibration JSON say which fit each class got, why, and its held-out positives;
  4. thresholds on the calibrated held-out probabilities: each class's F1-optimal one, or, with
     fewer than MIN_POSITIVES positives, the one global threshold that maximises OF1; estimated
     as F*/2 (half the best F1, optimal for calibrated probabilities) unless --threshold-rule argmax.
     When nothing was calibrated (all identity) the contract keeps no thresholds (0.5);
  5. the fold: fc.weight[k] *= a_k, fc.bias[k] = a_k * bias[k] + c_k (or the layer's scale,
     W rows and b), so ONNX and TensorRT compute calibrated probabilities with no extra op.
Writes OUT (the contract gains the thresholds; "calibration" holds the parameters and the
before/after figures; val_metrics are the calibrated model's), OUT_STEM.calibration.json,
OUT_STEM_reliability.png, OUT_STEM_thresholds.png, cooccurrence.json and cooccurrence.png
into OUT's directory. Exit 2 on a usage or data error (one line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from runtime.coco import CocoDataError, CocoSplit
from runtime.fileio import atomic_write_text, strict_json
from runtime.preprocess import ImageDecodeError
from runtime.metrics import average_precision, calibration_error, calibration_error_floor, multilabel_metrics
from train import label_dependency as LD
from train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from train.calibration_guard import MAX_AP_CHANGE, MIN_FIT_LABELS, MIN_SLOPE, guard, too_small
from train.coco import CocoDataset, load_splits
from train.config import TrainConfig
from train.holdout import HOLDOUT_FILE, HoldoutError, read_holdout, select_ids
from train.platt import (MIN_POSITIVES, PRIOR_WEIGHT, THRESHOLD_RULES, CalibrationError, choose_thresholds,  # noqa: F401
                         fit_platt, fold, sigmoid)

RAW_SUFFIX = "_raw"          # calibrate_run: RUN_DIR/best.pt is the calibrated model, best_raw.pt the uncalibrated
FIGURES = ("mAP", "CF1", "OF1", "CF1_contract", "OF1_contract", "ECE", "Brier")


@torch.no_grad()
def logits(model: nn.Module, split: CocoSplit, spec: Any, device: torch.device, batch_size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 logits of `split` under the runtime's preprocessing (train/coco.py eval mode), and
    the (N, F) float32 features the head received (for calibration_guard's as-served check)."""
    ds = CocoDataset(split, spec, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval().to(device)
    out, feats = [], []
    hook = model.fc.register_forward_hook(lambda _m, inputs, _o: feats.append(inputs[0].float().cpu()))
    try:
        for x, _, index in loader:
            bad = index < 0                   # an image that did not decode comes back as zeros: refuse it
            if bool(bad.any()):
                raise CalibrationError(ds.bad_image_message(int(-1 - index[bad][0])))
            out.append(model(x.to(device).contiguous(memory_format=torch.channels_last)).double().cpu())
    finally:
        hook.remove()
    if not out:
        return np.zeros((0, model.fc.out_features)), np.zeros((0, model.fc.in_features), np.float32)
    return torch.cat(out).numpy(), torch.cat(feats).numpy()




def _figures(m: dict[str, Any]) -> dict[str, float]:
    return {k: m[k] for k in FIGURES if k in m}


def _raw_name(path: Path) -> Path:
    """Where calibrate_run keeps the uncalibrated model: best.pt -> best_raw.pt."""
    return path.with_name(path.stem + RAW_SUFFIX + path.suffix)


def _keep_raw(path: Path, raw: Path) -> None:
    """RUN_DIR/best_raw.pt := best.pt, atomically (a hard link, or a copy where links are not possible)."""
    tmp = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:          # no hard links here (some network and FUSE file systems)
        shutil.copyfile(path, tmp)
    os.replace(tmp, raw)


def _served_val_ap(model: nn.Module, feats: np.ndarray, y: np.ndarray, dep: dict | None
                   ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """val_ap(a, c) for calibration_guard.guard: per-class AP of a copy of the head folded with (a, c), run
    in float32 on the val images' pooled features, as the exported model computes it."""
    x = torch.as_tensor(feats, dtype=torch.float32)

    def val_ap(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        shim = nn.Module()
        shim.fc = copy.deepcopy(model.fc).cpu()
        fold(shim, a, c, dep)
        with torch.no_grad():
            return average_precision(torch.sigmoid(shim.fc(x)).numpy(), y)
    return val_ap


def calibrate(checkpoint: str | Path, coco_root: str | Path | None = None, out: str | Path | None = None,
              holdout: str | Path | None = None, label_dependency: bool = False, device: Any = "cpu",
              batch_size: int = 32, log: Callable[[str], None] = print,
              threshold_rule: str = "half-f1") -> dict[str, Any]:
    """Calibrate `checkpoint` on its held-out split; write OUT and the pictures. Returns the calibration record.

    The data are the run's (its config: a COCO root or label CSVs), or `coco_root` when given.
    Every fit passes train/calibration_guard.py (refused per class: own -> tied -> identity).
    """
    from runtime import plots

    checkpoint = Path(checkpoint)
    ckpt, raw = load_checkpoint(checkpoint), None
    fresh = "calibration" not in ckpt.extra       # CHECKPOINT itself is uncalibrated
    if out is None:                 # in place: CHECKPOINT becomes the calibrated model, STEM_raw.pt the raw one
        out, raw = checkpoint, _raw_name(checkpoint)
        if "calibration" in ckpt.extra and raw.is_file():      # calibrated before: again, from the raw one
            ckpt = load_checkpoint(raw)
    elif Path(out).resolve() == checkpoint.resolve():
        raise CalibrationError(f"--out {out}: would overwrite the input checkpoint; leave --out out to calibrate "
                               f"in place (the uncalibrated model is then kept as {_raw_name(checkpoint).name})")
    out = Path(out)
    if "calibration" in ckpt.extra:
        raise CalibrationError(f"{checkpoint}: already calibrated; calibrate the uncalibrated checkpoint "
                               f"({_raw_name(checkpoint).name})")
    holdout = Path(holdout) if holdout else checkpoint.parent / HOLDOUT_FILE
    ids = read_holdout(holdout)
    data = TrainConfig.from_dict(ckpt.config | ({"coco_root": str(coco_root)} if coco_root is not None else {}))
    if not data.coco_root and not data.train_csv:
        raise CalibrationError(f"{checkpoint}: its config names no data set; give --coco-root")
    labels, spec = ckpt.contract.labels, ckpt.contract.preprocess
    train, val = load_splits(data, labels)
    held = select_ids(train, ids, f"{train.split} held-out")
    if len(held) == 0:
        raise CalibrationError("the held-out split is empty; train with --holdout-frac > 0")
    device = torch.device(device)
    yh, yv = held.targets, val.targets
    model = ckpt.build()
    if LD.has_label_dependency(ckpt.state_dict):
        raise CalibrationError(f"{checkpoint}: already has a label-dependency head; calibrate the uncalibrated one")
    log(f"calibrate: {len(held)} held-out images ({holdout}), reporting on {len(val)} val images")
    zh, _ = logits(model, held, spec, device, batch_size)
    zv, fv = logits(model, val, spec, device, batch_size)
    c_count = labels.num_classes
    small = too_small(yh)
    if small:
        dep, platt = None, {"a": np.ones(c_count), "c": np.zeros(c_count), "per_class": np.zeros(c_count, bool),
                            "tied": (1.0, 0.0), "temperature": 1.0}
        checked = {"source": ["identity"] * c_count, "refused": {}, "tied_refused": small,
                   "a": np.ones(c_count), "c": np.zeros(c_count), "max_ap_change": 0.0}
        log(f"calibrate: WARNING: {small}: no calibration (the identity) and no thresholds (0.5)")
    else:
        dep = LD.fit(zh, yh) if label_dependency else None
        platt = fit_platt(LD.apply(dep, zh), yh)
        checked = guard(platt, _served_val_ap(model, fv, yv, dep))
    zh2 = LD.apply(dep, zh)
    pos = (yh > 0).sum(0)
    src = checked["source"]
    a_k, c_k = checked["a"], checked["c"]
    ph = sigmoid(a_k * zh2 + c_k)
    calibrated = any(s != "identity" for s in src) or dep is not None
    if calibrated:
        thr = choose_thresholds(ph, yh, rule=threshold_rule)
    else:      # F*/2 assumes calibrated probabilities: uncalibrated ones keep 0.5
        thr = {"thresholds": None, "per_class": np.zeros(c_count, bool), "global": 0.5, "rule": "none (0.5)"}
    t = thr["thresholds"]

    fold(model, a_k, c_k, dep)
    pv_after = sigmoid(logits(model, val, spec, device, batch_size)[0])              # as served: the folded head
    fold_err = float(np.abs(sigmoid(logits(model, held, spec, device, batch_size)[0]) - ph).max())
    pv_before, ph_before = sigmoid(zv), sigmoid(zh)
    half = np.full(c_count, 0.5)
    before = multilabel_metrics(pv_before, yv, contract_thresholds=half)
    after = multilabel_metrics(pv_after, yv, contract_thresholds=half if t is None else t)
    train_part = train.targets[~np.isin(train.image_ids, held.image_ids)]      # the images trained on
    cond = LD.cooccurrence(train_part)
    partner_before, n_partner = LD.absent_partner_probability(pv_before, yv, cond)
    partner_after, _ = LD.absent_partner_probability(pv_after, yv, cond)
    names = labels.names
    record = {
        "method": ("platt" if calibrated else "identity") + (" + label-dependency" if dep is not None else ""),
        "heldout_images": len(held), "min_positives": MIN_POSITIVES,
        "a": a_k.tolist(), "c": c_k.tolist(), "per_class_platt": [s == "own" for s in src],
        "fit_source": src, "heldout_positives": pos.tolist(), "heldout_positives_tied": int(pos.sum()),
        "refused": {names[k]: why for k, why in checked["refused"].items()}, "tied_refused": checked["tied_refused"],
        "guard": {"min_slope": MIN_SLOPE, "max_ap_change": MAX_AP_CHANGE, "min_fit_labels": MIN_FIT_LABELS,
                  "max_ap_change_seen": checked["max_ap_change"]},
        "fitted": {"a": platt["a"].tolist(), "c": platt["c"].tolist()},
        "tied_temperature": platt["temperature"], "tied_a_c": list(platt["tied"]), "prior_weight": PRIOR_WEIGHT,
        "thresholds": None if t is None else t.tolist(), "per_class_threshold": thr["per_class"].tolist(),
        "global_threshold": thr["global"], "threshold_rule": thr["rule"],
        "label_dependency": None if dep is None else {k: v.tolist() for k, v in dep.items()} | {"l2": LD.L2},
        "fold_max_abs_dprob_heldout": fold_err,
        "heldout": {"ECE_before": calibration_error(ph_before, yh)[0], "ECE_after": calibration_error(ph, yh)[0]},
        "val_before": _figures(before) | {"absent_partner_prob": partner_before,
                                          "ECE_floor": calibration_error_floor(pv_before)},
        "val_after": _figures(after) | {"absent_partner_prob": partner_after, "absent_partner_cases": n_partner,
                                        "ECE_floor": calibration_error_floor(pv_after)},
        "val_note": "val is only reported here and checked for an unchanged ranking (mAP): nothing is fitted on it",
    }
    contract = ckpt.contract.with_thresholds(None if t is None else t.tolist())
    if raw is not None and fresh:
        _keep_raw(checkpoint, raw)     # before the rename over CHECKPOINT: a complete model is always there
    save_checkpoint(out, Checkpoint(ckpt.arch, model.state_dict(), contract, ckpt.config, ckpt.epoch,
                                    {k: v for k, v in after.items() if k not in ("AP", "ECE_per_class")},
                                    ckpt.weights, {"calibration": record, "calibrated_from": str(raw or checkpoint)}))
    stem = out.with_suffix("")
    atomic_write_text(f"{stem}.calibration.json", strict_json(record, indent=1) + "\n")   # no case: null
    atomic_write_text(out.parent / "cooccurrence.json", json.dumps(
        {"labels": list(names), "P_j_given_i": cond.tolist(), "images": int(len(train_part))}) + "\n")
    plots.reliability_diagram(f"{stem}_reliability.png", [("held-out, before", ph_before, yh),
                              ("held-out, after", ph, yh), ("val, before", pv_before, yv), ("val, after", pv_after, yv)])
    plots.thresholds_bar(f"{stem}_thresholds.png", names, half if t is None else t, thr["per_class"], thr["global"])
    plots.cooccurrence_heatmap(out.parent / "cooccurrence.png", names, cond)
    _log_fits(log, record, names)
    b, a = record["val_before"], record["val_after"]
    log(f"calibrate: {record['method']}; {src.count('own')}/{c_count} classes with their own Platt fit, "
        f"{src.count('tied')} on the tied fit (a {platt['tied'][0]:.3g} c {platt['tied'][1]:+.3f}), "
        f"{src.count('identity')} on the identity; {int(thr['per_class'].sum())} own thresholds "
        f"({thr['rule']}), global {thr['global']:.3f}; fold max |dp| {fold_err:.1e}")
    log(f"calibrate: val mAP {b['mAP']:.4f} -> {a['mAP']:.4f}, ECE {b['ECE']:.4f} -> {a['ECE']:.4f}, "
        f"(a perfectly calibrated model: {a['ECE_floor']:.4f} on this many images), "
        f"Brier {b['Brier']:.4f} -> {a['Brier']:.4f}; CF1/OF1 at 0.5 {b['CF1']:.4f}/{b['OF1']:.4f} uncalibrated, "
        f"{a['CF1']:.4f}/{a['OF1']:.4f} calibrated, "
        f"at the contract's thresholds {a['CF1_contract']:.4f}/{a['OF1_contract']:.4f} -> {out}")
    return record


def _log_fits(log: Callable[[str], None], record: dict[str, Any], names: Sequence[str]) -> None:
    """How many held-out positives each fit saw, and every refusal (one line per reason)."""
    pos, src = record["heldout_positives"], record["fit_source"]
    own = [p for p, s in zip(pos, src) if s == "own"]
    log(f"calibrate: held-out positives: tied fit {record['heldout_positives_tied']} (all labels pooled, "
        f"{record['heldout_images']} images); own fits {len(own)} classes"
        + (f", {min(own)}..{max(own)} positives each" if own else "")
        + f" (a class needs {record['min_positives']}); per class: "
        + ", ".join(f"{n} {p}" for n, p in zip(names, pos)))
    if record["tied_refused"] and "too small" not in record["tied_refused"]:
        log(f"calibrate: WARNING: tied fit refused: {record['tied_refused']}")
    groups: dict[tuple[str, str], list[str]] = {}
    for n, why in record["refused"].items():
        groups.setdefault((why, src[list(names).index(n)]), []).append(n)
    for (why, now), who in groups.items():
        log(f"calibrate: WARNING: refused for {', '.join(who)} ({why}): {now} instead")


def calibrate_run(run_dir: str | Path, log: Callable[[str], None] = print, **options: Any) -> dict[str, Any] | None:
    """probres-train's last step: calibrate RUN_DIR/best.pt in place (best_raw.pt keeps the uncalibrated model).

    A failure is logged, not raised: the trained run stays whole. Returns the record or None.
    """
    best = Path(run_dir) / "best.pt"
    try:
        return calibrate(best, None, None, log=log, **options)
    except (ValueError, OSError) as e:     # e.g. an unreadable held-out image
        log(f"calibrate: failed ({str(e).splitlines()[0][:300]}); {best} is unchanged (the uncalibrated model unless "
            f"an earlier calibration passed): fix it and run python -m train.calibrate --checkpoint {best}")
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt")
    ap.add_argument("--coco-root", default=None, help="the COCO root the run trained on (default: the run's data, "
                    "from the checkpoint's config: a COCO root or label CSVs)")
    ap.add_argument("--out", default=None, help="write the calibrated checkpoint here and leave CHECKPOINT as it is "
                    "(default: CHECKPOINT becomes the calibrated model, the uncalibrated one is kept as STEM_raw.pt)")
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
