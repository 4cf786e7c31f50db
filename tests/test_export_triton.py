"""export.triton: the model repository's configs parse with tritonclient's model-config protobuf, and its
Python-backend preprocessing model and ensemble serve on the real tritonserver (nvidia-pytriton's).

    make serve-env && .venv/bin/python -m pytest -q tests/test_export_triton.py
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from runtime.contract import ModelContract
from serve_env import (ROOT, SERVE_OK, SERVE_PY, free_ports, http_status, images, model, needs_serve_env,  # noqa: F401
                       reap_shm, serve_py, server_log, shm_names, stop, tail)
from test_infer import S

def test_export_triton_refuses_nonempty_out_and_bad_engine(model, tmp_path, capsys):
    from export.triton import main

    path, _ = model
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["--engine", str(path), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["--engine", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--engine", str(path), "--out", str(path)]) == 2      # never over the model
    assert path.stat().st_size > 0

# against that config exactly as it would for the onnxruntime_onnx platform.
ORT_STAND_IN = """
import json, os
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.inp, self.out = cfg["input"][0]["name"], cfg["output"][0]["name"]
        self.sess = ort.InferenceSession(os.path.join(os.path.dirname(__file__), "model.onnx"),
                                         providers=["CPUExecutionProvider"])

    def execute(self, requests):
        out = []
        for r in requests:
            (y,) = self.sess.run([self.out], {self.inp: pb_utils.get_input_tensor_by_name(r, self.inp).as_numpy()})
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out, y)]))
        return out
"""


@needs_serve_env
def test_exported_repository_parses_and_its_preprocessing_serves(model, images, tmp_path):
    """Every config.pbtxt parses with tritonclient's model-config protobuf; the Python-backend
    preprocessing model runs on tritonserver and returns runtime.preprocess's exact tensor, and
    the ensemble (with an ONNX Runtime stand-in for the model step) answers like the runtime."""
    from export.triton import write_repository

    repo = tmp_path / "repo"
    write_repository(model[0], repo, max_batch=4, preprocess_instances=1)
    check = ("import sys, glob, json; from google.protobuf import text_format; "
             "from tritonclient.grpc import model_config_pb2 as mc; from google.protobuf.json_format import MessageToDict; "
             "print(json.dumps({p: MessageToDict(text_format.Parse(open(p).read(), mc.ModelConfig())) "
             "for p in sorted(glob.glob(sys.argv[1] + '/*/config.pbtxt'))}))")
    r = serve_py("-c", check, str(repo), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = {Path(p).parent.name: c for p, c in json.loads(r.stdout).items()}
    assert cfg["probres_model"]["platform"] == "onnxruntime_onnx" and cfg["probres_model"]["maxBatchSize"] == 4
    assert cfg["probres_model"]["input"][0] == {"name": "images", "dataType": "TYPE_FP32", "dims": ["3", str(S), str(S)]}
    assert cfg["probres_model"]["output"][0]["labelFilename"] == "labels.txt"
    assert cfg["probres_preprocess"]["backend"] == "python"
    steps = cfg["probres"]["ensembleScheduling"]["step"]
    assert [s["modelName"] for s in steps] == ["probres_preprocess", "probres_model"]
    assert ModelContract.from_json(cfg["probres"]["parameters"]["probres.contract"]["stringValue"]) == model[1]
    assert (repo / "probres_model" / "labels.txt").read_text().splitlines() == list(model[1].labels.names)

    config = repo / "probres_model" / "config.pbtxt"
    config.write_text(config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    (repo / "probres_model" / "1" / "model.py").write_text(ORT_STAND_IN)
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shm_before = shm_names()
    loads = [a for m in ("probres_preprocess", "probres_model", "probres") for a in ("--load", m)]
    proc = subprocess.Popen([str(SERVE_PY), "-m", "export.triton_local", "--repo", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), *loads], cwd=ROOT, env=env,
                            stdout=server_log(tmp_path), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while http_status(f"http://127.0.0.1:{http}/v2/models/probres/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, tail(tmp_path / "server.log")
            time.sleep(0.3)
        code = ("import sys, json, numpy as np, tritonclient.http as h; "
                "from runtime.preprocess import preprocess; from runtime.contract import PreprocessSpec; "
                f"c = h.InferenceServerClient('127.0.0.1:{http}'); out = []\n"
                "for f in sys.argv[1:]:\n"
                "    i = h.InferInput('image', [1, 1], 'BYTES'); i.set_data_from_numpy(np.array([[open(f, 'rb').read()]], dtype=object))\n"
                "    try:\n"
                f"        x = c.infer('probres_preprocess', [i]).as_numpy('images'); out.append(float(np.abs(x - preprocess([f], spec=PreprocessSpec(size={S}))).max()))\n"
                "    except Exception as e: out.append(str(e))\n"
                "print(json.dumps(out))")
        _, bad = images
        r = serve_py("-c", code, str(images[0][0]), str(images[0][3]), str(bad["random"][0]), str(bad["bomb"][0]),
                     timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        d0, d3, e_random, e_bomb = json.loads(r.stdout)
        assert d0 == 0.0 and d3 == 0.0
        assert "image 0: not a decodable image" in e_random and "image too large (100000x100000" in e_bomb

        ensemble = ("import sys, json, numpy as np, tritonclient.http as h; from runtime.backends import open_backend; "
                    "from runtime.preprocess import preprocess; "
                    f"c = h.InferenceServerClient('127.0.0.1:{http}'); b = open_backend(sys.argv[1], device='cpu'); out = []\n"
                    "for f in sys.argv[2:]:\n"
                    "    i = h.InferInput('image', [1, 1], 'BYTES'); i.set_data_from_numpy(np.array([[open(f, 'rb').read()]], dtype=object))\n"
                    "    try:\n"
                    "        p = c.infer('probres', [i]).as_numpy('probs')\n"
                    "        top = c.infer('probres', [i], outputs=[h.InferRequestedOutput('probs', class_count=2)]).as_numpy('probs')\n"
                    "        ref = b.infer(preprocess([f], spec=b.contract.preprocess))\n"
                    "        out.append([float(np.abs(p - ref).max()), [t.decode() for t in top[0]], int(np.argmax(ref[0]))])\n"
                    "    except Exception as e: out.append(str(e))\n"
                    "print(json.dumps(out))")
        r = serve_py("-c", ensemble, str(model[0]), str(images[0][1]), str(bad["truncated"][0]), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        (diff, top, best), e_truncated = json.loads(r.stdout)
        assert diff <= 1e-6
        value, index, label = top[0].split(":")       # the classification extension, labels.txt
        assert int(index) == best and label == model[1].labels.names[best]
        assert "image 0: not a decodable image" in e_truncated
        assert http_status(f"http://127.0.0.1:{http}/v2/health/ready") == 200
    finally:
        stop(proc)
        reap_shm(shm_before)

def test_export_triton_plan_takes_names_and_batch_from_the_manifest(tmp_path, capsys):
    """A TensorRT plan: platform tensorrt_plan, KIND_GPU, names and max_batch_size from its sidecar."""
    from export.triton import main, write_repository
    from runtime.trt_manifest import write_manifest
    from test_trt_manifest import _manifest

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real plan: export.triton copies it as is")
    m = _manifest(input_name="input_0", output_name="output_0", max_batch=32, checkpoint_sha256="c" * 64)
    write_manifest(plan, m)
    write_repository(plan, tmp_path / "repo")
    cfg = (tmp_path / "repo" / "probres_model" / "config.pbtxt").read_text()
    from runtime.fileio import sha256_file         # issue 24: the repository says which checkpoint it serves
    assert f'key: "probres.checkpoint_sha256" value {{ string_value: "{"c" * 64}" }}' in cfg
    assert f'key: "probres.model_sha256" value {{ string_value: "{sha256_file(plan)}" }}' in cfg
    for line in ('platform: "tensorrt_plan"', "max_batch_size: 32", 'name: "input_0" data_type: TYPE_FP32 dims: [ 3, 448, 448 ]',
                 'name: "output_0" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt"', "kind: KIND_GPU"):
        assert line in cfg, line
    assert (tmp_path / "repo" / "probres_model" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    ens = (tmp_path / "repo" / "probres" / "config.pbtxt").read_text()
    assert 'input_map { key: "input_0" value: "preprocessed" }' in ens and 'key: "output_0" value: "probs"' in ens
    assert main(["--engine", str(plan), "--out", str(tmp_path / "r2"), "--max-batch", "64"]) == 2
    assert "at most 32" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    plan16 = tmp_path / "p16" / "model.plan"                 # a plan built from export.onnx --fp16's FP16-input graph
    plan16.parent.mkdir()
    plan16.write_bytes(plan.read_bytes())
    write_manifest(plan16, _manifest(input_name="input_0", output_name="output_0", max_batch=32, input_dtype="float16"))
    write_repository(plan16, tmp_path / "repo16")
    cfg16 = (tmp_path / "repo16" / "probres_model" / "config.pbtxt").read_text()
    assert 'name: "input_0" data_type: TYPE_FP16 dims: [ 3, 448, 448 ]' in cfg16
    if SERVE_OK:                                 # the same configs parse with tritonclient's protobuf
        r = serve_py("-c", "import sys, glob; from google.protobuf import text_format; "
                     "from tritonclient.grpc import model_config_pb2 as mc; "
                     "[text_format.Parse(open(p).read(), mc.ModelConfig()) for p in glob.glob(sys.argv[1] + '/*/config.pbtxt')]",
                     str(tmp_path / "repo"), timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (here: a test's unique temp path)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@needs_serve_env
def test_triton_local_stops_its_server_and_cleans_up_on_sigterm(model, tmp_path):
    """Issue 24 row 9: SIGTERM to the wrapper (as timeout, systemd or docker stop send it) used to leave
    tritonserver and its stubs serving and the temp directory behind."""
    import signal

    from export.triton import write_repository

    repo = tmp_path / "repo"
    write_repository(model[0], repo, max_batch=4, preprocess_instances=1)
    temp = tmp_path / "tmp"
    temp.mkdir()
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    shm_before = shm_names()
    proc = subprocess.Popen([str(SERVE_PY), "-m", "export.triton_local", "--repo", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics)], cwd=ROOT, env=env,
                            stdout=server_log(tmp_path), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while http_status(f"http://127.0.0.1:{http}/v2/models/probres_preprocess/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, tail(tmp_path / "server.log")
            time.sleep(0.3)
        assert _pids_mentioning(str(repo)) and any(temp.iterdir())          # tritonserver runs, its temp dir exists
        os.kill(proc.pid, signal.SIGTERM)                                     # the wrapper only, not its group
        assert proc.wait(60) == 143, tail(tmp_path / "server.log")
        deadline = time.monotonic() + 15
        while (_pids_mentioning(str(repo)) or http_status(f"http://127.0.0.1:{http}/v2/health/live")) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _pids_mentioning(str(repo)) == [] and http_status(f"http://127.0.0.1:{http}/v2/health/live") == 0
        assert list(temp.iterdir()) == [], list(temp.iterdir())
        assert "SIGTERM: stopping tritonserver" in tail(tmp_path / "server.log")
    finally:
        stop(proc)
        for pid in _pids_mentioning(str(repo)):          # only what this test started (its unique repo path)
            os.kill(pid, signal.SIGKILL)
        reap_shm(shm_before)
