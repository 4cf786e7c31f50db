"""A calibrated model through every artifact: train (with its held-out split) -> calibrate -> ONNX -> TensorRT -> gate.

    python -m benchmarks.calibrated_engine --work /tmp/cal [--device cuda]    (benchmarks/gpu_run.sh, step calibrated_plan)

On a generated toy set: a short probres-train run (resnet18 @64, 25% held out, calibrated at
its end), export.onnx --fp16 of best_calibrated.pt, and, where TensorRT is installed, an FP16
plan from it. Checks that the ONNX metadata and the plan's sidecar carry the checkpoint's
thresholds, and runs probres-eval of each exported model against the calibrated checkpoint
(its gate: mAP, CF1 at the contract's thresholds, ECE). Prints one line per check; exit 1 if
any fails. Every step is the real command-line tool.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def sh(*cmd: str) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run([sys.executable, *cmd]).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calibrated_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(args.work)
    toy, run = work / "toy", work / "run"
    ok = sh("-m", "train.toy_coco", "--out", str(toy), "--train", "96", "--val", "48") == 0
    ok = ok and sh("-m", "train", "--coco-root", str(toy), "--out", str(run), "--arch", "resnet18", "--image-size", "64",
                   "--epochs", str(args.epochs), "--batch-size", "8", "--lr", "2e-3", "--augment", "light",
                   "--holdout-frac", "0.25", "--workers", "1", "--device", args.device, "--no-progress") == 0
    ckpt = run / "best.pt"          # the calibrated model (train.calibrate: best_raw.pt is the uncalibrated one)
    onnx32, onnx16, plan = work / "model.onnx", work / "model_fp16.onnx", work / "model.plan"
    ok = ok and sh("-m", "export.onnx", "--checkpoint", str(ckpt), "--output", str(onnx32), "--fp16",
                   "--verify-images", str(toy / "val2014")) == 0
    if not ok:
        print("calibrated_engine: FAILED before any check (see above)")
        return 1
    from runtime.onnx_meta import read_onnx_meta
    from train.checkpoint import load_checkpoint

    want = load_checkpoint(ckpt).contract
    results = {"onnx thresholds": read_onnx_meta(onnx16).contract == want}
    engines = [onnx16]
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
        print("calibrated_engine: TensorRT not installed: no plan (unmeasured)")
    if has_trt:
        from runtime.trt_manifest import read_manifest
        results["tensorrt build"] = sh("-m", "export.tensorrt", "--onnx", str(onnx16), "--output", str(plan),
                                       "--fp16") == 0
        if results["tensorrt build"]:
            results["sidecar thresholds"] = read_manifest(plan).contract == want
            engines.append(plan)
    for e in engines:
        rep = work / f"{e.name}.eval.json"
        rc = sh("-m", "runtime.eval", "--engine", str(e), "--coco-root", str(toy), "--reference", str(ckpt),
                "--json", str(rep), "--device", "auto")
        results[f"gate {e.name}"] = rc == 0
        if rep.is_file():
            r = json.loads(rep.read_text())
            print(f"calibrated_engine: {e.name}: " + ", ".join(
                f"{k} {g['value']:+.5f}" for k, g in r["gates"].items() if g["value"] is not None))
    for k, v in results.items():
        print(f"calibrated_engine: {k}: {'ok' if v else 'FAILED'}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
