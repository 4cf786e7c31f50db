#!/usr/bin/env bash
# make demo: the whole path on the embedded toy set, CPU only, in a few minutes on 2 cores.
#
#     scripts/demo.sh [OUT_DIR]      (make demo runs it with OUT_DIR=demo_out)
#
# toy COCO -> short CPU training (then calibration and thresholds on its held-out split,
# train.calibrate) -> ONNX FP32 + FP16 export of the calibrated model -> probres-infer on the val
# images (a few results as tables) -> probres-eval of both ONNX files against the checkpoint they
# were exported from (run/best.pt, the calibrated model, checked by sha256: docs/parity-gate.md),
# and a check that the gate refuses run/best_raw.pt (the uncalibrated weights), which they were
# not exported from; ending with the parity table. Every step is the real command-line tool, so this
# script is also the CPU walkthrough of README's GPU commands. Exit status: non-zero when a
# step fails or an exported model does not match PyTorch within tolerance.
set -euo pipefail

OUT=${1:-demo_out}
BIN=${BIN:-.venv/bin}
# README's documented CPU configuration. 1600 train images so that the default 5% held out for
# calibration (~71 images) is enough to fit on; 800 val images so that ECE and CF1 are measured
# to about +-0.005 (on 100 the ECE of a perfectly calibrated model is already 0.026).
TRAIN_IMAGES=${TRAIN_IMAGES:-1600}
VAL_IMAGES=${VAL_IMAGES:-800}
EPOCHS=${EPOCHS:-6}
SIZE=${SIZE:-64}
T0=$(date +%s)
step() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"

step "1/5 toy COCO-2014 ($TRAIN_IMAGES train / $VAL_IMAGES val images) -> $OUT/toy_coco"
"$BIN/python" -m train.toy_coco --out "$OUT/toy_coco" --train "$TRAIN_IMAGES" --val "$VAL_IMAGES" --seed 0

step "2/5 training resnet18 @ ${SIZE}px for $EPOCHS epochs on the CPU, then calibration -> $OUT/run/best.pt (calibrated; best_raw.pt: uncalibrated)"
"$BIN/probres-train" --coco-root "$OUT/toy_coco" --out "$OUT/run" --arch resnet18 --image-size "$SIZE" \
    --epochs "$EPOCHS" --batch-size 8 --lr 2e-3 --augment light --workers 1 --device cpu --no-progress

step "3/5 export the calibrated model to ONNX FP32 + FP16, each verified against PyTorch -> $OUT/model.onnx, $OUT/model_fp16.onnx"
"$BIN/python" -m export.onnx --checkpoint "$OUT/run/best.pt" --output "$OUT/model.onnx" --fp16 \
    --verify-images "$OUT/toy_coco/val2014"

step "4/5 probres-infer on $OUT/toy_coco/val2014 -> $OUT/predictions.jsonl (first 3 images as tables)"
"$BIN/probres-infer" --engine "$OUT/model_fp16.onnx" "$OUT/toy_coco/val2014" --output "$OUT/predictions.jsonl"
mapfile -t FIRST < <(find "$OUT/toy_coco/val2014" -name '*.jpg' | sort | head -n 3)
"$BIN/probres-infer" --engine "$OUT/model_fp16.onnx" "${FIRST[@]}" --format table --top-k 3

step "5/5 probres-eval: ONNX Runtime vs the PyTorch checkpoint on val2014"
rc=0
for m in model model_fp16; do
    echo "-- $m.onnx"
    "$BIN/probres-eval" --engine "$OUT/$m.onnx" --coco-root "$OUT/toy_coco" --reference "$OUT/run/best.pt" \
        --json "$OUT/parity_$m.json" > "$OUT/parity_$m.txt" || rc=$?
    tail -n 2 "$OUT/parity_$m.txt"
done
# The gate cannot be fooled (issue 24): run/best_raw.pt is not what model.onnx came from: refused, exit 2.
echo "-- model.onnx against run/best_raw.pt (not its source): must be refused"
set +e
"$BIN/probres-eval" --engine "$OUT/model.onnx" --coco-root "$OUT/toy_coco" --reference "$OUT/run/best_raw.pt" \
    > /dev/null 2> "$OUT/refused.txt"
refused=$?
set -e
cat "$OUT/refused.txt"
[ "$refused" -eq 2 ] || { echo "error: probres-eval accepted a reference the model was not exported from"; rc=1; }
# INT8 (issue 15): one Q/DQ file calibrated on train2014, gated at 0.005 on ONNX Runtime and OpenVINO;
# its reference is the checkpoint model.onnx came from (INT8's lineage reaches it through model.onnx).
if "$BIN/python" -c "import nncf, openvino" 2>/dev/null; then
    "$BIN/python" -m export.int8 --onnx "$OUT/model.onnx" --calib-images "$OUT/toy_coco/train2014" \
        --output "$OUT/model_int8.onnx" 2>&1 | grep -E "^(wrote|error|INT8)" || rc=1
    for b in onnxruntime openvino; do
        echo "-- model_int8.onnx on $b"
        "$BIN/probres-eval" --engine "$OUT/model_int8.onnx" --backend $b --coco-root "$OUT/toy_coco" \
            --reference "$OUT/run/best.pt" --json "$OUT/parity_model_int8_$b.json" > "$OUT/parity_model_int8_$b.txt" || rc=$?
        tail -n 1 "$OUT/parity_model_int8_$b.txt"
    done
else
    echo "-- INT8 skipped: the int8 and openvino extras are not installed"
fi

step "done in $(( $(date +%s) - T0 )) s. Artifacts in $OUT/:"
cat <<INFO
  toy_coco/                 the toy COCO-2014 tree (train2014/, val2014/, annotations/)
  run/best.pt               the model to ship: calibrated head + the contract's thresholds (the PyTorch reference)
  run/best_raw.pt           the uncalibrated checkpoint; run/ also holds logs and holdout.json
  run/*.png                 reliability diagram, thresholds, co-occurrence heatmap
  model.onnx, model_fp16.onnx   the exported models (contract + val metrics in their metadata)
  model_int8.onnx           the INT8 Q/DQ model (export.int8), when the int8 extra is installed
  predictions.jsonl         probres-infer's output for every val image
  parity_model*.json/.txt   probres-eval's reports and tables
INFO

"$BIN/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r32, r16 = (json.load(open(f"{out}/parity_{m}.json")) for m in ("model", "model_fp16"))
cal = json.load(open(f"{out}/run/best.calibration.json"))
b, a = cal["val_before"], cal["val_after"]
print(f"\nCalibration (fitted on {cal['heldout_images']} held-out train images; val2014 only reported):")
print(f"  val mAP {b['mAP']:.4f} -> {a['mAP']:.4f}, ECE {b['ECE']:.4f} -> {a['ECE']:.4f}, Brier {b['Brier']:.4f} -> {a['Brier']:.4f}")
print(f"  ECE of a perfectly calibrated model on this many images: {a['ECE_floor']:.4f}")
print(f"  CF1 / OF1 at 0.5: {b['CF1']:.4f} / {b['OF1']:.4f} uncalibrated, {a['CF1']:.4f} / {a['OF1']:.4f} calibrated; "
      f"calibrated at the contract's thresholds: {a['CF1_contract']:.4f} / {a['OF1_contract']:.4f}")
print(f"\nParity table: toy val2014, {r32['num_images']} images ({r32['image_set']}); metrics in %")
print(f"{'metric':<8}{'PyTorch':>10}{'ONNX FP32':>11}{'ONNX FP16':>11}")
for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_contract", "OF1_contract", "ECE"):
    print(f"{k.replace('_contract', '@thr'):<8}{100 * r32['reference'][k]:>10.2f}{100 * r32['engine'][k]:>11.2f}{100 * r16['engine'][k]:>11.2f}")
for name, r in (("FP32", r32), ("FP16", r16)):
    print(f"ONNX {name}: mAP drop {r['map_drop']:+.5f} (tolerance {r['tolerance']:g}), CF1@thr drop "
          f"{r['gates']['cf1_drop']['value']:+.5f}, ECE rise {r['gates']['ece_rise']['value']:+.5f}, max |dprob| "
          f"{r['max_abs_prob_diff']:.2g} (tolerance {r['gates']['max_dprob']['tolerance']:g}), label sets differing "
          f"{r['label_set_diffs']}/{r['num_images']} (tolerance {r['gates']['label_diff_share']['tolerance']:.0%}): "
          f"{r['verdict']}")
PY
exit $rc
