"""Output formats of probres-infer: JSON lines, CSV, or per-image tables like the paper's Table I.

    probres-infer --engine model.onnx photos/ --format table --top-k 5

Every writer streams: one record per input, written as soon as its batch is done, in input
order. Predictions are sorted by probability, descending (ties by label index).
  jsonl  {"image": PATH, "predictions": [{"label", "category_id", "probability"}, ...]}
         {"image": PATH, "error": MESSAGE}
  csv    image,rank,label,category_id,probability,error  (one row per prediction; an image
         with none gets one row with empty label fields; a failed one, its error)
  table  the image path, then "class  probability" rows
"""

from __future__ import annotations

import csv
import json
from typing import IO

import numpy as np

from runtime.contract import LabelSet

FORMATS = ("jsonl", "csv", "table")


def select(probs: np.ndarray, threshold: float = 0.5, top_k: int | None = None) -> list[int]:
    """Label indices to report for one image's (C,) probabilities, most probable first.

    top_k: the k most probable whatever their probability (k >= C: all labels);
    otherwise every label with probability >= threshold.
    """
    order = np.argsort(-probs, kind="stable")
    if top_k is not None:
        return [int(i) for i in order[:top_k]]
    return [int(i) for i in order if probs[i] >= threshold]


class Writer:
    """Formats results and errors onto a text stream."""

    def __init__(self, f: IO[str], fmt: str, labels: LabelSet, threshold: float = 0.5,
                 top_k: int | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        self.f, self.fmt, self.labels, self.threshold, self.top_k = f, fmt, labels, threshold, top_k
        self._csv = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        if self._csv:
            self._csv.writerow(["image", "rank", "label", "category_id", "probability", "error"])
        self._width = max(len("class"), *(len(n) for n in labels.names))

    def result(self, image: str, probs: np.ndarray) -> None:
        """One classified image; probs (C,) float32."""
        idx = select(probs, self.threshold, self.top_k)
        preds = [(self.labels.names[i], self.labels.category_ids[i], round(float(probs[i]), 6)) for i in idx]
        if self.fmt == "jsonl":
            self.f.write(json.dumps({"image": image, "predictions": [
                {"label": n, "category_id": c, "probability": p} for n, c, p in preds]}) + "\n")
        elif self.fmt == "csv":
            rows = [[image, r + 1, n, c, f"{p:.6f}", ""] for r, (n, c, p) in enumerate(preds)]
            for row in rows or [[image, "", "", "", "", ""]]:
                self._csv.writerow(row)
        else:
            w = self._width
            lines = [image, f"  {'class':<{w}}  probability"]
            lines += [f"  {n:<{w}}  {p:.4f}" for n, _, p in preds]
            if not preds:
                lines.append(f"  (no label with probability >= {self.threshold:g})")
            self.f.write("\n".join(lines) + "\n\n")

    def error(self, image: str, message: str) -> None:
        """One input that could not be classified."""
        if self.fmt == "jsonl":
            self.f.write(json.dumps({"image": image, "error": message}) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([image, "", "", "", "", message])
        else:
            self.f.write(f"{image}\n  error: {message}\n\n")
