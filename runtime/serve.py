"""probres-serve: serve a model on NVIDIA Triton Inference Server through PyTriton (HTTP, gRPC, metrics).

    make serve ENGINE=model.onnx          # builds .venv-serve once, then runs:
    .venv-serve/bin/probres-serve --engine model.onnx [--http-port 8000] [--instances 2]

Two models on Triton's own protocol (KServe v2; /v2/models/probres/ready, Prometheus metrics on
--metrics-port):
  probres         input  image   BYTES (1,)          encoded JPEG/PNG/BMP/WebP/TIFF, decoded here
  probres_tensor  input  images  FP32/FP16 (3, S, S) already preprocessed (runtime.preprocess)
  both output    probs   FP32 (C,)    per-label probabilities, contract.labels order
                 labels  BYTES (1,)   JSON list of the labels passing the thresholds
                 error   BYTES (1,)   "" or one line naming what is wrong with that image
                 provenance BYTES (1,) JSON: the model (file name, sha256) and decision rule that
                                      answered, runtime.provenance.header's fields
Dynamic batching up to --max-batch (at most the engine's own limit) with --max-queue-delay-us;
--instances model instances, each with its own backend (runtime.backends.open_backend).
Readiness: GET /v2/health/ready answers 200 only once both models are loaded and answer (the
models go into Triton's model store before tritonserver starts; docs/serving-readiness.md); the
log line "probres-serve: ready: ..." says the same.
A NaN or infinite value in a probres_tensor item is that item's error. Ctrl-C or SIGTERM stops it
cleanly (exit 130 / 143): PyTriton stops tritonserver (in-flight requests get 5 s), then any process
still descending from this one (a Python-backend stub, a TensorStore) gets SIGTERM, and SIGKILL
after 5 s (runtime/serve_stop.py). Safe by default: listens on 127.0.0.1 only (Triton has no
authentication); an image over --max-request-bytes (64 MiB) or whose header claims more than
runtime.decode.MAX_IMAGE_PIXELS pixels is refused for that item (Triton has already read the
request by then: this tritonserver has no body-size limit of its own). PyTriton (which bundles
the tritonserver binary) pins numpy<2, so it lives in its own environment, .venv-serve (Makefile
`serve-env`); it is imported lazily.
Exit status 2 for usage or model errors (one line, before the server starts), 1 when Triton does
not load the models (after PyTriton's fixed 120 s start-up wait) or tritonserver exits by itself.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import sysconfig

import numpy as np

from runtime.backends import DEVICES, BackendError, open_backend
from runtime.contract import INPUT_NAME, OUTPUT_NAME
from runtime.infer import positive_int, probability
from runtime.serve_model import MAX_REQUEST_BYTES, ServeModel
from runtime.serve_stop import become_subreaper, end_descendants, remove_own_shm

PROG = "probres-serve"
BYTES_MODEL, TENSOR_MODEL = "probres", "probres_tensor"
DEFAULT_MAX_BATCH = 16


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Serve a probres model on Triton Inference Server (PyTriton).")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="model.plan / model.engine, model.onnx or best.pt")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; Triton has no authentication: "
                         "use 0.0.0.0 only behind your own access control)")
    ap.add_argument("--http-port", type=positive_int, default=8000)
    ap.add_argument("--grpc-port", type=positive_int, default=8001)
    ap.add_argument("--metrics-port", type=positive_int, default=8002)
    ap.add_argument("--max-batch", type=positive_int, default=None,
                    help=f"dynamic batching limit (default {DEFAULT_MAX_BATCH}, at most the engine's max batch)")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000,
                    help="how long Triton may hold a request to fill a batch (default 2000 us)")
    ap.add_argument("--instances", type=positive_int, default=1, help="model instances (each its own backend)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads per instance, for decoding and CPU inference (default: cores / instances)")
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--max-request-bytes", type=positive_int, default=MAX_REQUEST_BYTES,
                    help=f"largest encoded image accepted (default {MAX_REQUEST_BYTES} = 64 MiB)")
    ap.add_argument("--threshold", type=probability, default=None,
                    help="one decision threshold for every label (default: the contract's, else 0.5)")
    ap.add_argument("--log-verbose", type=int, default=0, help="Triton's verbose log level (0 = off)")
    return ap


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_python_libdir(env: dict[str, str]) -> dict[str, str]:
    """Put this Python's lib/ on LD_LIBRARY_PATH: Triton's Python-backend stub links libpython3.X.so
    from the loader path, which a pyenv build does not provide by default (Debian's python does)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in parts:
        env["LD_LIBRARY_PATH"] = ":".join([libdir, *parts])
    return env


def check_listen(host: str, http_port: int, grpc_port: int, metrics_port: int,
                 max_queue_delay_us: int = 0) -> str | None:
    """The first problem with where the server would listen (one line), before anything is loaded;
    None when fine. Each port must differ from the others and be free on `host`."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"--host must be an IP address (127.0.0.1, ::1, 0.0.0.0), got {host!r}"
    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    if len(set(ports.values())) != 3:
        return "--http-port, --grpc-port and --metrics-port must differ"
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            return f"{flag} must be in 1..65535, got {port}"
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                return f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e})"
    if max_queue_delay_us < 0:
        return "--max-queue-delay-us must be >= 0"
    return None


def open_instances(engine: str, instances: int = 1, device: str = "auto", threads: int | None = None,
                   max_batch: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                   threshold: float | None = None) -> list[ServeModel]:
    """One ServeModel (its own backend and input buffer) per instance; BackendError on a bad model.
    threads: per instance (default cores / instances); threshold: one for every label (None: the contract's)."""
    threads = threads or max(1, _cores() // instances)
    limit = max_batch
    models: list[ServeModel] = []
    try:
        for _ in range(instances):
            backend = open_backend(engine, device=device, threads=threads)
            max_batch = limit or DEFAULT_MAX_BATCH
            if backend.max_batch:                    # a TensorRT profile's limit
                max_batch = min(max_batch, backend.max_batch)
            models.append(ServeModel(backend, max_batch, threads, max_request_bytes, threshold, source=engine))
    except BaseException:
        for m in models:
            m.close()
        raise
    return models


def split(outputs: dict[str, np.ndarray], items: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One dynamic batch's outputs back into one dict per request (request r had len(items[r]) rows)."""
    ends = np.cumsum([len(x) for x in items])
    return [{k: v[e - len(x):e] for k, v in outputs.items()} for x, e in zip(items, ends)]


def bind_models(triton, models: list[ServeModel], max_queue_delay_us: int) -> None:
    """Bind the bytes-in and tensors-in models, one inference callable per instance."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    m0 = models[0]
    s, c = m0.spec.size, m0.labels.num_classes
    outputs = [Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(c,)),
               Tensor(name="labels", dtype=bytes, shape=(1,)),
               Tensor(name="error", dtype=bytes, shape=(1,)),
               Tensor(name="provenance", dtype=bytes, shape=(1,))]
    config = ModelConfig(max_batch_size=m0.max_batch,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))

    def bytes_fn(model: ServeModel):
        def infer(requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            items = [r["image"].reshape(-1) for r in requests]       # each (n_r,) object: bytes
            names = [f"image {j}" for x in items for j in range(len(x))]   # as the client numbers them
            return split(model.from_bytes(list(np.concatenate(items)), names), items)
        return infer

    def tensor_fn(model: ServeModel):
        def infer(requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            items = [r[INPUT_NAME] for r in requests]                  # each (n_r, 3, S, S)
            names = [f"image {j}" for x in items for j in range(len(x))]
            return split(model.from_tensors(np.concatenate(items), names), items)
        return infer

    triton.bind(model_name=BYTES_MODEL, infer_func=[bytes_fn(m) for m in models],
                inputs=[Tensor(name="image", dtype=bytes, shape=(1,))], outputs=outputs, config=config)
    triton.bind(model_name=TENSOR_MODEL, infer_func=[tensor_fn(m) for m in models],
                inputs=[Tensor(name=INPUT_NAME, dtype=m0.backend.input_dtype.type, shape=(3, s, s))],
                outputs=outputs, config=config)


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: remember which, ignore a second one (it would cut the stop short), and stop
    the way PyTriton expects (its serve() catches KeyboardInterrupt and stops tritonserver)."""
    global _stopped_by
    _stopped_by = signum
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


_stopped_by = 0         # the signal that stopped the server, 0 while none has


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_listen(args.host, args.http_port, args.grpc_port, args.metrics_port, args.max_queue_delay_us)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    try:
        from pytriton.client.exceptions import PyTritonClientTimeoutError
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
    except ImportError as e:
        print(f"{PROG}: error: PyTriton is not installed here ({e}); it needs numpy<2, so it has its own "
              f"environment: run `make serve-env`, then .venv-serve/bin/{PROG}", file=sys.stderr)
        return 2
    try:
        models = open_instances(args.engine, args.instances, args.device, args.threads, args.max_batch,
                                args.max_request_bytes, args.threshold)
    except (BackendError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                  # loading N instances can take minutes (a big plan, --compile)
        print(f"{PROG}: interrupted while loading {args.engine}", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    for name in ("pytriton", "pytriton.proxy"):        # PyTriton's per-request chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                          allow_metrics=True, allow_gpu_metrics=False, exit_on_error=True, exit_timeout_secs=5,
                          strict_readiness=True, log_verbose=args.log_verbose)
    add_python_libdir(os.environ)              # inherited by tritonserver and its stubs
    # Triton starts a model's instances one after another: instance 0's stub must be listening
    # for PyTriton's handshake before instance 1's stub asks (it waits only 1 s); in parallel the
    # second stub loses that race under load (docs/serving-readiness.md).
    os.environ["TRITON_PARALLEL_INSTANCE_LOADING"] = "0"
    global _stopped_by
    _stopped_by = 0
    for sig in (signal.SIGINT, signal.SIGTERM):   # docker stop / systemd: the same clean stop as Ctrl-C
        signal.signal(sig, _interrupt)
    become_subreaper()
    m0 = models[0]
    print(f"{PROG}: {m0.backend.describe()} x{len(models)} on http://{args.host}:{args.http_port} "
          f"grpc {args.host}:{args.grpc_port} metrics :{args.metrics_port}; models {BYTES_MODEL} (image bytes), "
          f"{TENSOR_MODEL} (tensors); max batch {m0.max_batch}", file=sys.stderr, flush=True)
    # The models are written into the model store first and tritonserver starts on it, so its own
    # /v2/health/ready (strict readiness) answers 200 only once both models are loaded.
    store_first = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    try:
        with Triton(config=config, triton_lifecycle_policy=store_first) as triton:
            bind_models(triton, models, args.max_queue_delay_us)
            try:
                triton.run()                   # starts tritonserver, waits (120 s at most) for it and the models
            except (TimeoutError, PyTritonClientTimeoutError):   # a model did not load: tritonserver exited
                print(f"{PROG}: error: Triton did not load the models (its log above says why)", file=sys.stderr)
                return 1
            print(f"{PROG}: ready: models {BYTES_MODEL} and {TENSOR_MODEL} loaded; health check: "
                  f"GET /v2/health/ready", file=sys.stderr, flush=True)
            triton.serve()             # returns after a signal, or when tritonserver exits by itself
    except KeyboardInterrupt:
        pass
    finally:
        left = end_descendants()
        if left:
            print(f"{PROG}: ended {len(left)} process(es) tritonserver's stop left behind: {', '.join(left)}",
                  file=sys.stderr)
        remove_own_shm()
        for m in models:
            m.close()
    if _stopped_by:
        return 128 + _stopped_by
    print(f"{PROG}: error: tritonserver exited (its log above says why)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
