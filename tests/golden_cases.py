"""The commands whose outputs tests/test_golden.py pins, and how the pinned files were made.

    PYTHONPATH=$PWD .venv/bin/python tests/golden_cases.py tests/data/golden    # (re)write the golden files

The model is test_infer's tiny ONNX graph (seeded numpy weights, the toy label set) with fixed
per-label thresholds in its contract; the images are the toy COCO val split (train.toy_coco,
seed 0) plus one file that is not an image. Both are rebuilt bit for bit from their seeds, so
the golden files pin what the commands print, not the data. The files were written from main
before the library refactor of issue 20 (commit 6a91474).
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from runtime.contract import LabelSet, ModelContract, PreprocessSpec  # noqa: E402
from test_infer import S, tiny_onnx  # noqa: E402


def build(work: Path, toy_root: Path) -> dict[str, Path]:
    """The models (model.onnx with contract thresholds, reference.onnx without) and the image folder."""
    cats = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    contract = ModelContract(LabelSet.from_categories(cats), PreprocessSpec(size=S))
    c = contract.labels.num_classes
    thr = np.round(np.linspace(0.2, 0.8, c), 3).tolist()       # fixed, so some labels pass and some do not
    model, ref = work / "model.onnx", work / "reference.onnx"
    tiny_onnx(model, contract.with_thresholds(thr), seed=0)
    tiny_onnx(ref, contract, seed=1)
    images = work / "images"
    images.mkdir(exist_ok=True)
    for p in sorted((toy_root / "val2014").glob("*.jpg"))[:8]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "zz_broken.jpg").write_bytes(b"not an image at all")
    return {"model": model, "reference": ref, "images": images, "coco": toy_root}


def commands(paths: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """golden file name -> (command, argv); paths in argv are relative to the work dir."""
    m, imgs = "model.onnx", "images"
    return {
        "infer.jsonl": ("infer", ["--engine", m, imgs, "--batch-size", "3", "--threads", "2"]),
        "infer_t03.jsonl": ("infer", ["--engine", m, imgs, "--threshold", "0.3", "--batch-size", "4"]),
        "infer_topk.jsonl": ("infer", ["--engine", m, imgs, "--top-k", "3"]),
        "infer_topk_thr.jsonl": ("infer", ["--engine", m, imgs, "--top-k", "2", "--threshold", "contract"]),
        "infer.csv": ("infer", ["--engine", m, imgs, "--format", "csv"]),
        "infer.table": ("infer", ["--engine", m, imgs, "--format", "table", "--top-k", "all"]),
        "eval.json": ("eval", ["--engine", m, "--reference-engine", "reference.onnx", "--coco-root",
                               str(paths["coco"]), "--batch-size", "5", "--json", "eval_out.json",
                               "--allow-different-model"]),     # two unrelated tiny models (issue 24's lineage check)
    }


def run(work: Path, cmd: str, argv: list[str]) -> tuple[int, str]:
    """Run one command in `work`; (exit code, its output: stdout, or the --json file for eval)."""
    from runtime import eval as ev, infer
    main = infer.main if cmd == "infer" else ev.main
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(cwd)
    if cmd == "eval":
        text = (work / "eval_out.json").read_text()
        (work / "eval_out.json").unlink()
        return rc, text
    return rc, out.getvalue()


if __name__ == "__main__":
    import tempfile

    from train.toy_coco import make_toy_coco

    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        toy = Path(tmp) / "toy_coco"
        make_toy_coco(toy, n_train=48, n_val=24, seed=0)
        work = Path(tmp) / "work"
        work.mkdir()
        paths = build(work, toy)
        for name, (cmd, argv) in commands(paths).items():
            rc, text = run(work, cmd, argv)
            (dest / name).write_text(text)
            print(name, "exit", rc, len(text.splitlines()), "lines")
