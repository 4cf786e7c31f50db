"""One of each: image extensions, network builder, graph-facts reader, and one-way preprocessing imports.

    .venv/bin/python -m pytest -q tests/test_structure.py
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.contract import PreprocessSpec
from runtime.pipeline import IMAGE_EXTENSIONS, iter_image_paths
from runtime.preprocess import preprocess


def _write(path: Path, seed: int) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def test_export_lists_the_images_probres_infer_reads_tiff_included(tmp_path: Path) -> None:
    """--calib-images and --verify-images take every file probres-infer takes from a directory, in its order."""
    pytest.importorskip("onnx")
    from export.int8 import calibration_paths
    from export.verify import list_images, verification_images

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = [_write(d / n, i) for i, n in enumerate(["a.jpg", "b.tif", "c.TIFF", "sub/d.png", "e.webp"])]
    (d / "notes.txt").write_text("not an image")
    infer_order = [Path(p) for p in iter_image_paths([str(d)])]
    assert sorted(infer_order) == sorted(files) and len(IMAGE_EXTENSIONS) >= 9
    assert calibration_paths(d, 100) == infer_order
    assert calibration_paths(d, 2) == infer_order[:2]
    assert list_images(d, 100) == infer_order

    tiffs = tmp_path / "tiffs"                       # a TIFF-only directory: verified on those images
    tiffs.mkdir()
    only = [_write(tiffs / f"{i}.tiff", 10 + i) for i in range(2)]
    spec = PreprocessSpec(size=32)
    x, where = verification_images(spec, {}, tiffs, n=3)
    assert "2 images from" in where
    assert np.array_equal(x, preprocess([str(only[0]), str(only[1]), str(only[0])], spec=spec))


@pytest.mark.parametrize("label_dependency", [False, True])
def test_train_and_runtime_build_the_same_network_for_every_arch(label_dependency: bool) -> None:
    """train.model.build_model (+ train.label_dependency.attach, as calibration does) and the runtime's
    build_network give the same parameter and buffer names, shapes and head class for each arch in ARCHS.
    Built on torch's meta device: no weights are allocated, so resnet152 costs no more than resnet18."""
    torch = pytest.importorskip("torch")
    from runtime.checkpoint import ARCHS, build_network
    from train.label_dependency import attach
    from train.model import ARCHS as TRAIN_ARCHS, build_model

    assert TRAIN_ARCHS is ARCHS
    for arch in ARCHS:
        with torch.device("meta"):
            trained = build_model(arch, 5)
            if label_dependency:
                attach(trained)
            served = build_network(arch, 5, label_dependency)
        a = {k: tuple(v.shape) for k, v in trained.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in served.state_dict().items()}
        assert a == b, arch
        assert type(trained.fc) is type(served.fc) and ("fc.dep_weight" in a) == label_dependency


def test_a_training_checkpoint_builds_what_the_pytorch_backend_runs(tmp_path: Path) -> None:
    """Checkpoint.build (train, export, calibration) and runtime.checkpoint.load_network (the PyTorch backend)
    give the same network: same keys, same outputs, with and without the label-dependency head."""
    torch = pytest.importorskip("torch")
    from runtime.checkpoint import load_network
    from runtime.contract import LabelSet, ModelContract
    from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from train.label_dependency import attach
    from train.model import build_model

    contract = ModelContract(LabelSet.from_categories([{"id": i + 1, "name": f"c{i}"} for i in range(3)]),
                             PreprocessSpec(size=32))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for ld in (False, True):
        torch.manual_seed(1)
        net = build_model("resnet18", 3)
        if ld:
            attach(net)
            with torch.no_grad():
                net.fc.dep_weight.copy_(torch.rand(3, 3) * (1 - torch.eye(3)))
        path = tmp_path / f"ld{ld}.pt"
        save_checkpoint(path, Checkpoint("resnet18", net.state_dict(), contract))
        built = load_checkpoint(path).build()
        served, _, _ = load_network(path)
        assert not built.training and not served.training
        assert list(built.state_dict()) == list(served.state_dict())
        with torch.inference_mode():
            assert torch.equal(built(x), served(x)) and torch.allclose(built(x), net.eval()(x))


def test_one_reader_of_graph_facts_for_export_tensorrt_and_triton(tmp_path: Path) -> None:
    """export.graph reads a graph once; the TensorRT builder's onnx_facts and the Triton writer's engine_facts
    report the same names and dtype from it, and both refuse what the runtime could not feed."""
    onnx = pytest.importorskip("onnx")
    from test_export_tensorrt import CONTRACT, tiny_onnx

    from export.graph import GraphError, check_image_graph, read_graph
    from export.triton import engine_facts
    from export.trt_build import UsageError, onnx_facts
    from runtime.contract import INPUT_NAME, OUTPUT_NAME

    for kw, precision, dtype in (({}, "fp32", "float32"), ({"qdq": True}, "int8", "float32"),
                                 ({"fp16": True, "half_io": True}, "fp16", "float16")):
        path = tiny_onnx(tmp_path / f"{precision}.onnx", **kw)
        g, t, e = read_graph(path), onnx_facts(path), engine_facts(path)
        assert (g.input_name, g.output_name) == (INPUT_NAME, OUTPUT_NAME) == (e.input_name, e.output_name)
        assert g == t and (g.input_dtype, g.precision) == (dtype, precision) == (e.input_dtype, t.precision)
        assert (g.input_dims, g.output_dims, g.image_size, g.batch_dim) == (("batch", 3, 16, 16), ("batch", 2), 16, "batch")
        assert g.metadata["probres.contract"] == CONTRACT.to_json() and e.contract == CONTRACT
        check_image_graph(g, "m", 16, 2, exact_names=True)

    model = onnx.load(str(tiny_onnx(tmp_path / "c3.onnx")))      # output [N, 3]: the contract says 2 labels
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(model, str(tmp_path / "c3.onnx"))
    with pytest.raises(UsageError, match=r"--engine .*c3.onnx: probs has shape \['batch', 3\], expected \[N, 2\]"):
        engine_facts(tmp_path / "c3.onnx")

    model = onnx.load(str(tiny_onnx(tmp_path / "u8.onnx")))       # a uint8 input: not what the pipeline writes
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    onnx.save(model, str(tmp_path / "u8.onnx"))
    for read, flag in ((onnx_facts, "--onnx"), (engine_facts, "--engine")):
        with pytest.raises(UsageError, match=f"{flag} .*u8.onnx: images is uint8, expected float32 or float16"):
            read(tmp_path / "u8.onnx")
    with pytest.raises(GraphError, match="fixed batch"):
        check_image_graph(read_graph(tiny_onnx(tmp_path / "b1.onnx", batch=1)), "m")


# ---------------------------------------------------------------------------------------------- item 4

IMAGE_MODULES = ("errors", "contract", "headers", "decode", "preprocess", "pipeline")   # lower to higher


def test_image_modules_import_one_way_even_inside_functions() -> None:
    """headers <- decode <- preprocess <- pipeline: no module imports one above it, at any depth of the file
    (preprocess.preprocess() used to import pipeline.fill_rows inside the function, headers imported preprocess)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "runtime"
    for level, mod in enumerate(IMAGE_MODULES):
        tree = ast.parse((root / f"{mod}.py").read_text())
        used = {n.module.split(".")[1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("runtime.")}
        above = used & set(IMAGE_MODULES[level + 1:])
        assert not above, f"runtime/{mod}.py imports {sorted(above)}, which import it"
    assert "runtime" not in {n.module.split(".")[0] for n in ast.walk(ast.parse((root / "headers.py").read_text()))
                             if isinstance(n, ast.ImportFrom) and n.module}, "headers.py is a leaf"


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)             # a PNG header claiming 30000 x 30000
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    files = {"bomb.png": bomb + b"\0" * 64, "junk.jpg": b"not an image at all", "empty.png": b""}
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    (tmp / "dir.jpg").mkdir()
    out["dir.jpg"], out["missing.jpg"] = tmp / "dir.jpg", tmp / "missing.jpg"
    return out


def test_every_entry_point_decodes_one_way(tmp_path: Path) -> None:
    """preprocess_one, preprocess, preprocess_into, the batch engine, iter_batches (probres-infer), probres-serve's
    decode_item and training's decode give the same tensor for a good image and the same one-line error for each bad
    one (file checks, the header's pixel limit, decode), paths and bytes alike."""
    from runtime.decode import ImageDecodeError, decode
    from runtime.pipeline import iter_batches
    from runtime.preprocess import load_source, preprocess_array_into, preprocess_into, preprocess_one
    from runtime.serve_model import decode_item

    spec = PreprocessSpec(size=24)
    good = _write(tmp_path / "good.jpg", 0)

    def row(fn) -> np.ndarray:
        out = np.empty((3, 24, 24), np.float32)
        fn(out)
        return out

    def error(fn) -> str:
        with pytest.raises(ImageDecodeError) as e:
            fn()
        return str(e.value)

    def entries(src):
        """(name, a function giving the tensor, or raising)."""
        def batches(s):
            (b,) = list(iter_batches([s], spec, batch_size=2, threads=1))
            if b.errors[0]:
                raise ImageDecodeError(b.errors[0])
            return b.data[0]

        def serve(s):
            out = np.empty((3, 24, 24), np.float32)
            err = decode_item(str(good) if s is good else f"<{len(s)} bytes>", s, out, spec, 1 << 20)
            if err:
                raise ImageDecodeError(err)
            return out
        yield "preprocess_one", lambda: preprocess_one(src, spec)
        yield "preprocess", lambda: preprocess([src], spec=spec)[0]
        yield "preprocess_into", lambda: row(lambda o: preprocess_into(src, o, spec))
        yield "load_source", lambda: row(lambda o: load_source(src, o, spec))
        yield "decode (training, RGB)", lambda: row(lambda o: preprocess_array_into(decode(src)[:, :, ::-1], o, spec))
        if isinstance(src, bytes):
            yield "decode_item (serve)", lambda: serve(src)
        else:
            yield "iter_batches (infer)", lambda: batches(str(src))

    want = preprocess_one(good, spec)
    for src in (good, good.read_bytes()):
        for name, fn in entries(src):
            assert np.array_equal(fn(), want), name
    for path in _bad_inputs(tmp_path).values():
        sources = [path] + ([path.read_bytes()] if path.is_file() else [])
        for src in sources:
            errors = {name: error(fn) for name, fn in entries(src)}
            assert len(set(errors.values())) == 1, errors
            (msg,) = set(errors.values())
            assert "\n" not in msg and msg.startswith(str(path) if isinstance(src, Path) else f"<{len(src)} bytes>:")
