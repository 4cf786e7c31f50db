"""Output formats of probres-infer: JSON lines, CSV, or per-image tables like the paper's Table I.

    probres-infer --engine model.onnx photos/ --format table --top-k 5

Every writer streams: one record per input, written as soon as its batch is done, in input
order. Predictions are sorted by probability, descending (ties by label index). A video
frame's record also carries "frame" and "time_s" (runtime.video; Writer's `extra` fields),
after "image" in JSONL and CSV, beside the path in a table.
  jsonl  {"image": PATH, "threshold": "contract" | T | null,
          "predictions": [{"label", "category_id", "probability", "threshold"}, ...]}
         {"image": PATH, "error": MESSAGE}
  csv    image,rank,label,category_id,probability,threshold,error  (one row per prediction;
         an image with none gets one row with empty label fields; a failed one, its error)
  table  the image path, then "class  probability" rows
A file name that is not valid UTF-8 is written readable, its undecodable bytes as \\xNN, and in
jsonl also as "image_base64": the name's raw bytes, base64 (only then), which recover it.
"threshold" says what decided: "contract" (the model contract's per-label thresholds; each
prediction carries its label's), a number given with --threshold (the same for every
label), or null (--top-k alone: the K most probable, whatever their probability).
The decision (decision_thresholds, select) and the record (record, error_record) are defined
here once: probres-infer's Writer and runtime.api's Prediction.to_json both build them.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from typing import IO

import numpy as np

from runtime.contract import DEFAULT_THRESHOLD, LabelSet, ModelContract

FORMATS = ("jsonl", "csv", "table")


def select(probs: np.ndarray, thresholds: np.ndarray | None = None, top_k: int | None = None) -> list[int]:
    """Label indices to report for one image's (C,) probabilities, most probable first.

    thresholds ((C,) per label, or None) and top_k (or None): every label with
    probs[k] >= thresholds[k]; with top_k as well, the top_k most probable of those; with
    top_k alone, the top_k most probable whatever their probability (k >= C: all labels).
    """
    order = np.argsort(-probs, kind="stable")
    if thresholds is not None:
        order = [i for i in order if probs[i] >= thresholds[i]]
    return [int(i) for i in (order if top_k is None else order[:top_k])]


def decision_thresholds(contract: ModelContract, threshold: str | float | None, top_k: int | None
                        ) -> tuple[np.ndarray | None, str | float | None]:
    """((C,) thresholds or None, what decided) from a threshold choice and top_k.

    Neither given: the contract's thresholds ("contract"; 0.5 per label for a model without
    them). top_k alone: no threshold (the K most probable). A number: that, for every label.
    """
    if threshold is None and top_k is not None:
        return None, None
    if threshold in (None, "contract"):
        return np.asarray(contract.decision_thresholds(), dtype=np.float64), (
            "contract" if contract.thresholds is not None else DEFAULT_THRESHOLD)
    return np.full(contract.labels.num_classes, float(threshold)), float(threshold)


def prediction_rows(probs: np.ndarray, idx: list[int], labels: LabelSet, thresholds: np.ndarray | None
                    ) -> list[dict]:
    """The "predictions" of a record: label, category_id, probability, threshold (rounded to 6 places)."""
    return [{"label": labels.names[i], "category_id": labels.category_ids[i], "probability": round(float(probs[i]), 6),
             "threshold": None if thresholds is None else round(float(thresholds[i]), 6)} for i in idx]


def record(image: str, probs: np.ndarray, labels: LabelSet, thresholds: np.ndarray | None = None,
           top_k: int | None = None, threshold_name: str | float | None = None, idx: list[int] | None = None,
           fields: dict | None = None) -> dict:
    """The JSONL record of one classified image (idx: select's answer when the caller has it; fields:
    extra keys after "image", as a video frame's "frame" and "time_s")."""
    idx = select(probs, thresholds, top_k) if idx is None else idx
    return {**image_fields(image), **(fields or {}), "threshold": None if thresholds is None else threshold_name,
            "predictions": prediction_rows(probs, idx, labels, thresholds)}


def error_record(image: str, message: str, fields: dict | None = None) -> dict:
    """The JSONL record of an input that could not be classified."""
    return {**image_fields(image), **(fields or {}), "error": printable(message)}


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it: an undecodable file name's bytes (os.fsdecode's surrogates) as \\xNN.

    JSON escapes them itself; a csv or table line would otherwise fail to encode (and lose the run)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def image_fields(image: str) -> dict:
    """A jsonl record's "image": readable (printable), plus "image_base64" (the raw bytes) when not UTF-8."""
    text = printable(image)
    return {"image": text} if text is image else {"image": text,
                                                  "image_base64": base64.b64encode(os.fsencode(image)).decode()}


class Writer:
    """Formats results and errors onto a text stream."""

    def __init__(self, f: IO[str], fmt: str, labels: LabelSet, thresholds: np.ndarray | None = None,
                 top_k: int | None = None, threshold_name: str | float | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        """thresholds: (C,) per-label decision thresholds or None (top_k alone); threshold_name: what
        the records say decided ("contract" or the number given), None with no thresholds;
        extra: field names a record may carry after the image (CSV columns; empty when absent)."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self.f, self.fmt, self.labels, self.top_k, self.extra = f, fmt, labels, top_k, tuple(extra)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.threshold_name = None if thresholds is None else threshold_name
        self._csv = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        if self._csv:
            self._csv.writerow(["image", *self.extra, "rank", "label", "category_id", "probability", "threshold",
                                "error"])
        self._width = max(len("class"), *(len(n) for n in labels.names))

    def _extra(self, fields: dict | None) -> list:
        return ["" if (fields or {}).get(k) is None else fields[k] for k in self.extra]

    def _title(self, image: str, fields: dict | None) -> str:
        return " ".join([image, *(f"{k}={v}" for k, v in (fields or {}).items())])

    def result(self, image: str, probs: np.ndarray, fields: dict | None = None) -> None:
        """One classified image; probs (C,) float32; fields: extra record fields (a frame's "frame", "time_s")."""
        if self.fmt != "jsonl":
            image = printable(image)
        rec = record(image, probs, self.labels, self.thresholds, self.top_k, self.threshold_name, fields=fields)
        preds = [(p["label"], p["category_id"], p["probability"], p["threshold"]) for p in rec["predictions"]]
        if self.fmt == "jsonl":
            self.f.write(json.dumps(rec) + "\n")
        elif self.fmt == "csv":
            more = self._extra(fields)
            rows = [[image, *more, r + 1, n, c, f"{p:.6f}", "" if t is None else f"{t:.6f}", ""]
                    for r, (n, c, p, t) in enumerate(preds)]
            for row in rows or [[image, *more, "", "", "", "", "", ""]]:
                self._csv.writerow(row)
        else:
            w = self._width
            lines = [self._title(image, fields), f"  {'class':<{w}}  probability"]
            lines += [f"  {n:<{w}}  {p:.4f}" for n, _, p, _ in preds]
            if not preds:
                what = "its contract threshold" if self.threshold_name == "contract" else f"{self.threshold_name:g}"
                lines.append(f"  (no label with probability >= {what})")
            self.f.write("\n".join(lines) + "\n\n")

    def error(self, image: str, message: str, fields: dict | None = None) -> None:
        """One input that could not be classified."""
        if self.fmt != "jsonl":
            image, message = printable(image), printable(message)
        if self.fmt == "jsonl":
            self.f.write(json.dumps(error_record(image, message, fields)) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([image, *self._extra(fields), "", "", "", "", "", message])
        else:
            self.f.write(f"{self._title(image, fields)}\n  error: {message}\n\n")
