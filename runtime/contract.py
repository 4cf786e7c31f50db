"""The model contract: the label set, the preprocessing spec and the decision thresholds, defined once.

    python -c "from runtime.contract import ModelContract; print(ModelContract.coco().to_json())"

Every artifact carries this contract as JSON: the training checkpoint (key "contract"),
the ONNX file (metadata_props key "probres.contract"), and the TensorRT plan's sidecar
(`model.plan.json`, key "contract"). Whoever runs a model reads the contract from the
artifact itself, so the deployed model sees exactly the labels and pixels it was trained
and evaluated with. No torch here: this module ships to the device.

`thresholds` (optional): one decision threshold per label, in label order, each in (0, 1),
chosen on the held-out split after calibration (train/calibrate.py). probres-infer and
probres-eval decide with them by default; a contract without them means 0.5 for every
label, as before they existed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from runtime.errors import ModelError

CONTRACT_FORMAT = "probres-contract/1"
# The exported graph's tensor names: preprocessed images (N, 3, S, S) in, probabilities (N, C) out.
# export.onnx names them so; the backends, the Triton repository and probres-serve address them so.
INPUT_NAME = "images"
OUTPUT_NAME = "probs"

# COCO-2014 "instances" categories: (id, name). Ids are the real, non-contiguous ids 1..90
# (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused), as in instances_train2014.json.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"),
    (6, "bus"), (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"),
    (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench"),
    (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"),
    (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("area", "linear")


class ContractError(ModelError, ValueError):
    """A contract (or its JSON) is malformed."""


@dataclass(frozen=True)
class LabelSet:
    """Model output index i <-> COCO category id category_ids[i] <-> names[i].

    Indices follow ascending category id (the usual COCO multi-label mapping).
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names) or not self.category_ids:
            raise ContractError("label set: category_ids and names must be non-empty and of equal length")
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ContractError("label set: category_ids must be unique and ascending")

    @classmethod
    def from_categories(cls, categories: Sequence[dict[str, Any]] | Sequence[tuple[int, str]]) -> "LabelSet":
        """From COCO json `categories` entries ({"id", "name"}) or (id, name) pairs, sorted by id."""
        pairs = [(int(c["id"]), str(c["name"])) if isinstance(c, dict) else (int(c[0]), str(c[1])) for c in categories]
        pairs.sort()
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @classmethod
    def coco(cls) -> "LabelSet":
        """COCO-2014's 80 categories."""
        return cls.from_categories(COCO_CATEGORIES)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def index_of(self) -> dict[int, int]:
        """category id -> output index."""
        return {cid: i for i, cid in enumerate(self.category_ids)}


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels become the model's input tensor.

    Decode to RGB uint8 (EXIF orientation applied), resize to size x size (no crop, no
    aspect preservation: the multi-label COCO recipes squash), then
    (x / 255 - mean) / std per channel, float32, NCHW.
    `interpolation`: "area" uses the exact box filter (each output pixel the mean of the
    source under its footprint, as cv2.INTER_AREA computes when both sides shrink, without
    rounding to uint8) whenever the image shrinks on a side, and cv2.INTER_LINEAR when it grows
    on both; "linear" always uses cv2.INTER_LINEAR. runtime/preprocess.py implements both.
    """

    size: int = 448
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color: str = "RGB"
    interpolation: str = "area"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and 16 <= self.size <= 4096):
            raise ContractError(f"preprocess spec: size must be an int in 16..4096, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ContractError("preprocess spec: mean and std need 3 values, std > 0")
        if self.color != "RGB" or self.layout != "NCHW":
            raise ContractError("preprocess spec: only RGB / NCHW are supported")
        if self.interpolation not in INTERPOLATIONS:
            raise ContractError(f"preprocess spec: interpolation must be one of {INTERPOLATIONS}")


DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ModelContract:
    """Labels + preprocessing (+ per-label decision thresholds): what travels with every artifact."""

    labels: LabelSet
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    thresholds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.thresholds is None:
            return
        t = tuple(self.thresholds)
        if len(t) != self.labels.num_classes:
            raise ContractError(f"contract: {len(t)} thresholds for {self.labels.num_classes} labels")
        for name, cid, v in zip(self.labels.names, self.labels.category_ids, t):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v < 1.0:
                raise ContractError(f"contract: threshold of label {name!r} (category {cid}) must be in (0, 1), got {v!r}")
        object.__setattr__(self, "thresholds", tuple(float(v) for v in t))

    def with_thresholds(self, thresholds: Sequence[float] | None) -> "ModelContract":
        """The same contract with other thresholds (validated)."""
        return ModelContract(self.labels, self.preprocess, None if thresholds is None else tuple(thresholds))

    def decision_thresholds(self) -> tuple[float, ...]:
        """(C,) thresholds to decide with: the contract's, or DEFAULT_THRESHOLD for every label."""
        return self.thresholds if self.thresholds is not None else (DEFAULT_THRESHOLD,) * self.labels.num_classes

    def same_model_io(self, other: "ModelContract") -> bool:
        """Same labels and preprocessing (thresholds may differ: they are decisions, not the model's I/O)."""
        return self.labels == other.labels and self.preprocess == other.preprocess

    @classmethod
    def coco(cls, size: int = 448) -> "ModelContract":
        return cls(LabelSet.coco(), PreprocessSpec(size=size))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": CONTRACT_FORMAT,
            "labels": [{"id": i, "name": n} for i, n in zip(self.labels.category_ids, self.labels.names)],
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.preprocess).items()},
        }
        if self.thresholds is not None:
            d["thresholds"] = list(self.thresholds)   # label order; JSON floats round-trip exactly
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelContract":
        if not isinstance(d, dict) or d.get("format") != CONTRACT_FORMAT:
            raise ContractError(f"not a {CONTRACT_FORMAT} contract")
        try:
            labels = LabelSet.from_categories(d["labels"])
            p = dict(d["preprocess"])
            spec = PreprocessSpec(
                size=int(p["size"]), mean=tuple(float(x) for x in p["mean"]),
                std=tuple(float(x) for x in p["std"]), color=p.get("color", "RGB"),
                interpolation=p.get("interpolation", "area"), layout=p.get("layout", "NCHW"),
            )
            thr = d.get("thresholds")
            if thr is not None and not isinstance(thr, list):
                raise ContractError(f"contract: thresholds must be a list, got {type(thr).__name__}")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ContractError):
                raise
            raise ContractError(f"malformed contract: {e}") from None
        return cls(labels, spec, None if thr is None else tuple(thr))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelContract":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ContractError(f"contract is not valid JSON: {e}") from None
