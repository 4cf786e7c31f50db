"""The model contract: the label set and the preprocessing spec, defined once.

    python -c "from runtime.contract import ModelContract; print(ModelContract.coco().to_json())"

Every artifact carries this contract as JSON: the training checkpoint (key "contract"),
the ONNX file (metadata_props key "probres.contract"), and the TensorRT plan's sidecar
(`model.plan.json`, key "contract"). Whoever runs a model reads the contract from the
artifact itself, so the deployed model sees exactly the labels and pixels it was trained
and evaluated with. No torch here: this module ships to the device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

CONTRACT_FORMAT = "probres-contract/1"

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


class ContractError(ValueError):
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


@dataclass(frozen=True)
class ModelContract:
    """Labels + preprocessing: what travels with every artifact."""

    labels: LabelSet
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)

    @classmethod
    def coco(cls, size: int = 448) -> "ModelContract":
        return cls(LabelSet.coco(), PreprocessSpec(size=size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CONTRACT_FORMAT,
            "labels": [{"id": i, "name": n} for i, n in zip(self.labels.category_ids, self.labels.names)],
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.preprocess).items()},
        }

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
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ContractError):
                raise
            raise ContractError(f"malformed contract: {e}") from None
        return cls(labels, spec)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelContract":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ContractError(f"contract is not valid JSON: {e}") from None
