"""probres-serve under load: p50/p99 latency and images/s at 1, 8, 32 clients, image bytes in vs tensors in.

    .venv-serve/bin/python -m benchmarks.serve --engine model.onnx --images val2014/ [--requests 20] \
        [--clients 1,8,32] [--instances 1] [--max-batch 16] [--json serve.json]
    .venv-serve/bin/python -m benchmarks.serve load --url 127.0.0.1:8001 --jobs jobs.json --clients 32 --out r.jsonl
    .venv/bin/python -m benchmarks.serve toy-model toy448.onnx [--size 448]     # needs the onnx package

The first form starts probres-serve (the shipped server, with the flags given), waits until it is
ready, and drives it through tritonclient's gRPC client from C concurrent client threads, each
sending its requests one after another (one image per request):
  bytes    the encoded file to model "probres" (decoded + preprocessed by the server)
  tensors  runtime.preprocess on the client, the float tensor to "probres_tensor"; the client's
           preprocessing is inside the measured latency, so both columns are end to end.
Figures are measured, not asserted (benchmarks/RESULTS.md). The `load` form sends a given list
of files and writes one JSON line per request (what tests/test_serve.py checks). `toy-model`
writes an ONNX graph with the COCO contract that costs almost nothing to run (per-channel mean ->
linear -> sigmoid), so a run on it measures the server itself: transport, decoding and
preprocessing, batching; a real engine adds its own batch time (benchmarks.latency).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

@dataclass
class Record:
    """One request's fate: answered (probs or an item error) or a transport error."""

    index: int
    client: int
    model: str
    latency_s: float
    answered_id: str | None = None    # the id in the response (the request's own when answered)
    probs: list[float] | None = None
    labels: list[dict] | None = None
    item_error: str | None = None      # the server's `error` output for the image
    provenance: dict | None = None     # the server's `provenance` output: the model and rule that answered
    error: str | None = None           # no answer: the transport/server error


def _client(url: str):
    """A gRPC client (thread-safe; each client thread makes its own connection anyway)."""
    import tritonclient.grpc as grpcclient
    return grpcclient.InferenceServerClient(url=url, verbose=False)


def send(client, model: str, payload, request_id: str, timeout_s: float) -> Record:
    """One request: payload is encoded bytes (model probres) or a (3, S, S) tensor (probres_tensor)."""
    import tritonclient.grpc as grpcclient

    if isinstance(payload, np.ndarray):
        x = payload[None]
        inp = grpcclient.InferInput("images", list(x.shape), "FP16" if x.dtype == np.float16 else "FP32")
    else:
        x = np.array([[payload]], dtype=np.object_)
        inp = grpcclient.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(x)
    r = client.infer(model, [inp], request_id=request_id, client_timeout=timeout_s)
    if r.as_numpy("probs") is None:      # the exported ensemble's preprocessing model: a tensor out
        return Record(int(request_id), -1, model, 0.0, answered_id=r.get_response().id)
    err = r.as_numpy("error")[0, 0].decode()
    prov = r.as_numpy("provenance")                # None from a server without it (an older probres-serve)
    return Record(int(request_id), -1, model, 0.0, answered_id=r.get_response().id,
                  probs=[float(p) for p in r.as_numpy("probs")[0]],
                  labels=json.loads(r.as_numpy("labels")[0, 0]), item_error=err or None,
                  provenance=None if prov is None else json.loads(prov[0, 0]))


def run_load(url: str, jobs: list[tuple[str, object]], clients: int, timeout_s: float = 30.0,
             prepare=None) -> list[Record]:
    """Send jobs [(model, payload)] from `clients` threads (client k takes jobs k, k+clients, ...).

    prepare(payload) -> payload runs inside the timed region (client-side preprocessing).
    Every job gets exactly one Record, in job order; a request that fails or times out records
    the error and the client goes on with its next job.
    """
    records: list[Record | None] = [None] * len(jobs)

    def work(k: int) -> None:
        client = _client(url)
        try:
            for i in range(k, len(jobs), clients):
                model, payload = jobs[i]
                t0 = time.perf_counter()
                try:
                    rec = send(client, model, prepare(payload) if prepare else payload, str(i), timeout_s)
                except Exception as e:  # InferenceServerException, connection refused, deadline exceeded
                    rec = Record(i, k, model, 0.0, error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}")
                rec.latency_s, rec.client = time.perf_counter() - t0, k
                records[i] = rec
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(min(clients, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in records if r is not None]


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
               models: tuple[str, ...] = ("probres", "probres_tensor")) -> None:
    """Block until the server and `models` report ready (RuntimeError on timeout or when `proc` exited)."""
    client = _client(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before becoming ready")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            except Exception:
                pass
            time.sleep(0.3)
    finally:
        client.close()
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


def start_server(engine: str, ports: tuple[int, int, int], extra: list[str], repo: bool = False) -> subprocess.Popen:
    """probres-serve (or, repo=True, export.triton_local on the model repository `engine`) in its
    own process group, so stop_server ends tritonserver and its stubs too."""
    head = ["-m", "export.triton_local", "--repo"] if repo else ["-m", "runtime.serve", "--engine"]
    cmd = [sys.executable, *head, engine, "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *extra]
    log = tempfile.TemporaryFile()         # the server's log (a pipe nobody reads would fill and block it)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def summarize(records: list[Record], wall_s: float) -> dict:
    lat = np.array([r.latency_s for r in records if r.error is None]) * 1e3
    return {"requests": len(records), "failed": sum(r.error is not None for r in records),
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "images_per_s": len(lat) / wall_s if wall_s > 0 else None}


def benchmark(url: str, files: list[Path], spec, clients_list: list[int], requests: int, dtype,
              modes: dict[str, str]) -> list[dict]:
    """Rows for each client count x mode; modes maps a mode name to the model it sends to."""
    from runtime.preprocess import preprocess_one

    rows = []
    data = [f.read_bytes() for f in files]
    for clients in clients_list:
        n = clients * requests
        for mode, model in modes.items():
            jobs = [(model, data[i % len(data)]) for i in range(n)]
            prep = None if mode != "tensors" else (lambda b: preprocess_one(b, spec).astype(dtype, copy=False))
            run_load(url, jobs[:clients], clients, prepare=prep)            # warm-up: connections, first batch
            t0 = time.perf_counter()
            recs = run_load(url, jobs, clients, prepare=prep)
            row = {"clients": clients, "mode": mode, **summarize(recs, time.perf_counter() - t0)}
            rows.append(row)
            if row["failed"] == len(recs):
                raise RuntimeError(f"every request failed, e.g. {recs[0].error}")
            print(f"{clients:>3} clients  {mode:<8} p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
                  f"{row['images_per_s']:7.1f} img/s  ({row['failed']} failed)", file=sys.stderr, flush=True)
    return rows


def toy_model(path: Path, size: int = 448, seed: int = 0) -> None:
    """probs (N, 80) = sigmoid(channel means (N, 3) @ W + b), carrying the COCO contract at `size`."""
    from onnx import TensorProto, helper

    from runtime.contract import ModelContract
    from runtime.fileio import atomic_write_bytes
    from runtime.onnx_meta import KEY_CONTRACT

    contract = ModelContract.coco(size)
    c = contract.labels.num_classes
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(3, c)).astype(np.float32), rng.normal(scale=0.3, size=c).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["means"]), helper.make_node("Gemm", ["means", "w", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["probs"])], "toy",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", c])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key=KEY_CONTRACT, value=contract.to_json())
    atomic_write_bytes(path, model.SerializeToString())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    if argv[:1] == ["toy-model"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.serve toy-model")
        ap.add_argument("out", type=Path)
        ap.add_argument("--size", type=int, default=448)
        a = ap.parse_args(argv[1:])
        toy_model(a.out, a.size)
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help="the model probres-serve serves")
    ap.add_argument("--repo", help="instead: an export.triton repository; measures its Python-backend preprocessing "
                                   "model on the bundled tritonserver (export.triton_local)")
    ap.add_argument("--images", required=True, type=Path, help="a directory of images (the first 64 are used)")
    ap.add_argument("--requests", type=int, default=20, help="requests per client (default 20)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--ports", default="18000,18001,18002", help="http,grpc,metrics ports of the server started")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args, serve_flags = ap.parse_known_args(argv)   # the rest go to probres-serve (--instances, --max-batch...)
    from runtime.backends import open_backend
    from runtime.pipeline import iter_image_paths

    files = [Path(p) for p, _ in zip(iter_image_paths([str(args.images)]), range(64))]
    if not files:
        print(f"error: --images {args.images}: no images", file=sys.stderr)
        return 2
    if bool(args.engine) == bool(args.repo):
        print("error: give --engine MODEL or --repo DIR", file=sys.stderr)
        return 2
    if args.repo:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        from runtime.contract import ModelContract
        cfg = text_format.Parse((Path(args.repo) / "probres_preprocess" / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
        instances = cfg.instance_group[0].count
        spec = ModelContract.from_json(cfg.parameters["probres.contract"].string_value).preprocess
        dtype, desc = np.float32, f"python-backend preprocessing x{instances} {args.repo}"
        modes = {"python-backend": "probres_preprocess"}
    else:
        with open_backend(args.engine, device="cpu") as b:
            spec, dtype, desc = b.contract.preprocess, b.input_dtype, b.describe()
        modes = {"bytes": "probres", "tensors": "probres_tensor"}
    ports = tuple(int(p) for p in args.ports.split(","))
    proc = start_server(args.repo or args.engine, ports, serve_flags, repo=bool(args.repo))
    try:
        wait_ready(f"127.0.0.1:{ports[1]}", 180, proc, tuple(modes.values()))
        rows = benchmark(f"127.0.0.1:{ports[1]}", files, spec, [int(c) for c in args.clients.split(",")],
                         args.requests, dtype, modes)
    finally:
        stop_server(proc)
    result = {"engine": desc, "serve_flags": serve_flags, "cpu_count": os.cpu_count(), "rows": rows}
    if args.json:
        from runtime.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def load_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve load")
    ap.add_argument("--url", required=True, help="host:port of Triton's gRPC endpoint")
    ap.add_argument("--jobs", required=True, type=Path, help='JSON list of {"model": ..., "file": ...}')
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    ap.add_argument("--out", required=True, type=Path, help="one JSON line per request")
    args = ap.parse_args(argv)
    jobs = [(j["model"], Path(j["file"]).read_bytes()) for j in json.loads(args.jobs.read_text())]
    recs = run_load(args.url, jobs, args.clients, args.timeout)
    from runtime.fileio import atomic_write_text
    atomic_write_text(args.out, "".join(json.dumps(asdict(r)) + "\n" for r in recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
