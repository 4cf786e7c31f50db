"""probres-eval: does the exported model score on COCO what the PyTorch checkpoint scores?

    probres-eval --engine model_fp16.onnx --coco-root data/coco --reference runs/r101/best.pt --json parity.json
    probres-eval --engine model.onnx --csv val.csv --images DIR --reference runs/mine/best.pt   # labels as a CSV

Runs MODEL and the reference over the same images of ROOT/<split>, decoding and preprocessing
each image once (runtime.pipeline, the contract's spec) and feeding the same float32 batch to
both. Prints mAP, CP, CR, CF1, OP, OR, OF1 at 0.5 and CP..OF1 at the decision thresholds
("@thr": the model contract's per-label thresholds, each model its own, or --threshold T),
ECE and the Brier score (runtime.metrics), side by side, plus the largest |probability
difference| and how many images' thresholded label sets differ; writes the JSON report
atomically. The gate (exit 1) fails when mAP drops by more than --max-map-drop, CF1 at the
decision thresholds drops by more than --max-cf1-drop, ECE rises by more than
--max-ece-rise (fractions, as the metrics are), or, per image, when the largest |dprob|
exceeds --max-dprob or the share of images whose label sets differ exceeds
--max-label-diff-share (defaults per precision: PER_IMAGE below, docs/parity-gate.md).
--plot DIR writes DIR/reliability.png.

The reference must be the model the engine was exported from (runtime.provenance): --reference
takes the PyTorch checkpoint whose sha256 the export recorded, --reference-engine another export
of that checkpoint (or the FP32 file an INT8 one was quantized from). Another model, a model
with itself, an exported file given as --reference, or an engine that records no source is
refused (exit 2), unless --allow-different-model: then it is compared and reported as a
"different model", never as a parity check. Without a reference it compares against the val
metrics PyTorch stored in the model's metadata, and says so; when those cover another image
set (--limit) the comparison is indicative and not gated. --json and --plot are checked first:
never one of the files read, and writable. The image set follows training's evaluation
(runtime.coco: images without annotations dropped unless --keep-empty). Exit 2: usage, model
or data errors.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import DEVICES, Backend, BackendError, add_backend_args, backend_options, open_backend
from runtime.contract import ModelContract
from runtime.csv_labels import add_eval_args, eval_data, load_eval_split
from runtime.infer import decision_thresholds, default_threads, positive_int, threshold_arg
from runtime.metrics import multilabel_metrics
from runtime.outputs import OutputError, check_outputs, model_inputs
from runtime.pipeline import is_image_name, iter_batches

PROG = "probres-eval"
MAX_MAP_DROP = 0.002           # FP32 / FP16 exports
MAX_MAP_DROP_INT8 = 0.005      # INT8 post-training quantization (export.int8)
TABLE_METRICS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_contract", "CR_contract", "CF1_contract",
                 "OP_contract", "OR_contract", "OF1_contract", "ECE", "Brier")
GATES = (("mAP", "map_drop", "max_map_drop", -1), ("CF1_contract", "cf1_drop", "max_cf1_drop", -1),
         ("ECE", "ece_rise", "max_ece_rise", 1))   # (metric, report key, flag, sign of a worsening)
# Per-image tolerances by the engine's precision: (max |dprob|, share of images whose label sets
# differ). Measured against PyTorch (benchmarks/RESULTS.md, "INT8 on the CPU", toy and photo
# sets): FP32 max |dprob| 2.1e-7 / 2.4e-7 and no label set differing; FP16 4.9e-4 / 1.8e-4, none
# differing; INT8 0.034-0.059 and 1-3 of 87-88 images differing (<= 3.4%). A different model
# (issue 24: model_int8.onnx against best.pt instead of best_calibrated.pt) gave 0.453 and 163 of
# 725 (22%); make demo (epoch-1 model, contract thresholds, 725 images): INT8 0.081-0.083 and 8.6-9.5%
# differing. FP32 / FP16 take export.onnx's own verification bounds (1e-4, 5e-3); INT8 about 2x
# its worst measured figures.
PER_IMAGE = {"fp32": (1e-4, 0.01), "fp16": (5e-3, 0.02), "int8": (0.15, 0.15)}


def row_name(key: str) -> str:
    return key.replace("_contract", "@thr")


class UsageError(Exception):
    """One line for stderr; exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="COCO accuracy of an exported model against its reference.")
    ap.add_argument("--engine", required=True, metavar="MODEL", help="the model under test (.plan/.engine, .onnx, .pt)")
    ap.add_argument("--coco-root", metavar="DIR", help="COCO tree: DIR/<split>/, DIR/annotations/")
    add_eval_args(ap)                             # or --csv FILE --images DIR (runtime/csv_labels.py)
    ap.add_argument("--split", default="val2014", help="split to evaluate on (default val2014)")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--reference", metavar="CHECKPOINT",
                     help="the PyTorch checkpoint MODEL was exported from (make demo: run/best.pt)")
    ref.add_argument("--reference-engine", metavar="OTHER_MODEL",
                     help="another export of that checkpoint (for INT8: the FP32 .onnx it was quantized from)")
    ap.add_argument("--max-map-drop", type=float, default=None, metavar="FRAC",
                    help=f"fail (exit 1) when mAP drops by more than this fraction (default {MAX_MAP_DROP} = 0.2 "
                         f"points; {MAX_MAP_DROP_INT8} for INT8 models)")
    ap.add_argument("--max-cf1-drop", type=float, default=0.005, metavar="FRAC",
                    help="fail when CF1 at the decision thresholds drops by more than this (default 0.005)")
    ap.add_argument("--max-ece-rise", type=float, default=0.005, metavar="FRAC",
                    help="fail when the expected calibration error rises by more than this (default 0.005)")
    ap.add_argument("--max-dprob", type=float, default=None, metavar="P",
                    help="fail when any probability differs from the reference's by more than this (default by "
                         "precision: " + ", ".join(f"{k} {v[0]:g}" for k, v in PER_IMAGE.items()) + ")")
    ap.add_argument("--max-label-diff-share", type=float, default=None, metavar="FRAC",
                    help="fail when more than this share of images get other labels than from the reference "
                         "(default by precision: " + ", ".join(f"{k} {v[1]:g}" for k, v in PER_IMAGE.items()) + ")")
    ap.add_argument("--allow-different-model", action="store_true",
                    help="compare with a reference the engine was not exported from, reported as a different "
                         "model (exit 1: never a passed parity check)")
    ap.add_argument("--plot", metavar="DIR", help="write DIR/reliability.png (needs matplotlib)")
    ap.add_argument("--json", metavar="REPORT", help="write the JSON report here (atomically)")
    ap.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images (by id)")
    ap.add_argument("--keep-empty", action="store_true", help="keep images without annotations as all-negative")
    ap.add_argument("--threshold", type=threshold_arg, default="contract", metavar="contract|T",
                    help="decision thresholds for CP..OF1@thr: each model's contract thresholds (default; 0.5 "
                         "without them) or T for every label (CP..OF1 are also reported at 0.5)")
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


def decision(contract: ModelContract, threshold: str | float) -> np.ndarray:
    """(C,) thresholds a model decides with: its contract's ('contract'), or T for every label."""
    return decision_thresholds(contract, threshold, None)[0]


def gate(rep: dict[str, Any], tolerances: dict[str, float]) -> dict[str, Any]:
    """Each gate's worsening (reference -> engine) and verdict against tolerances[flag]; a metric the
    reference lacks is not checked."""
    e, r = rep["engine"], rep["reference"]
    checks = {}
    for metric, key, flag, sign in GATES:
        tol = tolerances[flag]
        if r.get(metric) is None or e.get(metric) is None:
            checks[key] = {"value": None, "tolerance": tol, "passed": True,
                           "note": f"not checked: the reference has no {metric}"}
            continue
        worse = sign * (float(e[metric]) - float(r[metric]))
        checks[key] = {"value": worse, "tolerance": tol, "passed": bool(worse <= tol)}
    return checks


def compare(pe: np.ndarray, pr: np.ndarray, targets: np.ndarray, te: np.ndarray, tr: np.ndarray) -> dict[str, Any]:
    """Metrics of both (te, tr: each one's (C,) decision thresholds), max |dprob|, images whose label sets differ."""
    me, mr = multilabel_metrics(pe, targets, 0.5, te), multilabel_metrics(pr, targets, 0.5, tr)
    differ = ((pe >= te) != (pr >= tr)).any(axis=1)
    return {"engine": me, "reference": mr,
            "max_abs_prob_diff": float(np.abs(pe.astype(np.float64) - pr).max()) if len(pe) else 0.0,
            "label_set_diffs": int(differ.sum())}


def format_table(rep: dict[str, Any], engine_name: str, reference_name: str) -> str:
    """The side-by-side parity table (percent, like the papers), plus the verdict line."""
    e, r = rep["engine"], rep["reference"]
    w = max(len(engine_name), len(reference_name), 9)
    lines = [f"{'metric':<8} {engine_name:>{w}} {reference_name:>{w}} {'delta':>8}"]
    for k in TABLE_METRICS:
        if e.get(k) is None:
            continue
        if r.get(k) is None:
            lines.append(f"{row_name(k):<8} {100 * e[k]:>{w}.3f} {'-':>{w}} {'-':>8}")
        else:
            lines.append(f"{row_name(k):<8} {100 * e[k]:>{w}.3f} {100 * r[k]:>{w}.3f} {100 * (e[k] - r[k]):>+8.3f}")
    thr = "the contract's thresholds" if rep["threshold"] == "contract" else f"p>={rep['threshold']:g}"
    if rep.get("max_abs_prob_diff") is not None:
        lines.append(f"max |dprob| {rep['max_abs_prob_diff']:.3g}; images whose labels at {thr} "
                     f"differ: {rep['label_set_diffs']} of {rep['num_images']}")
    parts = [f"{key.replace('_', ' ')} " + ("unchecked" if g["value"] is None else
                                           f"{g['value']:.3g}" if key in ("max_dprob", "label_diff_share")
                                           else f"{g['value']:+.5f}")
             + f" (tolerance {g['tolerance']:g})" for key, g in rep["gates"].items()]
    lines.append(f"{'; '.join(parts)}: {rep['verdict']}")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    """What one probres-eval run compares, on what, and how strictly (the CLI's flags, typed)."""

    engine: str
    coco_root: str | None = None               # COCO tree, or:
    csv: str | None = None                     # reference labels as a CSV (runtime/csv_labels.py) ...
    images: str | None = None                  # ... with image names relative to this directory
    split: str = "val2014"
    reference: str | None = None               # the PyTorch checkpoint the engine was exported from
    reference_engine: str | None = None        # or another export of it
    allow_different_model: bool = False
    max_map_drop: float | None = None          # None: MAX_MAP_DROP, or MAX_MAP_DROP_INT8 for INT8
    max_cf1_drop: float = 0.005
    max_ece_rise: float = 0.005
    max_dprob: float | None = None             # None: PER_IMAGE[precision][0]
    max_label_diff_share: float | None = None  # None: PER_IMAGE[precision][1]
    plot: str | None = None
    limit: int | None = None
    keep_empty: bool = False
    threshold: str | float = "contract"
    batch_size: int = 16
    threads: int | None = None
    device: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)   # open_backend's backend= and options


def evaluate(cfg: EvalConfig) -> tuple[dict[str, Any], str]:
    """Everything but the exit code: (report, table). UsageError/BackendError for exit 2."""
    from runtime.coco import CocoDataError

    ref_path = cfg.reference or cfg.reference_engine
    relation = None
    if ref_path:         # before any model loads: a wrong reference costs nothing
        if not Path(ref_path).is_file():
            raise UsageError(f"{'--reference' if cfg.reference else '--reference-engine'} {ref_path}: no such model file")
        if Path(cfg.engine).is_file():
            from runtime.provenance import ProvenanceError, check_reference
            try:
                relation = check_reference(cfg.engine, ref_path, "--reference" if cfg.reference else "--reference-engine",
                                           cfg.allow_different_model)
            except ProvenanceError as e:
                raise UsageError(str(e)) from None
            if relation == "different model":
                print(f"{PROG}: warning: {ref_path} is not what {cfg.engine} came from: comparing two models, "
                      f"not a parity check", file=sys.stderr)
    engine = open_backend(cfg.engine, device=cfg.device, threads=cfg.threads, **cfg.backend_options)
    reference = None
    try:
        if ref_path:
            reference = open_backend(ref_path, device=cfg.device, threads=cfg.threads)
            if not reference.contract.same_model_io(engine.contract):
                raise UsageError(f"{ref_path}: its contract (labels/preprocessing) differs from {cfg.engine}'s; "
                                 f"they are not the same model")
        elif not (engine.val_metrics and "mAP" in engine.val_metrics):
            raise UsageError(f"{cfg.engine}: carries no PyTorch val metrics; give --reference CHECKPOINT (the one it "
                             f"was exported from) or --reference-engine OTHER_MODEL")
        try:
            split = load_eval_split(engine.contract.labels, csv=cfg.csv, images=cfg.images, coco_root=cfg.coco_root,
                                    split=cfg.split, keep_empty=cfg.keep_empty)
        except CocoDataError as e:
            raise UsageError(str(e)) from None
        n = len(split) if cfg.limit is None else min(cfg.limit, len(split))
        if n == 0:
            raise UsageError(f"{cfg.csv or cfg.coco_root}: no images to evaluate in {split.describe()}")
        policy = split.describe() + (f"; first {n} by image id (--limit)" if n < len(split) else "")
        print(f"{PROG}: {policy}", file=sys.stderr)
        pe, pr, failed = run_pair(split.image_paths[:n], engine, reference,
                                  cfg.batch_size, cfg.threads or default_threads())
        for _, msg in failed:
            print(f"{PROG}: {msg} (excluded)", file=sys.stderr)
        keep = np.ones(n, dtype=bool)
        keep[[i for i, _ in failed]] = False
        targets = split.targets[:n][keep]
        te = decision(engine.contract, cfg.threshold)
        indicative = False
        if pr is not None:
            rep = compare(pe[keep], pr[keep], targets, te, decision(reference.contract, cfg.threshold))
            kind = "engine" if cfg.reference_engine else "checkpoint"
            ref_info = {"kind": kind, "path": ref_path, "backend": reference.name, "precision": reference.precision,
                        "relation": relation}
            ref_name = f"{'ref' if cfg.reference_engine else 'pytorch'} {reference.precision}"
        else:
            me = multilabel_metrics(pe[keep], targets, 0.5, te)
            stored = engine.val_metrics
            rep = {"engine": me, "reference": stored, "max_abs_prob_diff": None, "label_set_diffs": None}
            ref_info = {"kind": "metadata", "path": cfg.engine, "note": "val metrics stored with the model "
                        "(computed by PyTorch at training time); no per-image comparison"}
            ref_name = "stored"
            print(f"{PROG}: no reference given: comparing against the val metrics stored in {cfg.engine} "
                  f"(PyTorch, training time{', on ' + str(stored['num_images']) + ' images' if 'num_images' in stored else ''}); "
                  f"give --reference CHECKPOINT (the one it was exported from) for a per-image check", file=sys.stderr)
            indicative = stored.get("num_images") not in (None, int(keep.sum())) or n < len(split)
            if indicative:
                print(f"{PROG}: note: the stored metrics cover {stored.get('num_images', 'all the')} images, this run "
                      f"{int(keep.sum())}: the comparison is only indicative and not gated", file=sys.stderr)
        tol = cfg.max_map_drop if cfg.max_map_drop is not None else (
            MAX_MAP_DROP_INT8 if engine.precision == "int8" else MAX_MAP_DROP)
        dprob_tol, share_tol = PER_IMAGE.get(engine.precision, PER_IMAGE["fp32"])
        gates = gate(rep, {"max_map_drop": tol, "max_cf1_drop": cfg.max_cf1_drop, "max_ece_rise": cfg.max_ece_rise})
        if pr is not None:
            gates.update(per_image_gates(rep, int(keep.sum()),
                                         dprob_tol if cfg.max_dprob is None else cfg.max_dprob,
                                         share_tol if cfg.max_label_diff_share is None else cfg.max_label_diff_share))
        rep.update({
            "gates": gates, "passed": indicative or (relation != "different model"
                                                     and all(g["passed"] for g in gates.values())),
            "verdict": verdict(gates, indicative, relation),
            "map_drop": gates["map_drop"]["value"], "tolerance": tol,
            "threshold": cfg.threshold, "engine_thresholds": [float(v) for v in te], "num_images": int(keep.sum()),
            "image_set": policy,
            "split": cfg.split, "failed_images": [{"image": str(split.image_paths[i]), "error": m} for i, m in failed],
            "engine_model": {"path": cfg.engine, "backend": engine.name, "precision": engine.precision},
            "reference_model": ref_info,
        })
        table = format_table(rep, f"{engine.name.split('[')[0]} {engine.precision}", ref_name)
        if cfg.plot:
            from runtime.plots import reliability_diagram
            curves = [(f"{engine.name.split('[')[0]} {engine.precision}", pe[keep], targets)]
            if pr is not None:
                curves.append((ref_name, pr[keep], targets))
            rep["plots"] = [str(reliability_diagram(Path(cfg.plot) / "reliability.png", curves,
                                                    f"Reliability on {cfg.split} (all labels pooled)"))]
        return rep, table
    finally:
        engine.close()
        if reference is not None:
            reference.close()


def per_image_gates(rep: dict[str, Any], num_images: int, max_dprob: float, max_share: float) -> dict[str, Any]:
    """The per-image checks: the largest |dprob| and the share of images whose label sets differ."""
    share = rep["label_set_diffs"] / num_images if num_images else 0.0
    return {"max_dprob": {"value": rep["max_abs_prob_diff"], "tolerance": max_dprob,
                          "passed": bool(rep["max_abs_prob_diff"] <= max_dprob)},
            "label_diff_share": {"value": share, "tolerance": max_share, "passed": bool(share <= max_share)}}


def verdict(gates: dict[str, Any], indicative: bool, relation: str | None) -> str:
    """PASSED / FAILED, or what makes the run no parity check at all."""
    if indicative:
        return "INDICATIVE (another image set than the stored metrics': not gated)"
    if relation == "different model":
        return "DIFFERENT MODEL (compared as asked; not a parity check)"
    return "PASSED" if all(g["passed"] for g in gates.values()) else "FAILED"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("max_map_drop", "max_cf1_drop", "max_ece_rise", "max_dprob", "max_label_diff_share"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value < 1:
            print(f"{PROG}: error: --{flag.replace('_', '-')} is a fraction in [0, 1), got {value}", file=sys.stderr)
            return 2
    data_error, data_inputs = eval_data(args.csv, args.images, args.coco_root, args.split)
    if data_error:
        print(f"{PROG}: error: {data_error}", file=sys.stderr)
        return 2
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        print(f"{PROG}: error: --plot {args.plot}: exists and is not a directory", file=sys.stderr)
        return 2
    plot_png = None if args.plot is None else Path(args.plot) / "reliability.png"
    try:                                          # before any work: never write over what is read
        check_outputs([("--json", args.json), ("--plot", plot_png)],
                      [*model_inputs("--engine", args.engine), *model_inputs("--reference", args.reference),
                       *model_inputs("--reference-engine", args.reference_engine),
                       *data_inputs], reads=is_image_name)
    except OutputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.plot:       # checked before any image is read: a missing matplotlib must not cost the run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{PROG}: error: --plot needs matplotlib (pip install matplotlib, or the 'plot' extra)",
                  file=sys.stderr)
            return 2
        try:
            Path(args.plot).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"{PROG}: error: --plot {args.plot}: cannot create it ({e.strerror or e})", file=sys.stderr)
            return 2
    try:
        rep, table = evaluate(EvalConfig(
            engine=args.engine, coco_root=args.coco_root, csv=args.csv, images=args.images, split=args.split, reference=args.reference,
            reference_engine=args.reference_engine, allow_different_model=args.allow_different_model,
            max_map_drop=args.max_map_drop, max_cf1_drop=args.max_cf1_drop, max_ece_rise=args.max_ece_rise,
            max_dprob=args.max_dprob, max_label_diff_share=args.max_label_diff_share, plot=args.plot,
            limit=args.limit, keep_empty=args.keep_empty, threshold=args.threshold, batch_size=args.batch_size,
            threads=args.threads, device=args.device, backend_options=backend_options(**vars(args))))
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
