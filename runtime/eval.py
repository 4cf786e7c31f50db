"""probres-eval: does the exported model score on COCO what the PyTorch checkpoint scores?

    probres-eval --engine model_fp16.onnx --coco-root data/coco --reference runs/r101/best.pt --json parity.json

Runs MODEL and the reference over the same images of ROOT/<split>, decoding and preprocessing
each image once (runtime.pipeline, the contract's spec) and feeding the same float32 batch to
both. Prints mAP, CP, CR, CF1, OP, OR, OF1 side by side, plus the largest |probability
difference| and how many images' thresholded label sets differ; writes the JSON report
atomically; exits 1 when mAP drops by more than --max-map-drop (a fraction, as mAP is).
Without a reference it compares against the val metrics PyTorch stored in the model's
metadata, and says so. --json is checked first: never one of the files read, and
writable. The image set follows training's evaluation (runtime.coco: images
without annotations dropped unless --keep-empty). Exit 2: usage, model or data errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from runtime.backends import DEVICES, Backend, BackendError, add_backend_args, backend_options, open_backend
from runtime.infer import default_threads, positive_int, probability
from runtime.metrics import multilabel_metrics
from runtime.outputs import OutputError, check_outputs, model_inputs
from runtime.pipeline import is_image_name, iter_batches

PROG = "probres-eval"
MAX_MAP_DROP = 0.002           # FP32 / FP16 exports
MAX_MAP_DROP_INT8 = 0.005      # INT8 post-training quantization (export.int8)
TABLE_METRICS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")


class UsageError(Exception):
    """One line for stderr; exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="COCO accuracy of an exported model against its reference.")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="the model under test (.plan/.engine, .onnx, .pt)")
    ap.add_argument("--coco-root", required=True, metavar="DIR", help="COCO tree: DIR/<split>/, DIR/annotations/")
    ap.add_argument("--split", default="val2014", help="split to evaluate on (default val2014)")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--reference", metavar="CHECKPOINT", help="the PyTorch checkpoint (RUN_DIR/best.pt)")
    ref.add_argument("--reference-engine", metavar="OTHER_MODEL", help="another exported model as the reference")
    ap.add_argument("--max-map-drop", type=float, default=None, metavar="FRAC",
                    help=f"fail (exit 1) when mAP drops by more than this fraction (default {MAX_MAP_DROP} = 0.2 "
                         f"points; {MAX_MAP_DROP_INT8} for INT8 models)")
    ap.add_argument("--json", metavar="REPORT", help="write the JSON report here (atomically)")
    ap.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images (by id)")
    ap.add_argument("--keep-empty", action="store_true", help="keep images without annotations as all-negative")
    ap.add_argument("--threshold", type=probability, default=0.5, help="decision threshold for CP..OF1 (default 0.5)")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--device", choices=DEVICES, default="auto")
    add_backend_args(ap)                          # options of the model under test (the reference: defaults)
    return ap


def run_pair(paths: list, engine: Backend, reference: Backend | None, batch_size: int, threads: int
             ) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]:
    """(engine probs (N, C), reference probs (N, C) or None, [(index, error)]) over `paths`.

    Each image is decoded once, into a float32 buffer when either model takes float32 (an
    FP16-input engine then gets it rounded to float16, so the comparison includes the input's
    rounding), else into the engine's own FP16 buffer; both submitted before either is waited
    for. Rows of images that failed to decode stay NaN and are reported.
    """
    n, c = len(paths), engine.contract.labels.num_classes
    pe = np.full((n, c), np.nan, dtype=np.float32)
    pr = np.full((n, c), np.nan, dtype=np.float32) if reference is not None else None
    failed: list[tuple[int, str]] = []
    from tqdm import tqdm
    with tqdm(total=n, unit="img", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        models = [m for m in (engine, reference) if m is not None]
        owner = next((m for m in models if m.input_dtype == np.float32), engine)
        for batch in iter_batches([str(p) for p in paths], engine.contract.preprocess, batch_size, threads,
                                  allocate=owner.allocate_inputs):
            rows = [batch.start + i for i in batch.ok]
            failed += [(batch.start + i, e) for i, e in enumerate(batch.errors) if e is not None]
            if rows:
                pending = [m.submit(batch.data) for m in models]
                pe[rows] = pending[0].wait()
                if reference is not None:
                    pr[rows] = pending[1].wait()
            bar.update(len(batch.paths))
    return pe, pr, failed


def compare(pe: np.ndarray, pr: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, Any]:
    """Metrics of both, mAP drop (reference - engine), max |dprob|, images whose label sets differ."""
    me, mr = multilabel_metrics(pe, targets, threshold), multilabel_metrics(pr, targets, threshold)
    differ = ((pe >= threshold) != (pr >= threshold)).any(axis=1)
    return {"engine": me, "reference": mr, "map_drop": mr["mAP"] - me["mAP"],
            "max_abs_prob_diff": float(np.abs(pe.astype(np.float64) - pr).max()) if len(pe) else 0.0,
            "label_set_diffs": int(differ.sum())}


def format_table(rep: dict[str, Any], engine_name: str, reference_name: str) -> str:
    """The side-by-side parity table (percent, like the papers), plus the verdict line."""
    e, r = rep["engine"], rep["reference"]
    w = max(len(engine_name), len(reference_name), 9)
    lines = [f"{'metric':<7} {engine_name:>{w}} {reference_name:>{w}} {'delta':>8}"]
    for k in TABLE_METRICS:
        if r.get(k) is None:
            lines.append(f"{k:<7} {100 * e[k]:>{w}.3f} {'-':>{w}} {'-':>8}")
        else:
            lines.append(f"{k:<7} {100 * e[k]:>{w}.3f} {100 * r[k]:>{w}.3f} {100 * (e[k] - r[k]):>+8.3f}")
    if rep.get("max_abs_prob_diff") is not None:
        lines.append(f"max |dprob| {rep['max_abs_prob_diff']:.3g}; images whose labels at p>={rep['threshold']:g} "
                     f"differ: {rep['label_set_diffs']} of {rep['num_images']}")
    verdict = "PASSED" if rep["passed"] else "FAILED"
    lines.append(f"mAP drop {rep['map_drop']:+.5f} (tolerance {rep['tolerance']:g}): {verdict}")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Everything but the exit code: (report, table). UsageError/BackendError for exit 2."""
    from runtime.coco import CocoDataError, load_coco_split

    engine = open_backend(args.engine, device=args.device, threads=args.threads, **backend_options(args))
    reference, ref_path = None, args.reference or args.reference_engine
    try:
        if ref_path:
            reference = open_backend(ref_path, device=args.device, threads=args.threads)
            if reference.contract != engine.contract:
                raise UsageError(f"{ref_path}: its contract (labels/preprocessing) differs from {args.engine}'s; "
                                 f"they are not the same model")
        elif not (engine.val_metrics and "mAP" in engine.val_metrics):
            raise UsageError(f"{args.engine}: carries no PyTorch val metrics; give --reference best.pt "
                             f"or --reference-engine OTHER_MODEL")
        try:
            split = load_coco_split(args.coco_root, args.split, keep_empty=args.keep_empty, labels=engine.contract.labels)
        except CocoDataError as e:
            raise UsageError(str(e)) from None
        n = len(split) if args.limit is None else min(args.limit, len(split))
        if n == 0:
            raise UsageError(f"{args.coco_root}: no images to evaluate in {split.describe()}")
        policy = split.describe() + (f"; first {n} by image id (--limit)" if n < len(split) else "")
        print(f"{PROG}: {policy}", file=sys.stderr)
        pe, pr, failed = run_pair(split.image_paths[:n], engine, reference,
                                  args.batch_size, args.threads or default_threads())
        for _, msg in failed:
            print(f"{PROG}: {msg} (excluded)", file=sys.stderr)
        keep = np.ones(n, dtype=bool)
        keep[[i for i, _ in failed]] = False
        targets = split.targets[:n][keep]
        if pr is not None:
            rep = compare(pe[keep], pr[keep], targets, args.threshold)
            ref_info = {"kind": "engine" if args.reference_engine else "checkpoint", "path": ref_path,
                        "backend": reference.name, "precision": reference.precision}
            ref_name = f"{'ref' if args.reference_engine else 'pytorch'} {reference.precision}"
        else:
            me = multilabel_metrics(pe[keep], targets, args.threshold)
            stored = engine.val_metrics
            rep = {"engine": me, "reference": stored, "map_drop": float(stored["mAP"]) - me["mAP"],
                   "max_abs_prob_diff": None, "label_set_diffs": None}
            ref_info = {"kind": "metadata", "path": args.engine, "note": "val metrics stored with the model "
                        "(computed by PyTorch at training time); no per-image comparison"}
            ref_name = "stored"
            print(f"{PROG}: no reference given: comparing against the val metrics stored in {args.engine} "
                  f"(PyTorch, training time{', on ' + str(stored['num_images']) + ' images' if 'num_images' in stored else ''}); "
                  f"give --reference best.pt for a per-image check", file=sys.stderr)
            if stored.get("num_images") not in (None, int(keep.sum())):
                print(f"{PROG}: note: the stored metrics cover {stored['num_images']} images, this run "
                      f"{int(keep.sum())}: the comparison is only indicative", file=sys.stderr)
        tol = args.max_map_drop if args.max_map_drop is not None else (
            MAX_MAP_DROP_INT8 if engine.precision == "int8" else MAX_MAP_DROP)
        rep.update({
            "passed": bool(rep["map_drop"] <= tol), "tolerance": tol,
            "threshold": args.threshold, "num_images": int(keep.sum()), "image_set": policy,
            "split": args.split, "failed_images": [{"image": str(split.image_paths[i]), "error": m} for i, m in failed],
            "engine_model": {"path": args.engine, "backend": engine.name, "precision": engine.precision},
            "reference_model": ref_info,
        })
        table = format_table(rep, f"{engine.name.split('[')[0]} {engine.precision}", ref_name)
        return rep, table
    finally:
        engine.close()
        if reference is not None:
            reference.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_map_drop is not None and not 0 <= args.max_map_drop < 1:
        print(f"{PROG}: error: --max-map-drop is a fraction in [0, 1), got {args.max_map_drop}", file=sys.stderr)
        return 2
    from runtime.coco import annotation_path
    try:                                          # before any work: never write over what is read
        check_outputs([("--json", args.json)],
                      [*model_inputs("--engine", args.engine), *model_inputs("--reference", args.reference),
                       *model_inputs("--reference-engine", args.reference_engine),
                       ("annotations", annotation_path(args.coco_root, args.split)),
                       ("images", f"{args.coco_root}/{args.split}")], reads=is_image_name)
    except OutputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        rep, table = evaluate(args)
    except (BackendError, UsageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(table)
    if args.json:
        import json

        from runtime.fileio import atomic_write_text
        try:
            atomic_write_text(args.json, json.dumps(rep, indent=2) + "\n")
        except OSError as e:
            print(f"{PROG}: error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
