"""Loading something that is not a probres checkpoint: one clear line, never torch's advice to unpickle (issue 24, row 16).

    .venv/bin/python -m pytest -q tests/test_checkpoint_messages.py
"""

from __future__ import annotations

import fractions
from pathlib import Path

import pytest

from runtime.backends import BackendError, open_backend
from runtime.checkpoint import CheckpointError, read_checkpoint


def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    import onnx
    import torch

    text = tmp_path / "text.pt"
    text.write_text("hello, not a checkpoint\n")
    model_onnx = tmp_path / "model.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(model_onnx))
    objects = tmp_path / "objects.pt"
    torch.save({"x": fractions.Fraction(1, 3)}, objects)    # a real torch.save zip holding a non-tensor object
    return {"text": (text, "not the zip archive torch.save writes"),
            "onnx": (model_onnx, "an ONNX model"),
            "objects": (objects, "does not unpickle it")}


def _check(msg: str, path: Path, needle: str) -> None:
    assert str(path) in msg and needle in msg and len(msg.splitlines()) == 1, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg and "KeyError" not in msg


def test_read_checkpoint_says_what_the_file_is(tmp_path: Path) -> None:
    for path, needle in _files(tmp_path).values():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        _check(str(e.value), path, needle)


def test_pytorch_backend_and_export_onnx_pass_the_message_on(tmp_path: Path, capsys) -> None:
    from export.onnx import main as export_main

    for path, needle in _files(tmp_path).values():
        with pytest.raises(BackendError) as e:
            open_backend(path, device="cpu", backend="pytorch")
        _check(str(e.value), path, needle)
        assert export_main(["--checkpoint", str(path), "--output", str(tmp_path / "out.onnx")]) == 2
        _check(capsys.readouterr().err.strip(), path, needle)
        assert not (tmp_path / "out.onnx").exists()
