"""Run the tritonserver binary bundled in the nvidia-pytriton wheel on a model repository, without a container.

    .venv-serve/bin/python -m export.triton_local --repo model_repository/ --load probres_preprocess \
        [--host 127.0.0.1] [--http-port 8000]

For trying an export.triton repository on this machine: the wheel carries Triton's core and its
Python backend only (no ONNX Runtime or TensorRT backend), so here it serves the Python-backend
preprocessing model; the full ensemble needs NVIDIA's Triton container. The Python backend's
stub is the wheel's build for this Python (it links libpython3.X.so from the loader path:
Debian's /usr/bin/python3.11 works as is, a pyenv build needs its lib/ on LD_LIBRARY_PATH, which
is added here). The stub runs with this environment's packages (numpy, OpenCV).
Listens on 127.0.0.1 unless --host says otherwise. Exit status: tritonserver's. Ctrl-C,
SIGTERM and SIGHUP stop it the same way: tritonserver (in a process group of its own, with its
stubs) is asked to stop, killed after STOP_TIMEOUT_S, and the temp directory is removed; exit
130 / 143 / 129.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime.serve import add_python_libdir

STOP_TIMEOUT_S = 20     # tritonserver's own --exit-timeout-secs is 5


class Stop(Exception):
    """A termination signal arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop(signum)


def stop_server(proc: subprocess.Popen) -> None:
    """Ask tritonserver to stop (SIGTERM), kill it after STOP_TIMEOUT_S, then kill what is left of its
    process group (the Python-backend stubs)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tritonserver_dist() -> tuple[Path, Path, Path]:
    """(dist dir, stub for this Python, bundled libs dir) from the installed nvidia-pytriton wheel."""
    import pytriton

    root = Path(pytriton.__file__).resolve().parent
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    return root / "tritonserver", stub, root.parent / "nvidia_pytriton.libs"


def server_command(repo: Path, workdir: Path, load: list[str], host: str, http_port: int, grpc_port: int,
                   metrics_port: int) -> tuple[list[str], dict[str, str]]:
    """The tritonserver command line and environment, with backends prepared under `workdir`."""
    dist, stub, libs = tritonserver_dist()
    backends = workdir / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    env = add_python_libdir(dict(os.environ))
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}"
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"   # the stub's python environment
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
           "--model-control-mode=explicit", *[f"--load-model={m}" for m in load],
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
           "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0"]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.triton_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="a model repository (python -m export.triton)")
    ap.add_argument("--load", action="append", default=None, help="model to load (repeatable; default probres_preprocess)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    args = ap.parse_args(argv)
    if not args.repo.is_dir():
        print(f"error: --repo {args.repo}: no such directory", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="probres-triton-") as work:
            cmd, env = server_command(args.repo.resolve(), Path(work), args.load or ["probres_preprocess"],
                                      args.host, args.http_port, args.grpc_port, args.metrics_port)
            for sig in (signal.SIGTERM, signal.SIGHUP):     # as Ctrl-C: stop the server, remove the temp dir
                signal.signal(sig, _raise_stop)
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)   # its own group: its stubs with it
            try:
                return proc.wait()
            except (KeyboardInterrupt, Stop) as e:
                signum = e.signum if isinstance(e, Stop) else signal.SIGINT
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # a second one must not cut the cleanup
                    signal.signal(sig, signal.SIG_IGN)
                print(f"python -m export.triton_local: {signal.Signals(signum).name}: stopping tritonserver",
                      file=sys.stderr)
                stop_server(proc)
                return 128 + signum
            finally:
                stop_server(proc)
    except (ImportError, FileNotFoundError) as e:
        print(f"error: {e}; run this with .venv-serve/bin/python (make serve-env)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
