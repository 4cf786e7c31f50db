"""Engine latency, throughput and end to end of the shipped backends: every row is a probres-infer command line.

    python -m benchmarks.latency --engine best.pt [--engine model.onnx --engine model_fp16.onnx
        --engine model.plan] [--batch-sizes 1,8,32] [--iters N] [--device auto|cpu|cuda] [--threads T]
        [--json OUT] [--plot OUT.png] [--coco-root DIR [--coco-limit N]] [--e2e-count N] [--e2e-rounds R] [--formats A,B]

Rows, one per backend + options the given files allow (the others listed "unavailable: why"),
each opened with runtime.backends.open_backend exactly as probres-infer opens it (the row's
"command" is that probres-infer line):
  .pt    pytorch: FP32 (true FP32: TF32 off); on CUDA also --precision fp16 (channels_last),
         --precision fp16 --cuda-graph, --precision fp16 --compile (Inductor, minutes to compile)
  .onnx  onnxruntime --provider cpu; on CUDA also --provider cuda and --provider tensorrt
         (IO binding), at the graph's precision and input dtype (FP16 input for FP16 exports)
         and openvino (--backend openvino, its CPU plugin) where installed
  .plan  tensorrt
Engine only: the photo set (benchmarks.images, tiled) preprocessed once into the backend's own
buffers (allocate_inputs: its input dtype, pinned on a GPU); latency = one infer() call of a
batch on the host clock (host->device->host included, as probres-infer pays it), p50/p90/p99;
images/s = the steady state of submit(k+1) before wait(k) over two buffers, the overlap the
pipeline uses. End to end: runtime.Classifier.predict_iter, probres-infer's own loop (decode +
preprocess into the backend's buffers, submit/wait), over --e2e-count photo files re-read from
disk, at the largest batch size, timed after one warm-up pass over the same batch shapes; its
ratio to engine only comes from --e2e-rounds alternating pairs (engine pass, end-to-end pass),
median over median, so that load from other processes falls on both alike.
Decode workers and CPU inference share --threads, as in probres-infer. FP16 rows also report
their max/mean |p - p_fp32| against the FP32 row of the same family on the photo set.
--coco-root adds mAP on the first --coco-limit val2014 images (runtime.coco, runtime.metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.images import build_image_set, list_images
from benchmarks.latency_report import format_table, plot, row_line
from benchmarks.preprocess import machine_info
from runtime.api import Classifier, default_threads
from runtime.backends import OPTION_FLAGS, BackendError, open_backend
from runtime.fileio import atomic_write_text
from runtime.preprocess import preprocess


# ------------------------------------------------------------------------------------------- rows

def onnx_precision(path: str) -> str:
    try:
        from runtime.onnx_meta import metadata_props
        return metadata_props(path).get("probres.precision", "fp32")
    except Exception:  # noqa: BLE001 - a bad file shows up as the row's error instead
        return "fp32"


def command_line(path: str, device: str, backend: str | None, options: dict[str, Any], threads: int | None,
                 batch: int | None = None) -> str:
    """The probres-infer invocation that runs this row's backend with these options."""
    parts = ["probres-infer", "--engine", path, "--device", device]
    if backend:
        parts += ["--backend", backend]
    for k, v in options.items():
        parts += [OPTION_FLAGS[k]] if v is True else [OPTION_FLAGS[k], str(v)]
    if threads:
        parts += ["--threads", str(threads)]
    if batch:
        parts += ["--batch-size", str(batch)]
    return " ".join(parts + ["IMAGES..."])


def plan_rows(engines: list[str], device: str) -> list[dict]:
    """Every row to try: format, file, backend options, precision, device (or the reason it cannot run)."""
    import importlib.util
    cuda = device != "cpu" and _torch_cuda()
    dev = "cuda" if cuda else "cpu"
    rows: list[dict] = []
    pts = [e for e in engines if e.endswith(".pt")]
    onnxs = [e for e in engines if e.endswith(".onnx")]
    plans = [e for e in engines if e.endswith((".plan", ".engine"))]
    gpu_why = None if cuda else "the FP16 PyTorch variants are benchmarked on CUDA only (no GPU here)"
    for p in pts:
        rows.append(dict(format="PyTorch eager", path=p, precision="fp32", device=dev, family="pytorch", options={}))
        for fmt, opts in (("PyTorch eager channels_last", {"precision": "fp16"}),
                          ("PyTorch CUDA graph channels_last", {"precision": "fp16", "cuda_graph": True}),
                          ("PyTorch torch.compile channels_last", {"precision": "fp16", "compile": True})):
            rows.append(dict(format=fmt, path=p, precision="fp16", device="cuda", family="pytorch", options=opts,
                             why=gpu_why))
    if not pts:
        rows.append(dict(format="PyTorch eager", path=None, precision="fp32", device=dev, family="pytorch",
                         options={}, why="no .pt checkpoint given (--engine best.pt)"))
    providers = ["cpu"] + (["cuda", "tensorrt"] if device != "cpu" else [])
    for p in onnxs:
        for prov in providers:
            fmt = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "TensorRT"}[prov]
            rows.append(dict(format=f"ONNX Runtime {fmt}", path=p, precision=onnx_precision(p),
                             device="cpu" if prov == "cpu" else "cuda", family="onnx", options={"provider": prov}))
    ov_why = None if importlib.util.find_spec("openvino") is not None else "openvino is not installed (pip install '.[openvino]')"
    for p in onnxs:                                   # probres-infer --backend openvino: its CPU plugin
        rows.append(dict(format="OpenVINO CPU", path=p, precision=onnx_precision(p), device="cpu", family="openvino",
                         backend="openvino", options={}, why=ov_why))
    for prec in ("fp32", "fp16"):
        if not any(onnx_precision(p) == prec for p in onnxs):
            rows.append(dict(format="ONNX Runtime", path=None, precision=prec, device=dev, family="onnx", options={},
                             why=f"no {prec.upper()} .onnx given (python -m export.onnx --checkpoint best.pt --output m.onnx --fp16)"))
    for p in plans:
        rows.append(dict(format="TensorRT", path=p, precision="fp16", device="cuda", family="tensorrt", options={}))
    if not plans:
        why = ("tensorrt is not installed here" if importlib.util.find_spec("tensorrt") is None
               else "no .plan given (python -m export.tensorrt)")
        rows.append(dict(format="TensorRT", path=None, precision="fp16", device="cuda", family="tensorrt",
                         options={}, why=why))
    return rows


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------- timing

def _ms(fn: Any, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def overlapped_rate(backend: Any, a: np.ndarray, b: np.ndarray, iters: int) -> float:
    """Images/s of submit(k+1) before wait(k) over two of the backend's own buffers, iters + 1 batches."""
    t0 = time.perf_counter()
    pending = backend.submit(a)
    for k in range(1, iters + 1):
        nxt = backend.submit(b if k % 2 else a)      # k+1 goes in before k is waited for
        pending.wait()
        pending = nxt
    pending.wait()
    return len(a) * (iters + 1) / (time.perf_counter() - t0)


def time_engine(backend: Any, bufs: list[np.ndarray], n: int, iters: int, warmup: int) -> dict[str, Any]:
    """Batch-n latency of infer() and the overlapped (submit k+1, wait k) rate over two own buffers."""
    a, b = bufs[0][:n], bufs[1][:n]
    for _ in range(warmup):
        backend.infer(a)
        backend.infer(b)
    ms = np.asarray(_ms(lambda: backend.infer(a), iters))
    rate = overlapped_rate(backend, a, b, iters)
    return {"batch": n, "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": float(rate),
            "latency_images_per_s": float(n / np.median(ms) * 1e3), "iters": len(ms)}


def e2e_images_per_s(backend: Any, paths: list[Path], batch: int, threads: int, warm: bool = True) -> float:
    """The library's predict_iter (probres-infer's loop, runtime.pipeline.classify, and its decision) over
    `paths`, after one untimed pass of the same shapes."""
    clf = Classifier(backend, threads)            # wraps the open backend (not closed here: the caller owns it)
    strs = [str(p) for p in paths]
    if warm:
        for _ in clf.predict_iter(strs[:batch] + strs[:len(strs) % batch], batch_size=batch):
            pass                                                # warm-up: every batch shape of the timed run
    t0, n = time.perf_counter(), 0
    for _ in clf.predict_iter(strs, batch_size=batch):
        n += 1
    return n / (time.perf_counter() - t0)


def e2e_vs_engine(backend: Any, bufs: list[np.ndarray], paths: list[Path], batch: int, threads: int,
                  iters: int, rounds: int) -> dict[str, Any]:
    """End to end against engine only at `batch`, in `rounds` alternating pairs (engine pass, e2e pass).

    Taking turns, as benchmarks.preprocess's pipelines do, lets load from other processes hit both
    alike; the ratio is of the two medians, and each round's own ratio is kept beside it.
    """
    a, b = bufs[0][:batch], bufs[1][:batch]
    e2e_images_per_s(backend, paths, batch, threads)             # untimed: every batch shape, then one whole pass
    engine, e2e = [], []
    for _ in range(rounds):
        engine.append(overlapped_rate(backend, a, b, iters))
        e2e.append(e2e_images_per_s(backend, paths, batch, threads, warm=False))
    return {"e2e_images_per_s": float(np.median(e2e)), "e2e_engine_images_per_s": float(np.median(engine)),
            "e2e_over_engine": float(np.median(e2e) / np.median(engine)),
            "e2e_over_engine_rounds": [round(x / y, 4) for x, y in zip(e2e, engine)],
            "e2e_images": len(paths), "e2e_threads": threads, "e2e_rounds": rounds}


def coco_map(backend: Any, root: str, limit: int, batch: int, threads: int) -> float:
    from runtime.coco import load_coco_split
    from runtime.metrics import multilabel_metrics
    split = load_coco_split(root, "val2014", labels=backend.contract.labels)
    n = min(limit, len(split))
    probs = np.full((n, backend.contract.labels.num_classes), np.nan, np.float32)
    for i, p in enumerate(Classifier(backend, threads).predict_iter([str(x) for x in split.image_paths[:n]],
                                                                     batch_size=batch)):
        if p.ok:
            probs[i] = p.probabilities
    ok = ~np.isnan(probs).any(1)
    return float(multilabel_metrics(probs[ok], split.targets[:n][ok])["mAP"])


def _error(e: BaseException) -> str:
    text = str(e).strip()
    return f"error: {e.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}"


@dataclass(frozen=True)
class Schedule:
    """What run_rows measures (the command line's flags, typed): batch sizes, iterations, threads, end to end, mAP."""

    batch_sizes: list[int]
    iters: int
    cpu_batch_sizes: list[int]
    cpu_iters: int
    warmup: int
    threads: int | None = None
    e2e_count: int = 0
    cpu_e2e_count: int = 0
    e2e_rounds: int = 1
    coco_root: str | None = None
    coco_limit: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Schedule":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def run_rows(rows: list[dict], sched: Schedule, photos: list[Path]) -> list[dict]:
    """Measure each planned row (one open backend at a time); a row that fails says why and the others go on."""
    ref_probs: dict[str, tuple[Any, np.ndarray]] = {}     # family -> (contract, FP32 probs)
    results = []
    for r in rows:
        res = {k: r.get(k) for k in ("format", "path", "precision", "device", "family", "options")}
        res["size_mb"] = round(os.path.getsize(r["path"]) / 2**20, 1) if r.get("path") and os.path.isfile(r["path"]) else None
        if r.get("why"):
            res["status"] = f"unavailable: {r['why']}"
            results.append(res)
            continue
        cpu = r["device"] == "cpu"                       # CPU rows may get a lighter schedule on a GPU machine
        batches, iters = (sched.cpu_batch_sizes, sched.cpu_iters) if cpu else (sched.batch_sizes, sched.iters)
        e2e_count = sched.cpu_e2e_count if cpu else sched.e2e_count
        res["command"] = command_line(r["path"], r["device"], r.get("backend"), r["options"], sched.threads, max(batches))
        try:
            backend = open_backend(r["path"], device=r["device"], threads=sched.threads, backend=r.get("backend"),
                                   **r["options"])
        except BackendError as e:
            res["status"] = f"unavailable: {e}"
            results.append(res)
            continue
        except Exception as e:  # noqa: BLE001 - one broken row must not hide the others
            res["status"] = _error(e)
            results.append(res)
            continue
        try:
            res.update(backend=backend.name, input_dtype=np.dtype(backend.input_dtype).name)
            spec = backend.contract.preprocess
            bufs = backend.allocate_inputs(max(batches), 2)   # the backend's own, as the pipeline gets them
            x = preprocess([str(p) for p in photos], spec=spec)                      # (P, 3, S, S) float32
            for buf in bufs:
                buf[...] = np.resize(x, buf.shape)           # tiled photos, rounded to the input dtype
            n_ref = min(len(x), max(batches))
            probs = backend.infer(bufs[0][:n_ref])
            fam = r["family"]
            if r["precision"] == "fp32" and fam not in ref_probs:
                ref_probs[fam] = (backend.contract, probs)
            same = lambda f: f in ref_probs and ref_probs[f][0] == backend.contract  # noqa: E731 - same model?
            if r["precision"] == "fp16" and same(fam):
                n = min(len(probs), len(ref_probs[fam][1]))
                d = np.abs(probs[:n] - ref_probs[fam][1][:n])
                res["prob_diff_vs_fp32"] = {"max": float(d.max()), "mean": float(d.mean())}
            if fam != "pytorch" and r["precision"] == "fp32" and same("pytorch"):
                n = min(len(probs), len(ref_probs["pytorch"][1]))
                res["prob_diff_vs_pytorch_fp32"] = float(np.abs(probs[:n] - ref_probs["pytorch"][1][:n]).max())
            per = [time_engine(backend, bufs, n, iters, sched.warmup) for n in batches]
            res["latency"] = per
            best = max(per, key=lambda q: q["images_per_s"])
            res.update(batch=best["batch"], ms_per_image=best["p50_ms"] / best["batch"], images_per_s=best["images_per_s"])
            if e2e_count > max(batches):
                paths = [photos[i % len(photos)] for i in range(e2e_count)]   # re-read and re-decoded each time
                res.update(e2e_vs_engine(backend, bufs, paths, max(batches), sched.threads or default_threads(),
                                         iters, sched.e2e_rounds))
            if sched.coco_root:
                res["mAP"] = coco_map(backend, sched.coco_root, sched.coco_limit, max(batches),
                                      sched.threads or default_threads())
            res["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            res["status"] = _error(e)
        finally:
            backend.close()
        results.append(res)
        print(row_line(res), file=sys.stderr, flush=True)
    return results


def speed_checkpoint(path: str, arch: str = "resnet101", size: int = 448, photos: list[Path] | None = None,
                     chunk: int = 8) -> None:
    """An untrained checkpoint whose BatchNorm statistics are recalibrated on real photos.

    Speed does not depend on the weights, but FP16 numerics do: with torchvision's initial BN
    statistics (mean 0, var 1) an untrained ResNet-101's activations grow block after block until
    FP16 overflows (inf/NaN probabilities) and FP32 probabilities saturate at 0/1. One pass in
    train mode over the photos (cumulative BN averages) rescales every layer to the data, as
    training would, so FP16-vs-FP32 differences are measured on realistic activations.
    """
    import torch

    from runtime.contract import ModelContract
    from train.checkpoint import Checkpoint, save_checkpoint
    from train.model import build_model

    contract = ModelContract.coco(size)
    torch.manual_seed(0)
    model = build_model(arch, contract.labels.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        paths = photos or build_image_set(tmp, 16)
        x = torch.from_numpy(preprocess([str(p) for p in paths], spec=contract.preprocess))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None                              # cumulative average over the calls below
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    model.eval()
    save_checkpoint(path, Checkpoint(arch=arch, state_dict=model.state_dict(), contract=contract, epoch=0,
                                     config={"arch": arch, "image_size": size,
                                             "note": "untrained, BatchNorm recalibrated on 16 photos: for speed only"}))


# ------------------------------------------------------------------------------------------- output

def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("numpy", "torch", "torchvision", "onnxruntime", "tensorrt", "cv2"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    try:
        import onnxruntime as ort
        v["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            v.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                     cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    except ImportError:
        pass
    return v


def _ints(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or min(vals) < 1:
        raise ValueError
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="append", required=True, metavar="MODEL", help=".pt, .onnx or .plan (repeatable)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per batch size (default max(2, iters/10))")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime / torch (default: all)")
    ap.add_argument("--images", help="photos for the input batch / e2e (default: the COCO-like set)")
    ap.add_argument("--e2e-count", type=int, default=64, help="images for the end-to-end run (<= max batch: skip)")
    ap.add_argument("--e2e-rounds", type=int, default=3, help="alternating engine-only / end-to-end passes (median)")
    ap.add_argument("--cpu-batch-sizes", default=None, help="batch sizes for CPU rows (default: --batch-sizes)")
    ap.add_argument("--cpu-iters", type=int, default=None, help="iterations for CPU rows (default: --iters)")
    ap.add_argument("--cpu-e2e-count", type=int, default=None, help="end-to-end images for CPU rows (default: --e2e-count)")
    ap.add_argument("--coco-root", help="COCO tree: adds mAP on val2014")
    ap.add_argument("--coco-limit", type=int, default=500)
    ap.add_argument("--formats", help="comma-separated substrings: only rows whose format contains one")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    for flag in ("batch_sizes", "cpu_batch_sizes"):
        text = getattr(args, flag) or args.batch_sizes
        try:
            setattr(args, flag, text if isinstance(text, list) else _ints(text))
        except ValueError:
            print(f"--{flag.replace('_', '-')}: expected comma-separated integers >= 1, got {text!r}", file=sys.stderr)
            return 2
    args.cpu_iters = args.cpu_iters or args.iters
    args.cpu_e2e_count = args.e2e_count if args.cpu_e2e_count is None else args.cpu_e2e_count
    for e in args.engine:
        if not os.path.isfile(e):
            print(f"--engine {e}: no such file", file=sys.stderr)
            return 2
        if not e.endswith((".pt", ".onnx", ".plan", ".engine")):
            print(f"--engine {e}: expected a .pt, .onnx or .plan file", file=sys.stderr)
            return 2
    if args.iters < 1 or args.e2e_count < 0 or args.e2e_rounds < 1:
        print("--iters and --e2e-rounds must be >= 1 and --e2e-count >= 0", file=sys.stderr)
        return 2
    if args.device == "cuda" and not _torch_cuda():
        print("--device cuda: no CUDA device visible to torch here", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else max(2, args.iters // 10)
    with tempfile.TemporaryDirectory(prefix="probres_lat_") as tmp:
        photos = list_images(args.images) if args.images else build_image_set(tmp, 16)
        if not photos:
            print(f"--images {args.images}: no images", file=sys.stderr)
            return 2
        planned = plan_rows(args.engine, args.device)
        if args.formats:
            keep = [f.strip() for f in args.formats.split(",") if f.strip()]
            planned = [r for r in planned if any(k in r["format"] for k in keep)]
        rows = run_rows(planned, Schedule.from_args(args), photos)
    res = {"rows": rows, "machine": machine_info(), "versions": versions(), "batch_sizes": args.batch_sizes,
           "iters": args.iters, "warmup": args.warmup, "cpu_batch_sizes": args.cpu_batch_sizes, "cpu_iters": args.cpu_iters,
           "command": "python -m benchmarks.latency " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(format_table(res))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
