"""Numerical verification of an exported graph: ONNX Runtime (CPU) against PyTorch, on preprocessed images.

    python -m export.onnx --checkpoint runs/x/best.pt --output model.onnx   # runs this after export

Exporters can produce graphs that load and run but compute something else (torch.onnx
dynamo reports for torchvision ResNets: pytorch #169178, #166797), and a batch dimension
specialized to the traced size only shows at another batch. So every export is run in ONNX
Runtime at batch 1 and at an odd batch (7) on the same images PyTorch sees, and the largest
|difference in probability| must stay under a tolerance (1e-4 FP32, 5e-3 FP16).

Images, in order of preference: --verify-images DIR; the COCO val2014 images of the
checkpoint's training config (if that directory exists here); else deterministic noise
images encoded as JPEG (decoded by the same runtime.preprocess path). The report says which.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.contract import INPUT_NAME, OUTPUT_NAME, PreprocessSpec
from runtime.pipeline import IMAGE_EXTENSIONS, is_image_name, iter_image_paths
from runtime.preprocess import preprocess

VERIFY_BATCHES = (1, 7)
FP32_TOL = 1e-4
FP16_TOL = 5e-3
# Config keys the training code may use for the COCO root (the tree holding val2014/).
COCO_ROOT_KEYS = ("coco_root", "data_root", "root", "data")


class VerifyError(RuntimeError):
    """The exported graph does not match PyTorch (or cannot run); the message says by how much."""


@dataclass
class VerifyResult:
    """Max |Δprob| per batch size for one graph against PyTorch."""

    name: str                      # e.g. "model.onnx (fp32)"
    tolerance: float
    max_abs: dict[int, float]      # batch size -> max |ORT - PyTorch|
    mean_abs: dict[int, float]
    spread: float                  # fraction of reference probs in [0.01, 0.99]: < 0.5 means saturated outputs

    @property
    def worst(self) -> float:
        return max(self.max_abs.values())

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.worst)) and self.worst <= self.tolerance

    def line(self) -> str:
        per = ", ".join(f"batch {b}: max {m:.2e} mean {self.mean_abs[b]:.2e}" for b, m in self.max_abs.items())
        verdict = "OK" if self.passed else "FAIL"
        return f"{self.name}: |dprob| vs PyTorch {per} (tolerance {self.tolerance:.0e}) {verdict}"


def list_images(directory: Path, limit: int) -> list[Path]:
    """The first `limit` image files of `directory` in name order (recursive), walked as probres-infer walks a
    directory (runtime.pipeline: the same extensions, TIFF included), stopping after `limit`."""
    files = (Path(p) for p in iter_image_paths([str(directory)]) if os.path.isfile(p))
    return list(islice(files, limit))


def coco_val_dir(config: dict[str, Any]) -> Path | None:
    """val2014/ under the COCO root named in a training config, when it exists on this machine."""
    for key in COCO_ROOT_KEYS:
        value = config.get(key)
        if isinstance(value, dict):             # nested, e.g. {"data": {"root": ...}}
            value = next((value[k] for k in COCO_ROOT_KEYS if isinstance(value.get(k), str)), None)
        if isinstance(value, str) and value:
            for cand in (Path(value) / "val2014", Path(value)):
                if cand.is_dir() and any(is_image_name(p.name) for p in cand.iterdir()):
                    return cand
    return None


def noise_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """`n` deterministic JPEG-encoded images: smooth colour noise plus texture, about size x 1.3*size.

    Not photographs, but they go through the same decode/resize/normalize path and give
    non-trivial activations. Used only when no real image is at hand.
    """
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    h, w = size, int(size * 1.3)
    for _ in range(n):
        low = rng.uniform(0, 255, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 20, (h, w, 3))
        ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


def verification_images(spec: PreprocessSpec, config: dict[str, Any], images_dir: str | Path | None,
                        n: int = max(VERIFY_BATCHES)) -> tuple[np.ndarray, str]:
    """(n, 3, S, S) float32 inputs preprocessed with `spec`, and a sentence saying where they came from.

    Fewer than n real images are cycled. Raises FileNotFoundError for an unusable images_dir.
    """
    sources: Sequence[Any]
    if images_dir is not None:
        d = Path(images_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--verify-images {d}: no such directory")
        sources = list_images(d, n)
        if not sources:
            raise FileNotFoundError(f"--verify-images {d}: no image files ({' '.join(sorted(IMAGE_EXTENSIONS))})")
        where = f"{len(sources)} images from {d}"
    elif (val := coco_val_dir(config)) is not None and (sources := list_images(val, n)):
        where = f"{len(sources)} COCO images from {val} (the checkpoint's training data)"
    else:
        sources = noise_jpegs(n, spec.size)
        where = f"{n} synthetic noise JPEGs (no --verify-images and no COCO val images found)"
    sources = [sources[i % len(sources)] for i in range(n)]
    return preprocess(sources, spec=spec), where


def torch_probs(model: Any, x: np.ndarray) -> np.ndarray:
    """PyTorch reference probabilities (N, C) of a WithSigmoid model on (N, 3, S, S) float32 inputs."""
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x)).float().numpy()


def ort_session(model: str | Path | bytes, threads: int = 0) -> Any:
    """A CPU ONNX Runtime session (all graph optimizations, as deployed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def compare(session: Any, x: np.ndarray, reference: np.ndarray, name: str, tolerance: float,
            batches: Sequence[int] = VERIFY_BATCHES, input_name: str = INPUT_NAME,
            output_name: str = OUTPUT_NAME) -> VerifyResult:
    """Run `session` on x[:b] for each batch size b and compare with reference[:b].

    reference: PyTorch probabilities of x, (N, C); eval-mode PyTorch is batch-independent, so its
    rows serve every batch size. Raises VerifyError when the graph cannot run or returns a wrong shape.
    """
    max_abs, mean_abs = {}, {}
    wants16 = next((i.type for i in session.get_inputs() if i.name == input_name), "") == "tensor(float16)"
    for b in batches:
        try:   # an FP16-input graph gets the batch rounded to float16, as the runtime's pipeline writes it
            (out,) = session.run([output_name], {input_name: x[:b].astype(np.float16) if wants16 else x[:b]})
        except Exception as e:
            raise VerifyError(f"{name}: ONNX Runtime failed at batch {b}: {str(e).splitlines()[0][:300]}") from None
        if out.shape != reference[:b].shape or out.dtype != np.float32:
            raise VerifyError(f"{name}: batch {b} gave {out.dtype} {out.shape}, expected float32 {reference[:b].shape}")
        diff = np.abs(out.astype(np.float64) - reference[:b])
        max_abs[b] = float(np.nanmax(diff)) if np.isfinite(out).all() else float("inf")
        mean_abs[b] = float(diff.mean())
    spread = float(((reference >= 0.01) & (reference <= 0.99)).mean())
    return VerifyResult(name, tolerance, max_abs, mean_abs, spread)
