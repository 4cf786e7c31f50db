"""Independent sigmoids vs the label-dependency layer on one trained backbone: the co-occurrence table.

    python -m benchmarks.cooccurrence --checkpoint runs/toy_co/best.pt --coco-root data/toy_coco_co [--json table.json]

Runs train.calibrate twice on the same frozen backbone and held-out split: without the layer
(RUN/best_calibrated.pt, from RUN/best_raw.pt when the run calibrated best.pt) and with it (RUN/best_label_dependency.pt), then prints a markdown
table of their val2014 figures, with the uncalibrated checkpoint as the first row: mAP, CF1
and OF1 at 0.5 and at the contract's thresholds, ECE, Brier, and the seed's failure mode,
the mean probability of absent labels that usually co-occur (P(j | i) >= 0.5 on the
training images) with a present one (lower is better).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = (("mAP", "mAP"), ("CF1", "CF1@0.5"), ("OF1", "OF1@0.5"), ("CF1_contract", "CF1@thr"),
           ("OF1_contract", "OF1@thr"), ("ECE", "ECE"), ("Brier", "Brier"), ("absent_partner_prob", "p(absent partner)"))


def table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table of (name, val figures) rows."""
    lines = ["| model | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, fig in rows:
        lines.append(f"| {name} | " + " | ".join("n/a" if fig[k] != fig[k] else f"{fig[k]:.4f}" for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cooccurrence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="RUN_DIR/best.pt (uncalibrated, with RUN_DIR/holdout.json)")
    ap.add_argument("--coco-root", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    from runtime.coco import CocoDataError
    from train.calibrate import CalibrationError, calibrate
    from train.checkpoint import CheckpointError
    from train.holdout import HoldoutError

    ckpt = Path(args.checkpoint)
    if ckpt.with_name(ckpt.stem + "_raw.pt").is_file():   # probres-train's best.pt is calibrated: start from the raw one
        ckpt = ckpt.with_name(ckpt.stem + "_raw.pt")
    try:
        base = calibrate(ckpt, args.coco_root, ckpt.with_name("best_calibrated.pt"), device=args.device)
        dep = calibrate(ckpt, args.coco_root, ckpt.with_name("best_label_dependency.pt"), label_dependency=True,
                        device=args.device)
    except (CalibrationError, CheckpointError, HoldoutError, CocoDataError) as e:
        print(f"cooccurrence: error: {e}", file=sys.stderr)
        return 2
    rows = [("independent sigmoids, uncalibrated (0.5 for every label)", base["val_before"]),
            ("independent sigmoids + Platt + contract thresholds", base["val_after"]),
            ("label-dependency layer + Platt + contract thresholds", dep["val_after"])]
    print(f"\nval2014 ({args.coco_root}); held-out {base['heldout_images']} images; "
          f"absent-partner cases {base['val_after']['absent_partner_cases']}")
    print(table(rows))
    if args.json:
        from runtime.fileio import atomic_write_text, strict_json
        atomic_write_text(args.json, strict_json({"rows": [{"model": n, **f} for n, f in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
