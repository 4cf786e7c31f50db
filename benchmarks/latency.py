"""Engine latency and throughput of every backend available here, Ultralytics-benchmark style.

    python -m benchmarks.latency --engine best.pt [--engine model.onnx --engine model_fp16.onnx
        --engine model.plan] [--batch-sizes 1,8,32] [--iters N] [--device auto|cpu|cuda]
        [--json OUT] [--plot OUT.png] [--coco-root DIR [--coco-limit N]] [--e2e-count N] [--formats A,B]

Rows (one per format the given files allow; the others are listed "unavailable: why"):
  .pt    PyTorch eager FP32 (true FP32: TF32 off); PyTorch eager FP16 channels_last, the same kernels captured in a
         CUDA graph per batch shape, and torch.compile FP16 channels_last (CUDA only: FP16 on a
         2-core CPU is not a deployment target; compiled once with a dynamic batch and Inductor's
         freezing (BatchNorm folded into the convolutions), fed only the timed batch shapes)
  .onnx  ONNX Runtime with each provider this build has (CPU; CUDA, TensorRT EP when device
         allows), at the graph's precision (metadata "probres.precision")
  .plan  TensorRT (runtime.backends.tensorrt; its timing includes the host<->device copies)
Engine-only latency: the same preprocessed batch (the COCO-like photo set, tiled) fed again and
again; CUDA events around the forward on a GPU for PyTorch (input already on the device), ONNX
Runtime CUDA with IO binding (device input/output), host clock elsewhere. p50/p90/p99 per
batch. End to end: the probres-infer loop (runtime.pipeline.iter_batches + infer) over
--e2e-count photos, images/s after one warm-up batch. FP16 rows also report their max/mean
|p - p_fp32| against the FP32 row of the same family on the photo set. --coco-root adds mAP
on the first --coco-limit val2014 images (runtime.coco, runtime.metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.images import build_image_set, list_images
from benchmarks.preprocess import machine_info
from runtime.fileio import atomic_write_bytes, atomic_write_text
from runtime.preprocess import preprocess


class Unavailable(Exception):
    """This row cannot run here; the message says why."""


# ------------------------------------------------------------------------------------------- runners

class TorchRunner:
    """A checkpoint's network (+ sigmoid) in eager or compiled mode, FP32 or FP16 channels_last."""

    def __init__(self, path: str, device: str, fp16: bool, compile_mode: str | None, threads: int | None):
        try:
            import torch
            from train.checkpoint import load_checkpoint
        except ImportError as e:
            raise Unavailable(f"needs the training extra ({e})") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = True           # fixed shapes: let cuDNN pick its kernels
        if not fp16:
            # The FP32 row is the reference the FP16 rows are compared with: true FP32, not the TF32
            # tensor-core mode PyTorch allows for cuDNN convolutions by default (10-bit mantissa).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.torch, self.dev, self.fp16 = torch, torch.device(device), fp16
        ckpt = load_checkpoint(path)
        model = ckpt.build().to(self.dev).eval()
        self.contract = ckpt.contract
        self.fmt = torch.channels_last if fp16 else torch.contiguous_format
        if fp16:
            model = model.half().to(memory_format=torch.channels_last)
        if compile_mode:
            # Freezing: weights become constants, so Inductor folds BatchNorm into the convolutions
            # (inference only). dynamic=True: one compile serves every batch size (CUDA graphs are
            # still recorded per shape); static shapes recompile per batch size, minutes for ResNet-101.
            import torch._inductor.config as inductor_config
            if hasattr(inductor_config, "freezing"):
                inductor_config.freezing = True
            model = torch.compile(model, mode=compile_mode, dynamic=True)
        self.model = model

    def _forward(self, x):
        with self.torch.inference_mode():
            return self.torch.sigmoid(self.model(x).float())    # (N, C) probabilities, float32

    def to_device(self, batch: np.ndarray):
        x = self.torch.from_numpy(batch).to(self.dev, non_blocking=True)
        return (x.half() if self.fp16 else x).contiguous(memory_format=self.fmt)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(self.to_device(batch)).cpu().numpy()

    def time_engine(self, batch: np.ndarray, iters: int, warmup: int) -> list[float]:
        x, torch = self.to_device(batch), self.torch
        for _ in range(warmup):
            self._forward(x)
        if self.dev.type != "cuda":
            return _host_times(lambda: self._forward(x), iters)
        return _cuda_times(torch, lambda: self._forward(x), iters)


class GraphRunner(TorchRunner):
    """Eager FP16 channels_last kernels captured once per batch shape in a CUDA graph, replayed.

    No compiler: the same cuDNN kernels as the eager row, launched by one graph replay instead of
    ~350 Python-side launches, which is what bounds eager batch-1 latency. Static input buffer
    (N, 3, S, S) per shape, one shared memory pool (torch.cuda.graph_pool_handle).
    """

    def __init__(self, path: str, threads: int | None):
        super().__init__(path, "cuda", True, None, threads)
        self.pool = self.torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}            # shape -> (graph, static input, static output)

    def _graph(self, shape: tuple):
        if shape not in self.graphs:
            torch = self.torch
            x = torch.randn(shape, device=self.dev).half().contiguous(memory_format=self.fmt)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                # warm-up: cuDNN picks its kernels outside capture
                for _ in range(3):
                    self._forward(x)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                y = self._forward(x)
            self.graphs[shape] = (g, x, y)
        return self.graphs[shape]

    def _run(self, x):
        g, xs, ys = self._graph(tuple(x.shape))
        xs.copy_(x)
        g.replay()
        return ys

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self.to_device(batch)).cpu().numpy()

    def time_engine(self, batch: np.ndarray, iters: int, warmup: int) -> list[float]:
        g, xs, _ = self._graph(tuple(batch.shape))
        xs.copy_(self.to_device(batch))
        for _ in range(warmup):
            g.replay()
        return _cuda_times(self.torch, g.replay, iters)


class OrtRunner:
    """One ONNX Runtime session pinned to one execution provider."""

    def __init__(self, path: str, provider: str, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise Unavailable("onnxruntime is not installed") from None
        if provider not in ort.get_available_providers():
            raise Unavailable(f"this onnxruntime build has no {provider} (it has {', '.join(ort.get_available_providers())})")
        from runtime.onnx_meta import read_onnx_meta
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.ort, self.provider = ort, provider
        self.sess = ort.InferenceSession(path, sess_options=opts, providers=[provider])
        self.contract = read_onnx_meta(path, session=self.sess).contract
        self.inp, self.out = self.sess.get_inputs()[0].name, self.sess.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.sess.run([self.out], {self.inp: np.ascontiguousarray(batch, np.float32)})[0], np.float32)

    def time_engine(self, batch: np.ndarray, iters: int, warmup: int) -> list[float]:
        x = np.ascontiguousarray(batch, np.float32)
        if self.provider == "CPUExecutionProvider":
            run = lambda: self.sess.run([self.out], {self.inp: x})  # noqa: E731
        else:                                           # device-resident input and output
            io = self.sess.io_binding()
            io.bind_ortvalue_input(self.inp, self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            io.bind_output(self.out, "cuda", 0)
            run = lambda: self.sess.run_with_iobinding(io)  # noqa: E731
        for _ in range(warmup):
            run()
        return _host_times(run, iters)


class BackendRunner:
    """Any runtime backend through runtime.backends.open_backend (the TensorRT plan)."""

    def __init__(self, path: str, device: str):
        from runtime.backends import BackendError, open_backend
        try:
            self.b = open_backend(path, device=device)
        except BackendError as e:
            raise Unavailable(str(e)) from None
        self.contract = self.b.contract

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.b.infer(batch)

    def time_engine(self, batch: np.ndarray, iters: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            self.b.infer(batch)
        return _host_times(lambda: self.b.infer(batch), iters)


def _cuda_times(torch: Any, fn: Callable[[], Any], iters: int) -> list[float]:
    """Milliseconds of device time per call of fn, from CUDA events recorded around it."""
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _host_times(fn: Callable[[], Any], iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# ------------------------------------------------------------------------------------------- rows

def onnx_precision(path: str) -> str:
    try:
        from runtime.onnx_meta import metadata_props
        return metadata_props(path).get("probres.precision", "fp32")
    except Exception:  # noqa: BLE001 - a bad file shows up as the row's error instead
        return "fp32"


def plan_rows(engines: list[str], device: str, compile_mode: str, threads: int | None) -> list[dict]:
    """Every row to try: format, file, precision, device, and a factory (or the reason it cannot run)."""
    import importlib.util
    cuda = device != "cpu" and _torch_cuda()
    rows: list[dict] = []
    pts = [e for e in engines if e.endswith(".pt")]
    onnxs = [e for e in engines if e.endswith(".onnx")]
    plans = [e for e in engines if e.endswith((".plan", ".engine"))]
    dev = "cuda" if cuda else "cpu"
    for p in pts:
        rows.append(dict(format="PyTorch eager", path=p, precision="fp32", device=dev, family="pytorch",
                         make=lambda p=p: TorchRunner(p, dev, False, None, threads)))
        why = None if cuda else "FP16 PyTorch is benchmarked on CUDA only (no GPU here)"
        for fmt, mode in (("PyTorch eager channels_last", None), (f"torch.compile[{compile_mode}] channels_last", compile_mode)):
            rows.append(dict(format=fmt, path=p, precision="fp16", device="cuda", family="pytorch", why=why,
                             fixed_shapes=mode is not None,
                             make=lambda p=p, mode=mode: TorchRunner(p, "cuda", True, mode, threads)))
        rows.append(dict(format="PyTorch CUDA graph channels_last", path=p, precision="fp16", device="cuda",
                         family="pytorch", why=why, make=lambda p=p: GraphRunner(p, threads)))
    if not pts:
        rows.append(dict(format="PyTorch eager", path=None, precision="fp32", device=dev, family="pytorch",
                         why="no .pt checkpoint given (--engine best.pt)"))
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider", "TensorrtExecutionProvider"] if device != "cpu" else [])
    for p in onnxs:
        prec = onnx_precision(p)
        for prov in providers:
            rows.append(dict(format=f"ONNX Runtime {prov.replace('ExecutionProvider', '')}", path=p, precision=prec,
                             device="cpu" if prov.startswith("CPU") else "cuda", family="onnx",
                             make=lambda p=p, prov=prov: OrtRunner(p, prov, threads)))
    for prec in ("fp32", "fp16"):
        if not any(onnx_precision(p) == prec for p in onnxs):
            rows.append(dict(format="ONNX Runtime", path=None, precision=prec, device=dev, family="onnx",
                             why=f"no {prec.upper()} .onnx given (python -m export.onnx --checkpoint best.pt --output m.onnx --fp16)"))
    for p in plans:
        rows.append(dict(format="TensorRT", path=p, precision="fp16", device="cuda", family="tensorrt",
                         make=lambda p=p: BackendRunner(p, "cuda")))
    if not plans:
        why = ("tensorrt is not installed here" if importlib.util.find_spec("tensorrt") is None
               else "no .plan given (python -m export.tensorrt)")
        rows.append(dict(format="TensorRT", path=None, precision="fp16", device="cuda", family="tensorrt", why=why))
    return rows


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _tile(x: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(x, (n,) + x.shape[1:]))


def coco_map(runner: Any, root: str, limit: int, batch: int) -> float:
    from runtime.coco import load_coco_split
    from runtime.metrics import multilabel_metrics
    from runtime.pipeline import iter_batches
    split = load_coco_split(root, "val2014", labels=runner.contract.labels)
    n = min(limit, len(split))
    probs = np.full((n, runner.contract.labels.num_classes), np.nan, np.float32)
    for b in iter_batches([str(p) for p in split.image_paths[:n]], runner.contract.preprocess, batch, os.cpu_count() or 1):
        rows = [b.start + i for i in b.ok]
        if rows:
            probs[rows] = runner.infer(b.data)
    ok = ~np.isnan(probs).any(1)
    return float(multilabel_metrics(probs[ok], split.targets[:n][ok])["mAP"])


def e2e_images_per_s(runner: Any, paths: list[Path], batch: int) -> float:
    """The probres-infer loop: streaming decode+preprocess (thread pool) feeding infer."""
    from runtime.pipeline import iter_batches
    it = iter_batches([str(p) for p in paths], runner.contract.preprocess, batch, os.cpu_count() or 1)
    first = next(it)                                     # warm-up batch, not timed
    runner.infer(first.data)
    t0, n = time.perf_counter(), 0
    for b in it:
        runner.infer(b.data)
        n += len(b.paths)
    dt = time.perf_counter() - t0
    return n / dt if n else float("nan")


def run_rows(rows: list[dict], args: argparse.Namespace, photos: list[Path]) -> list[dict]:
    ref_probs: dict[str, tuple[Any, np.ndarray]] = {}     # family -> (contract, FP32 probs)
    results = []
    for r in rows:
        res = {k: r.get(k) for k in ("format", "path", "precision", "device", "family")}
        res["size_mb"] = round(os.path.getsize(r["path"]) / 2**20, 1) if r.get("path") and os.path.isfile(r["path"]) else None
        if r.get("why"):
            res["status"] = f"unavailable: {r['why']}"
            results.append(res)
            continue
        try:
            runner = r["make"]()
        except Unavailable as e:
            res["status"] = f"unavailable: {e}"
            results.append(res)
            continue
        except Exception as e:  # noqa: BLE001 - one broken row must not hide the others
            res["status"] = f"error: {e.__class__.__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            results.append(res)
            continue
        try:
            x = preprocess([str(p) for p in photos], spec=runner.contract.preprocess)     # (P, 3, S, S)
            cpu = r["device"] == "cpu"                   # CPU rows may get a lighter schedule on a GPU machine
            batches, iters = (args.cpu_batch_sizes, args.cpu_iters) if cpu else (args.batch_sizes, args.iters)
            e2e_count = args.cpu_e2e_count if cpu else args.e2e_count
            if r.get("fixed_shapes"):                    # compiled: only the timed batch shapes, no new graphs
                x = x[:min(len(x), max(batches))]
                probs = runner.infer(_tile(x, max(batches)))[:len(x)]
                if e2e_count % max(batches):
                    e2e_count = 0
            else:
                probs = runner.infer(x)
            fam = r["family"]
            if r["precision"] == "fp32" and fam not in ref_probs:
                ref_probs[fam] = (runner.contract, probs)
            same = lambda f: f in ref_probs and ref_probs[f][0] == runner.contract  # noqa: E731 - same model?
            if r["precision"] == "fp16" and same(fam):
                n = min(len(probs), len(ref_probs[fam][1]))
                d = np.abs(probs[:n] - ref_probs[fam][1][:n])
                res["prob_diff_vs_fp32"] = {"max": float(d.max()), "mean": float(d.mean())}
            if fam != "pytorch" and r["precision"] == "fp32" and same("pytorch"):
                n = min(len(probs), len(ref_probs["pytorch"][1]))
                res["prob_diff_vs_pytorch_fp32"] = float(np.abs(probs[:n] - ref_probs["pytorch"][1][:n]).max())
            per = []
            for n in batches:
                ms = np.asarray(runner.time_engine(_tile(x, n), iters, args.warmup))
                per.append({"batch": n, "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": float(n / np.median(ms) * 1e3),
                            "iters": len(ms)})
            res["latency"] = per
            best = max(per, key=lambda q: q["images_per_s"])
            res.update(batch=best["batch"], ms_per_image=best["p50_ms"] / best["batch"], images_per_s=best["images_per_s"])
            if e2e_count > max(batches):
                paths = [photos[i % len(photos)] for i in range(e2e_count)]   # re-read and re-decoded each time
                res["e2e_images_per_s"] = e2e_images_per_s(runner, paths, max(batches))
                res["e2e_images"] = e2e_count
            if args.coco_root:
                res["mAP"] = coco_map(runner, args.coco_root, args.coco_limit, max(batches))
            res["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            res["status"] = f"error: {e.__class__.__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        finally:
            del runner
        results.append(res)
        print(_row_line(res), file=sys.stderr, flush=True)
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


def _row_line(r: dict) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return (f"{r['format'][:44]:<44} {r['status'][:60]:<60} {f(r.get('size_mb'), '8.1f'):>8} {f(r.get('mAP'), '6.4f'):>6} "
            f"{f(r.get('ms_per_image'), '9.3f'):>9} {f(r.get('images_per_s'), '9.1f'):>9} {f(r.get('batch'), 'd'):>5} "
            f"{r['precision']:>5} {r['device']:>5}")


def format_table(res: dict) -> str:
    head = (f"{'format':<44} {'status':<60} {'size MB':>8} {'mAP':>6} {'ms/image':>9} {'images/s':>9} {'batch':>5} "
            f"{'prec':>5} {'dev':>5}")
    lines = [head] + [_row_line(r) for r in res["rows"]]
    lines.append("")
    lines.append(f"{'format':<44} {'prec':>5} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'images/s':>9}")
    for r in res["rows"]:
        for q in r.get("latency", []):
            lines.append(f"{r['format'][:44]:<44} {r['precision']:>5} {q['batch']:>5} {q['p50_ms']:>9.2f} {q['p90_ms']:>9.2f} "
                         f"{q['p99_ms']:>9.2f} {q['images_per_s']:>9.1f}")
    for r in res["rows"]:
        extra = []
        if "prob_diff_vs_fp32" in r:
            extra.append(f"max|p-p_fp32| {r['prob_diff_vs_fp32']['max']:.2e} mean {r['prob_diff_vs_fp32']['mean']:.2e}")
        if "prob_diff_vs_pytorch_fp32" in r:
            extra.append(f"max|p-p_pytorch| {r['prob_diff_vs_pytorch_fp32']:.2e}")
        if "e2e_images_per_s" in r:
            extra.append(f"end-to-end {r['e2e_images_per_s']:.1f} images/s")
        if extra:
            lines.append(f"{r['format']} {r['precision']}: " + "; ".join(extra))
    v = res["versions"]
    lines.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k] is not None and k != "onnxruntime_providers"))
    return "\n".join(lines)


def plot(res: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in res["rows"]:
        lat = r.get("latency")
        if not lat:
            continue
        bs = [q["batch"] for q in lat]
        label = f"{r['format']} {r['precision']} ({r['device']})"
        a.plot(bs, [q["p50_ms"] for q in lat], "o-", label=label)
        b.plot(bs, [q["images_per_s"] for q in lat], "o-", label=label)
    for ax, yl in ((a, "p50 latency per batch (ms)"), (b, "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"probres latency vs batch ({res['versions'].get('gpu') or res['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
        fig.savefig(tmp.name, dpi=110)
        atomic_write_bytes(out, Path(tmp.name).read_bytes())
    plt.close(fig)


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
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (CUDA graphs by default)")
    ap.add_argument("--images", help="photos for the input batch / e2e (default: the COCO-like set)")
    ap.add_argument("--e2e-count", type=int, default=64, help="images for the end-to-end run (<= max batch: skip)")
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
    if args.iters < 1 or args.e2e_count < 0:
        print("--iters must be >= 1 and --e2e-count >= 0", file=sys.stderr)
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
        planned = plan_rows(args.engine, args.device, args.compile_mode, args.threads)
        if args.formats:
            keep = [f.strip() for f in args.formats.split(",") if f.strip()]
            planned = [r for r in planned if any(k in r["format"] for k in keep)]
        rows = run_rows(planned, args, photos)
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
