#!/usr/bin/env bash
# Every GPU check and benchmark of issue 6 in ONE call (about 8 minutes on one H100); full JSON under $OUT.
#
#   device tool:  run(command="bash benchmarks/gpu_run.sh", timeout_s=600[, carry=[".whl"]])
#   some steps:   GPU_RUN_STEPS="checkpoint latency train_step" bash benchmarks/gpu_run.sh
#   CPU dry run:  GPU_RUN_TINY=1 PY=.venv/bin/python OUT=/tmp/gpu_out bash benchmarks/gpu_run.sh
#
# Installs nothing from the network (the device machine reaches none). Wheels in .whl/ (carried
# with the call) are installed with --no-index into /tmp/site first, if there are any: e.g.
# onnxconverter-common for the FP16 ONNX graph and pycocotools for the training loader, which the
# device image lacks (pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl onnxconverter-common==1.16.0 pycocotools==2.0.11)
# Steps, most important first, each under its own timeout and all under one deadline
# (GPU_RUN_BUDGET, default 540 s, so the call ends inside the tool's 600 s); a failed step is
# reported and the rest go on:
#   1 environment (into run.log): nvidia-smi, python packages, TensorRT presence
#   2 build the C preprocessing extension in place (runtime/_fastnorm; numpy twin if it fails)
#   3 an untrained resnet101 @448 checkpoint, 80 COCO labels, BatchNorm statistics recalibrated on
#     photos (speed does not depend on weights; FP16 numerics do: raw init overflows FP16)
#   4 benchmarks.latency: PyTorch eager FP32 vs eager FP16 channels_last vs the same FP16 kernels
#     replayed from a CUDA graph, batch 1/8/32/128 (CUDA events), FP16-vs-FP32 probability
#     differences, end-to-end probres-infer throughput, plot
#   5 training-step images/s (benchmarks.train_step: synthetic batch = compute ceiling; the real
#     DataLoader on a generated toy set with this machine's cores, --augment asl on the GPU (uint8
#     batches, per-sample augmentation there); the loader alone; one worker's CPU ms per image;
#     then the step without fused Adam, in NCHW and under torch.compile, each written as measured)
#   6 benchmarks.preprocess on the device's 16 quiet CPU cores, threads 1..16
#   7 torch.compile FP16 channels_last (Inductor, freezing, CUDA graphs) against eager
#   8 with the time left: ONNX FP32 + FP16 export (verified against PyTorch), a TensorRT FP16 plan
#     only if tensorrt exists, and their latency rows (this image's onnxruntime is CPU-only)
#   8b trt_tests: the TensorRT doubles + real cuda-python tests, and the real-TensorRT test where
#     tensorrt and a GPU exist (export.tensorrt + the backend vs ONNX Runtime)
#   8c infer_cli: probres-infer itself (the CLI, its own loop) over E2E generated photo files at
#     batch 128 with each shipped GPU backend + options the files allow; its "img/s" lines go to
#     run.log and summary.txt (no extra file: the 8-file limit)
#   8d int8: export.int8 Q/DQ ONNX, its INT8 TensorRT plan and latency rows (run.log; issue 15)
#   8e calibrated_plan: a calibrated model through ONNX and TensorRT: thresholds in the sidecar, the eval gate (issue 10)
#   9 a short table, printed last
#  10 (before 9) probres-serve bytes-in vs tensors-in, where PyTriton is installed (see the step)
# Every latency row is a shipped backend + options (benchmarks.latency opens it with
# runtime.backends.open_backend; the JSON row's "command" is its probres-infer line), timed in the
# backend's own buffers; its end-to-end figure is runtime.pipeline.classify, probres-infer's loop.
# $OUT gets at most 8 files (the device tool's limit): run.log preprocess.json latency.json
# latency.png train_step.json latency_compile.json latency_onnx.json summary.txt.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
TINY=${GPU_RUN_TINY:-0}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}

if [ "$TINY" = 1 ]; then        # a few minutes on a 2-core CPU: checks the plumbing, not the speed
  ARCH=resnet18 SIZE=64 BATCHES=1,2 ITERS=2 E2E=6 CPU_BATCHES=1 CPU_ITERS=1 CPU_E2E=0
  TRAIN_ARGS="--arch resnet18 --image-size 64 --batch-size 2 --steps 2 --warmup 1 --toy-images 8 --ablations --worker-images 4 --worker-repeats 1"
  PRE_ARGS="--count 4 --repeats 1 --threads 1,2"
  BUDGET=${GPU_RUN_BUDGET:-900}
else
  ARCH=resnet101 SIZE=448 BATCHES=1,8,32,128 ITERS=30 E2E=1024 CPU_BATCHES=1 CPU_ITERS=3 CPU_E2E=0
  TRAIN_ARGS="--arch resnet101 --image-size 448 --batch-size 64 --steps 20 --toy-images 384 --augment asl --ablations --worker-images 64"
  PRE_ARGS="--count 64 --repeats 5 --threads 1,2,4,8,16"
  BUDGET=${GPU_RUN_BUDGET:-540}
fi
left() {  # seconds for a step: its own cap, or what is left before the deadline (at least 5)
  local r=$((BUDGET - SECONDS - 10)); [ "$r" -lt 5 ] && r=5; [ "$1" -lt "$r" ] && r=$1; echo "$r"
}
declare -A STATUS
STEPS=" ${GPU_RUN_STEPS:-all} "   # e.g. GPU_RUN_STEPS="checkpoint latency train_step": a rerun of some steps
step() {  # step NAME TIMEOUT_S CMD...: run, time, record the exit status
  local name=$1 limit=$2; shift 2
  if [ "$STEPS" != " all " ] && [ "$name" != wheels ] && [[ "$STEPS" != *" $name "* ]]; then STATUS[$name]="not selected"; return 1; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  return $rc
}

# 0 carried wheels, if any (never the network)
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# 1 environment (run.log only: the 8-file limit)
date -Is; uname -a; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
$PY - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "torchvision", "onnx", "onnxruntime", "onnxconverter_common", "tensorrt", "cuda", "cv2", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "present"))
    except Exception as e:
        print(m, "NOT AVAILABLE:", e.__class__.__name__, str(e)[:120])
import torch
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

# 2 C extension in place (the numpy twin gives the same numbers if this fails, only slower)
step build_ext "$(left 90)" $PY setup.py -q build_ext --inplace
$PY -c "import runtime.preprocess as p; print('fastnorm:', p._fastnorm.simd() if p._fastnorm else 'not built (numpy twin)')"

# 3 untrained checkpoint, BatchNorm recalibrated on photos (raw init overflows FP16 in ResNet-101)
step checkpoint "$(left 120)" $PY -c "from benchmarks.latency import speed_checkpoint as s; s('$WORK/best.pt', '$ARCH', $SIZE)"

# 4 PyTorch latency / throughput / FP16-vs-FP32 / end to end
LAT_ARGS=(--device "$DEVICE" --batch-sizes "$BATCHES" --iters "$ITERS" --cpu-batch-sizes "$CPU_BATCHES"
          --cpu-iters "$CPU_ITERS" --cpu-e2e-count "$CPU_E2E" --e2e-count "$E2E")
step latency "$(left 150)" $PY -m benchmarks.latency --engine "$WORK/best.pt" "${LAT_ARGS[@]}" \
  --formats "PyTorch eager,CUDA graph" --json "$OUT/latency.json" --plot "$OUT/latency.png"

# 5 training step: synthetic batch (compute ceiling) and the real loader on this machine's cores
step train_step "$(left 240)" $PY -m benchmarks.train_step $TRAIN_ARGS --device auto --json "$OUT/train_step.json"

# 6 preprocessing on this machine's CPUs (quiet, 16 cores: the thread-scaling figures)
step preprocess "$(left 60)" $PY -m benchmarks.preprocess $PRE_ARGS --json "$OUT/preprocess.json"

# 7 torch.compile (Inductor + freezing + CUDA graphs) against eager in the same process
if [ "$DEVICE" = cuda ]; then
  step latency_compile "$(left 240)" $PY -m benchmarks.latency --engine "$WORK/best.pt" "${LAT_ARGS[@]}" \
    --formats "PyTorch eager channels_last,torch.compile" --json "$OUT/latency_compile.json"
else
  echo "=== latency_compile: no CUDA device (torch.compile rows are GPU-only)"; STATUS[latency_compile]="skipped: no GPU"
fi

# 8 with the time left: ONNX FP32 + FP16 (export.onnx gates FP16 at max|dprob| <= 5e-3 against
# PyTorch; if random weights miss that gate the FP16 graph is converted unverified and the latency
# rows report its measured differences), TensorRT only where it exists, and their latency rows.
ENGINES=()
if ! step export_onnx "$(left 150)" $PY -m export.onnx --checkpoint "$WORK/best.pt" --output "$WORK/model.onnx" --fp16 --max-batch 256; then
  [ -f "$WORK/model.onnx" ] && [ ! -f "$WORK/model_fp16.onnx" ] \
    && step export_fp16_unverified "$(left 60)" $PY -m export.fp16 "$WORK/model.onnx" "$WORK/model_fp16.onnx"
fi
for f in "$WORK/model.onnx" "$WORK/model_fp16.onnx"; do [ -f "$f" ] && ENGINES+=(--engine "$f"); done
if $PY -c "import tensorrt" 2>/dev/null && [ -f "$WORK/model_fp16.onnx" ]; then
  step tensorrt_build "$(left 150)" $PY -m export.tensorrt --onnx "$WORK/model_fp16.onnx" --output "$WORK/model.plan" --fp16 \
       --min-batch 1 --opt-batch 32 --max-batch 128 && ENGINES+=(--engine "$WORK/model.plan")
else
  echo "=== tensorrt: not installed on this machine (or no FP16 ONNX): TensorRT rows are reported unavailable"
  STATUS[tensorrt]="not installed"
fi
if [ ${#ENGINES[@]} -gt 0 ]; then
  step latency_onnx "$(left 120)" $PY -m benchmarks.latency --engine "$WORK/best.pt" "${ENGINES[@]}" "${LAT_ARGS[@]}" \
    --formats "ONNX,TensorRT" --json "$OUT/latency_onnx.json"
fi

# 8b TensorRT checks (issue 13): the strict TensorRT doubles and the real cuda-python run anywhere; where
# tensorrt and a GPU exist, test_real_tensorrt_export_and_backend_match_onnxruntime runs python -m
# export.tensorrt and the backend against ONNX Runtime (its first real run). Output in run.log.
step trt_tests "$(left 120)" $PY -m pytest -q -p no:cacheprovider -rs tests/test_trt_cuda_python.py \
  tests/test_trt_backend_logic.py tests/test_trt_export_doubles.py

# 10 probres-serve (Triton through PyTriton): image bytes in vs tensors in at 1/8/32 clients, on the
# TensorRT plan when one was built, else the FP32 ONNX; rows go to run.log (the 8-file limit).
# Only where PyTriton imports: it pins numpy<2, so the device image needs its wheels carried in .whl
# (nvidia-pytriton, tritonclient, numpy<2 ...); otherwise reported "not installed".
SERVE_ENGINE=""
for f in "$WORK/model.plan" "$WORK/model.onnx"; do [ -z "$SERVE_ENGINE" ] && [ -f "$f" ] && SERVE_ENGINE=$f; done
if [ -n "$SERVE_ENGINE" ] && $PY -c "import pytriton, tritonclient.grpc" 2>/dev/null; then
  $PY -m benchmarks.images "$WORK/serve_img" --count 32 > /dev/null
  step serve "$(left 150)" $PY -m benchmarks.serve --engine "$SERVE_ENGINE" --images "$WORK/serve_img" \
    --requests "$([ "$TINY" = 1 ] && echo 2 || echo 20)" --instances 2 --max-batch 32
else
  echo "=== serve: PyTriton not importable here (or no exported model): serve rows unmeasured"
  STATUS[serve]="not installed"
fi

# 8c probres-infer itself, end to end, on photo files (batch 128; TINY: batch 2 on a few files)
if [ "$TINY" = 1 ]; then CLI_BATCH=2; else CLI_BATCH=128; fi
infer_cli() {
  $PY -c "from benchmarks.images import build_image_set as b; b('$WORK/photos', $E2E)" || return 1
  local rc=0
  if [ "$DEVICE" = cuda ]; then
    $PY -m runtime.infer --engine "$WORK/best.pt" --precision fp16 --cuda-graph --batch-size $CLI_BATCH "$WORK/photos" > /dev/null || rc=1
    [ -f "$WORK/model_fp16.onnx" ] && for prov in cuda tensorrt; do
      $PY -m runtime.infer --engine "$WORK/model_fp16.onnx" --provider $prov --batch-size $CLI_BATCH "$WORK/photos" > /dev/null || rc=1
    done
    [ -f "$WORK/model.plan" ] && { $PY -m runtime.infer --engine "$WORK/model.plan" --batch-size $CLI_BATCH "$WORK/photos" > /dev/null || rc=1; }
  else
    $PY -m runtime.infer --engine "$WORK/best.pt" --batch-size $CLI_BATCH "$WORK/photos" > /dev/null || rc=1
  fi
  return $rc
}
step infer_cli "$(left 120)" bash -c "$(declare -f infer_cli); PY='$PY' WORK='$WORK' E2E=$E2E DEVICE=$DEVICE CLI_BATCH=$CLI_BATCH infer_cli"

# 8d int8 (issue 15): the INT8 Q/DQ ONNX (export.int8 calibrated on 32 generated photos: speed only,
# random weights), its strongly typed TensorRT plan (export.tensorrt's precision check expects INT8)
# and its latency rows, printed into run.log (no extra file: $OUT keeps its 8). Never run on a GPU yet.
# Needs nncf on the device: carry its wheels in .whl/ (pip download -d .whl nncf==3.4.0 with its
# dependencies for the device's Python); without it int8_export fails and the rest goes on.
if [ -f "$WORK/model.onnx" ] && $PY -m benchmarks.images "$WORK/calib" --count 32 > /dev/null 2>&1 \
   && step int8_export "$(left 180)" $PY -m export.int8 --onnx "$WORK/model.onnx" --calib-images "$WORK/calib" \
        --num 32 --output "$WORK/model_int8.onnx"; then
  if $PY -c "import tensorrt" 2>/dev/null; then
    step int8_tensorrt "$(left 150)" $PY -m export.tensorrt --onnx "$WORK/model_int8.onnx" --output "$WORK/model_int8.plan" \
         --min-batch 1 --opt-batch 32 --max-batch 128 \
      && step int8_latency "$(left 90)" $PY -m benchmarks.latency --engine "$WORK/best.pt" \
           --engine "$WORK/model_int8.plan" "${LAT_ARGS[@]}" --formats TensorRT
  else
    echo "=== int8_tensorrt: tensorrt not installed: INT8 plan not built"
    STATUS[int8_tensorrt]="not installed"
  fi
fi

# 8e issue 10: a calibrated model (held-out split, Platt folded into the head, contract thresholds)
# through ONNX FP16 and, where TensorRT exists, a plan: its sidecar must carry the thresholds and
# probres-eval's gate (mAP, CF1 at the thresholds, ECE) must pass against the checkpoint. run.log only.
step calibrated_plan "$(left 240)" $PY -m benchmarks.calibrated_engine --work "$WORK/cal" --device "$DEVICE" \
  --epochs "$([ "$TINY" = 1 ] && echo 1 || echo 3)"

# 9 summary, last
{
  echo "steps:"; for k in "${!STATUS[@]}"; do echo "  $k: ${STATUS[$k]}"; done
  echo "probres-infer (the CLI) end to end:"; grep -a "^probres-infer: .* img/s" "$OUT/run.log" || echo "  (none)"
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
rows = []
for name in ("latency.json", "latency_compile.json", "latency_onnx.json"):
    lat = load(name)
    if lat:
        rows += [r for r in lat["rows"] if name != "latency_compile.json" or "torch.compile" in r["format"]]
if rows:
    print(f"{'format':<44} {'prec':>5} {'batch':>5} {'p50 ms':>8} {'img/s':>9}  note")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['format'][:44]:<44} {r['precision']:>5}   {r['status'][:70]}")
            continue
        for q in r["latency"]:
            note = ""
            if "prob_diff_vs_fp32" in r and q is r["latency"][0]:
                note = f"max|p16-p32| {r['prob_diff_vs_fp32']['max']:.1e}"
            print(f"{r['format'][:44]:<44} {r['precision']:>5} {q['batch']:>5} {q['p50_ms']:>8.2f} {q['images_per_s']:>9.1f}  {note}")
        if "e2e_images_per_s" in r:
            print(f"{'  end-to-end (probres-infer loop)':<44} {'':>5} {max(q['batch'] for q in r['latency']):>5} {'':>8} "
                  f"{r['e2e_images_per_s']:>9.1f}  {r.get('e2e_over_engine', float('nan')):.3f}x engine-only")
        if r.get("command"):
            print(f"  {r['command']}")
    print("GPU targets (ResNet-101 @448, one H100/H200): best shipped backend >= 4000 images/s at batch 128; batch-1 "
          "latency <= 2 ms; probres-infer end to end >= 0.9x the same backend's engine-only rate at batch 128")
ts = load("train_step.json")
if ts:
    print("train step:", {k: ts[k] for k in ts if k in ("arch", "image_size", "batch_size", "device", "amp", "synthetic", "loader", "loader_only", "loader_only_vs_loader", "ablations")})
    if "worker_cpu" in ts:
        print("train loader worker CPU ratios:", ts["worker_cpu"]["ratios"])
    print("train targets (ResNet-101 @448, bf16): loader >= 800 images/s, data wait < 10%, loader_only >= 1.3x loader")
pre = load("preprocess.json")
if pre:
    print("preprocess:", ", ".join(f"{r['pipeline']}@{r['threads']}t {r['ms_per_image']:.2f} ms" for r in pre["results"]))
    print("ratios:", pre["ratios"])
EOF
} > "$OUT/summary.txt" 2>&1
rm -rf "$WORK"
cat "$OUT/summary.txt"
