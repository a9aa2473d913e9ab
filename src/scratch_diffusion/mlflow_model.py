"""The MLflow model that the training stages log: MLflow's "models from code", so no pickle anywhere. MLflow runs this
file to build the model (at logging, and wherever the model is loaded: `mlflow.pyfunc.load_model`, `mlflow models
serve`, `mlflow models predict`); it is never imported by the library.

The logged model carries the trained model's folder (safetensors weights, configs) as the artifact `model`, this
package's source, and a config with the model's request defaults and `max_images`. predict takes one request, a
one-row DataFrame (JSON: {"inputs": {"n": 16, "seed": 0}}), and returns the images as a uint8 array (n, H, W) or
(n, H, W, 3): the same images `scratch-diffusion generate` draws for the same request. A bad request is an MLflow
INVALID_PARAMETER_VALUE error (HTTP 400 from the server) whose message ends with one line naming the field.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from scratch_diffusion import serving


class DiffusionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = serving.load(context.artifacts[serving.ARTIFACT], self.device)
        config = context.model_config
        self.defaults, self.max_images = dict(config["defaults"]), int(config["max_images"])

    # Typed, so that MLflow does not warn about untyped predict; the signature it is logged with still rules.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        rows = model_input.to_dict("records") or [{}]  # {"inputs": {}}: every field the model's default
        if len(rows) != 1:
            raise MlflowException.invalid_parameter_value(
                f"request: got {len(rows)} rows, allowed: one request (one row: "
                f'{{"inputs": {{"n": 4, "seed": 0}}}}) per call'
            )
        try:
            request = serving.check_request(self.model, rows[0], self.defaults, self.max_images)
        except serving.RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        images, _, _ = serving.draw(self.model, request, self.device)
        return images


mlflow.models.set_model(DiffusionModel())
