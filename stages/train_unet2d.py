"""train-unet2d: diffusers' UNet2DModel trained the DDPM way (or by flow matching, or the toy way), objective and
schedule as params.

    dvc repro train-unet2d
    dvc exp run -S objective=eps                  # or v, flow; -S unet2d.corruption=toy; -S unet2d.conditioning=none
    python stages/train_unet2d.py
    accelerate launch stages/train_unet2d.py

Reads params `seed`, `objective`, `data.n_train`, `unet2d.*`, `mlflow.*` and data/dataset. Writes models/unet2d/
(a diffusers DDPMPipeline folder: unet + scheduler, DDPMScheduler with the right prediction_type or flow matching's
FlowMatchEulerDiscreteScheduler, plus scratch_diffusion.json and the MLflow run id), metrics/train_unet2d.json and
plots/train_unet2d/. Logs one MLflow run named train-unet2d and registers the model under `unet2d.registered_model`.
Resumes from checkpoints/train-unet2d/ only a run of the same params, data and code.
"""

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion.config import load_params
from scratch_diffusion.recipe import train_model
from scratch_diffusion.stage import run_stage


def main() -> dict:
    trained = train_model("unet2d", load_params(), stage="train-unet2d", out="models/unet2d")
    return trained.choice.as_params(prefix="")


if __name__ == "__main__":
    run_stage(main)
