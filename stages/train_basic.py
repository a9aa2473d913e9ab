"""train-basic: the lesson's BasicUNet trained the toy way (uniform-noise corruption, predict x0, MSE).

    dvc repro train-basic
    python stages/train_basic.py                      # one process, CPU or the one GPU
    accelerate launch stages/train_basic.py           # as configured by `accelerate config`

Reads params `seed`, `data.n_train`, `basic.*`, `mlflow.*` and the dataset in data/dataset. Writes
models/basic/ (weights as safetensors + the MLflow run id), metrics/train_basic.json, and
plots/train_basic/ (loss curve TSV, sample grid PNG). Logs one MLflow run named train-basic. Resumes from
checkpoints/train-basic/ only a run of the same params, data and code.
"""

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion.config import load_params
from scratch_diffusion.recipe import train_model
from scratch_diffusion.stage import run_stage


def main() -> dict:
    trained = train_model("basic", load_params(), stage="train-basic", out="models/basic")
    return trained.choice.as_params(prefix="")


if __name__ == "__main__":
    run_stage(main)
