"""Triton Python-backend model: encoded image bytes -> the model's input tensor, with probres's preprocessing.

    python -m export.triton --engine model.onnx --out model_repository/   # copies this file as
    model_repository/probres_preprocess/1/model.py, beside a copy of the `runtime` package

The first step of the exported ensemble. Triton's Python backend runs it in its own stub
process per instance (instance_group count), so several instances decode in parallel without
sharing a GIL. Every item goes through the checks probres-infer and probres-serve apply: the
size cap (parameter probres.max_request_bytes), the header's decompression-bomb guard and the
checked decode (runtime.serve_model.decode_item); the contract (parameter probres.contract)
gives the size, mean, std and interpolation. A request with a bad item gets a Triton error
naming it (the other requests of the batch are unaffected); a request's items are not split.
Needs numpy and OpenCV (opencv-python-headless) in the Python that runs the stub; the C kernel
is used when the copied runtime/_fastnorm*.so matches that Python, its exact numpy twin otherwise.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the copied `runtime` package

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by Triton's Python backend)

from runtime.contract import INPUT_NAME, ModelContract  # noqa: E402
from runtime.serve_model import decode_item  # noqa: E402


class TritonPythonModel:
    """Triton calls initialize once per instance, execute per batch of requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.contract = ModelContract.from_json(params["probres.contract"])
        self.max_bytes = int(params["probres.max_request_bytes"])
        out = pb_utils.get_output_config_by_name(config, INPUT_NAME)
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        s = self.contract.preprocess.size
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)   # (n,) bytes
            out = np.empty((len(items), 3, s, s), dtype=self.dtype)
            error = None
            for i, data in enumerate(items):
                error = decode_item(f"image {i}", data, out[i], self.contract.preprocess, self.max_bytes)
                if error:
                    break
            if error:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(INPUT_NAME, out)]))
        return responses
