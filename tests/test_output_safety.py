"""Never overwrite what is read, and fail before the work: probres-infer, probres-eval, export.onnx, export.tensorrt.

    .venv/bin/python -m pytest -q tests/test_output_safety.py

Each refusal must exit 2 with one line naming the output and the input, leave the input's
bytes as they were, and come before any model is loaded: the models given here are garbage
files where the check order matters, so a tool that loaded first would fail on the model
instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_pipeline_memory import tiny_onnx, write_images

from runtime.outputs import OutputError, check_outputs


def unwritable_dir() -> str | None:
    """A directory even root cannot create files in (/sys), or None where there is none."""
    try:
        fd, p = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys"
    os.close(fd)
    os.unlink(p)
    return None


NO_WRITE = unwritable_dir()
needs_unwritable = pytest.mark.skipif(NO_WRITE is None, reason="no unwritable directory on this machine")


def one_line_error(err: str, *names) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture()
def tree(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 3, size=32)
    model = tiny_onnx(tmp_path / "m.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    return tmp_path, imgs, model, garbage


# ------------------------------------------------------------------------------------ probres-infer

def test_infer_refuses_an_output_that_is_an_input(tree, capsys):
    from runtime.infer import main

    tmp, imgs, model, garbage = tree
    image = imgs / "00" / "img_00001.jpg"
    before = image.read_bytes()
    # an image the directory walk reads (the case), and one named explicitly
    for args in (["--engine", garbage, imgs, "--output", image], ["--engine", garbage, image, "-o", image]):
        assert main([str(a) for a in args]) == 2
        one_line_error(capsys.readouterr().err, image)
    assert image.read_bytes() == before
    # the model itself, through its own name, a symlink and a hard link
    model_bytes = model.read_bytes()
    (tmp / "link.jsonl").symlink_to(model)
    os.link(model, tmp / "hard.jsonl")
    for out in (model, tmp / "link.jsonl", tmp / "hard.jsonl"):
        assert main(["--engine", str(model), str(imgs), "--output", str(out)]) == 2
        line = one_line_error(capsys.readouterr().err, out, model)
        assert "same file" in line
    assert model.read_bytes() == model_bytes
    # the --from-list file
    lst = tmp / "list.txt"
    lst.write_text(f"{image}\n")
    assert main(["--engine", str(model), "--from-list", str(lst), "--output", str(lst)]) == 2
    one_line_error(capsys.readouterr().err, lst)
    assert lst.read_text() == f"{image}\n"


def test_infer_allows_a_results_file_beside_the_images(tree, capsys):
    from runtime.infer import main

    tmp, imgs, model, _ = tree
    out = imgs / "results.jsonl"
    out.write_text("old\n")                           # a previous run's results: not an input
    assert main(["--engine", str(model), str(imgs), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 + 3                  # the provenance header, 3 records


def test_infer_checks_the_output_location_before_loading_the_model(tree, capsys):
    from runtime.infer import main

    tmp, imgs, _, garbage = tree
    assert main(["--engine", str(garbage), str(imgs), "--output", str(tmp)]) == 2      # a directory
    assert "is a directory" in one_line_error(capsys.readouterr().err, tmp)
    (tmp / "file").write_text("x")
    assert main(["--engine", str(garbage), str(imgs), "--output", str(tmp / "file" / "r.jsonl")]) == 2
    assert "not a directory" in one_line_error(capsys.readouterr().err, tmp / "file")
    if NO_WRITE:
        out = f"{NO_WRITE}/probres/r.jsonl"
        assert main(["--engine", str(garbage), str(imgs), "--output", out]) == 2
        assert "cannot write" in one_line_error(capsys.readouterr().err, out)


# ------------------------------------------------------------------------------------ probres-eval

def test_eval_refuses_json_over_the_annotations_and_checks_it_first(tree, toy_root, capsys):
    from runtime.eval import main

    tmp, _, model, garbage = tree
    root = tmp / "coco"
    shutil.copytree(toy_root, root)
    ann = root / "annotations" / "instances_val2014.json"
    before = ann.read_bytes()
    assert main(["--engine", str(garbage), "--coco-root", str(root), "--json", str(ann)]) == 2
    assert "same file" in one_line_error(capsys.readouterr().err, ann)
    assert ann.read_bytes() == before
    assert main(["--engine", str(model), "--coco-root", str(root), "--json", str(model)]) == 2
    one_line_error(capsys.readouterr().err, model)
    image = sorted((root / "val2014").iterdir())[0]
    assert main(["--engine", str(garbage), "--coco-root", str(root), "--json", str(image)]) == 2
    one_line_error(capsys.readouterr().err, image)
    assert main(["--engine", str(garbage), "--coco-root", str(root), "--json", str(tmp)]) == 2
    assert "is a directory" in one_line_error(capsys.readouterr().err, tmp)
    if NO_WRITE:      # today's late failure: after the whole evaluation
        out = f"{NO_WRITE}/parity.json"
        assert main(["--engine", str(garbage), "--coco-root", str(root), "--json", out]) == 2
        assert "cannot write" in one_line_error(capsys.readouterr().err, out)


# ------------------------------------------------------------------------------------ export.onnx

def test_export_onnx_refuses_overwriting_the_checkpoint_and_checks_first(tmp_path, capsys):
    from export.onnx import main

    ckpt = tmp_path / "ck.onnx"                      # garbage: loading it would fail differently
    ckpt.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(ckpt), "--output", str(ckpt)]) == 2
    assert "same file" in one_line_error(capsys.readouterr().err, ckpt)
    fp16 = tmp_path / "m_fp16.onnx"
    fp16.write_bytes(b"also read")
    assert main(["--checkpoint", str(fp16), "--output", str(tmp_path / "m.onnx"), "--fp16"]) == 2
    one_line_error(capsys.readouterr().err, fp16)
    assert ckpt.read_bytes() == b"not a checkpoint" and fp16.read_bytes() == b"also read"
    if NO_WRITE:      # today: a traceback and exit 1 after the export
        out = f"{NO_WRITE}/model.onnx"
        assert main(["--checkpoint", str(ckpt), "--output", out]) == 2
        assert "cannot write" in one_line_error(capsys.readouterr().err, out)


# ------------------------------------------------------------------------------------ export.tensorrt

def test_export_tensorrt_refuses_overwriting_the_onnx_and_checks_before_tensorrt(tmp_path, capsys):
    from export.tensorrt import main

    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    before = onnx_path.read_bytes()
    os.link(onnx_path, tmp_path / "m.plan")            # the plan name is a hard link to the ONNX
    assert main(["--onnx", str(onnx_path), "--output", str(tmp_path / "m.plan")]) == 2
    assert "same file" in one_line_error(capsys.readouterr().err, onnx_path, tmp_path / "m.plan")
    side = tmp_path / "x.plan.json"                    # the manifest would land on the ONNX
    side.write_bytes(before)
    assert main(["--onnx", str(side), "--output", str(tmp_path / "x.plan")]) == 2
    one_line_error(capsys.readouterr().err, side)
    assert onnx_path.read_bytes() == before and side.read_bytes() == before
    if NO_WRITE:      # not "install tensorrt": the output is checked first
        out = f"{NO_WRITE}/model.plan"
        assert main(["--onnx", str(onnx_path), "--output", out]) == 2
        assert "cannot write" in one_line_error(capsys.readouterr().err, out)


# ------------------------------------------------------------------------------------ the helper

def test_check_outputs_rules(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"1")
    check_outputs([("--out", b)], [("--in", a)])                        # distinct: fine
    with pytest.raises(OutputError, match="are the same file"):
        check_outputs([("--out", b), ("--also", tmp_path / "." / "b.bin")], [])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("read")
    with pytest.raises(OutputError, match="inside"):                   # default: a directory reads every file
        check_outputs([("--out", tmp_path / "sub" / "x.txt")], [("--dir", tmp_path / "sub")])
    check_outputs([("--out", tmp_path / "sub" / "x.txt")], [("--dir", tmp_path / "sub")],
                  reads=lambda n: n.endswith(".jpg"))
    check_outputs([("--cache", a)], [("--cache", a)])                   # updated in place by design
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "sub"]             # the probe left nothing behind
    if os.geteuid() != 0:                                               # root may write a 0555 directory
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(OutputError, match="cannot write"):
            check_outputs([("--out", ro / "r.json")], [])


def test_infer_refuses_an_output_named_in_the_list_or_on_stdin(tree, capsys, monkeypatch):
    import io

    from runtime.infer import main

    tmp, imgs, model, _ = tree
    image = imgs / "00" / "img_00002.jpg"
    before = image.read_bytes()
    via = tmp / "via"                                 # the same image through a symlinked directory
    via.symlink_to(imgs / "00")
    lst = tmp / "list.txt"
    lst.write_text(f"{imgs / '00' / 'img_00000.jpg'}\n{via / 'img_00002.jpg'}\n")
    assert main(["--engine", str(model), "--from-list", str(lst), "--output", str(image)]) == 2
    assert "line 2" in one_line_error(capsys.readouterr().err, image, lst)
    # stdin cannot be read twice: the run stops when the entry comes, before anything replaces it
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lst.read_bytes())))
    assert main(["--engine", str(model), "--from-list", "-", "--output", str(image), "--batch-size", "1"]) == 2
    assert "left as it was" in one_line_error(capsys.readouterr().err, image)
    assert image.read_bytes() == before
    assert sorted(os.listdir(image.parent)) == ["img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]
