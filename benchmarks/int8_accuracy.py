"""FP32, FP16 and INT8 side by side against the PyTorch checkpoint: mAP, CF1, ECE and the eval gate.

    python -m benchmarks.int8_accuracy --coco-root demo_out/toy_coco --reference demo_out/run/best.pt \
        --engine demo_out/model.onnx --engine demo_out/model_fp16.onnx \
        --engine demo_out/model_int8.onnx@onnxruntime --engine demo_out/model_int8.onnx@openvino [--json OUT]

Each --engine is FILE or FILE@BACKEND (runtime.backends.open_backend's backend). Every image
of ROOT/val2014 (training's image set, runtime.coco) is decoded once per model through
runtime.pipeline, as probres-eval does (runtime.eval.run_pair); the gate is probres-eval's
(mAP drop <= 0.002, 0.005 for INT8). ECE: 15 equal-width bins over all (image, label)
probabilities pooled (runtime.metrics.calibration_error, as probres-eval reports it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from runtime.backends import BackendError, open_backend
from runtime.eval import MAX_MAP_DROP, MAX_MAP_DROP_INT8, run_pair
from runtime.metrics import calibration_error, multilabel_metrics


def score(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    m = multilabel_metrics(probs, targets)
    return {"mAP": m["mAP"], "CF1": m["CF1"], "OF1": m["OF1"], "ECE": calibration_error(probs, targets)[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--coco-root", required=True)
    ap.add_argument("--reference", required=True, help="the PyTorch checkpoint")
    ap.add_argument("--engine", action="append", required=True, metavar="FILE[@BACKEND]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from runtime.coco import CocoDataError, load_coco_split

    rows: list[dict[str, Any]] = []
    try:
        ref = open_backend(args.reference, device="cpu", threads=args.threads)
        split = load_coco_split(args.coco_root, "val2014", labels=ref.contract.labels)
        paths = split.image_paths
        pr, _, failed = run_pair(paths, ref, None, 16, args.threads)
        if failed:
            raise CocoDataError(f"{len(failed)} images failed to decode, first: {failed[0][1]}")
        base = score(pr, split.targets)
        rows.append({"model": f"pytorch {ref.precision}", "file": args.reference, **base, "map_drop": 0.0})
        ref.close()
        for spec in args.engine:
            path, _, kind = spec.partition("@")
            eng = open_backend(path, device="cpu", threads=args.threads, backend=kind or None)
            pe, _, _ = run_pair(paths, eng, None, 16, args.threads)
            s = score(pe, split.targets)
            tol = MAX_MAP_DROP_INT8 if eng.precision == "int8" else MAX_MAP_DROP
            drop = base["mAP"] - s["mAP"]
            rows.append({"model": f"{eng.name.split('[')[0]} {eng.precision}", "file": path, **s, "map_drop": drop,
                         "max_abs_prob_diff": float(np.abs(pe.astype(np.float64) - pr).max()),
                         "tolerance": tol, "passed": bool(drop <= tol)})
            eng.close()
    except (BackendError, CocoDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{split.describe()}; metrics in %, ECE as a fraction")
    print(f"{'model':<20}{'mAP':>8}{'CF1':>8}{'OF1':>8}{'ECE':>8}{'dmAP':>9}{'max|dp|':>9}  gate")
    for r in rows:
        gate = "" if "passed" not in r else f"{'PASS' if r['passed'] else 'FAIL'} (<= {r['tolerance']:g})"
        print(f"{r['model']:<20}{100 * r['mAP']:>8.2f}{100 * r['CF1']:>8.2f}{100 * r['OF1']:>8.2f}{r['ECE']:>8.4f}"
              f"{-r['map_drop']:>+9.5f}{r.get('max_abs_prob_diff', 0.0):>9.3g}  {gate}")
    if args.json:
        from runtime.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"image_set": split.describe(), "rows": rows}, indent=2) + "\n")
    return 0 if all(r.get("passed", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
