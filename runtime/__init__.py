"""probres's runtime: classify images with an exported model, without torch.

    python -c "import runtime; clf = runtime.Classifier.open('model.onnx'); print(clf.predict('a.jpg')[0].labels)"

`Classifier` and `Prediction` (runtime.api) load on first use, so `import runtime` itself
imports neither OpenCV nor any engine.
"""

from runtime.errors import ImageError, ModelError, ProbresError, UsageError

__all__ = ["Classifier", "Prediction", "ProbresError", "UsageError", "ModelError", "ImageError"]


def __getattr__(name: str):
    if name in ("Classifier", "Prediction"):
        from runtime import api
        return getattr(api, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
