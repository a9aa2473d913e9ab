"""visualize-schedule: the forward process and the toy sampler made visible, as the lesson draws them.

    dvc repro visualize-schedule
    python stages/visualize_schedule.py

Reads params `seed`, `unet2d.num_train_timesteps`, `unet2d.beta_schedule`, `unet2d.beta_start`,
`unet2d.beta_end`, `mlflow.experiment`, the first test images in data/dataset (at the dataset's resolution and
channels) and the BasicUNet in models/basic, sampled at the image shape it was trained on.
Writes plots/schedule/{schedules,corruption,sampling_steps}.png and logs them to an MLflow run of the same name.
"""

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion import tracking
from scratch_diffusion.config import load_params
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.data import load_split
from scratch_diffusion.figures import plot_corruption, plot_sampling_steps, plot_schedules, schedule_curves
from scratch_diffusion.model_files import load_basic
from scratch_diffusion.samplers import fixed_noise, toy_sample
from scratch_diffusion.stage import StageError, run_stage

OUT = "plots/schedule"
N_IMAGES = 8
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


def main() -> None:
    params = load_params()
    u = params.unet2d
    try:
        net = load_basic("models/basic")
    except OSError as e:  # missing, or model_files.ModelFileError
        raise StageError(str(e)) from None
    images, _ = load_split("data/dataset", train=False, n=N_IMAGES)  # (N, C, H, W) uint8
    used = {"seed": params.seed, **{f"unet2d.{k}": getattr(u, k) for k in SCHEDULE_KEYS}}

    plot_schedules(
        schedule_curves(u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end), f"{OUT}/schedules.png"
    )
    scheduler = ddpm_scheduler(u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end)
    plot_corruption(images.float() / 255, scheduler, f"{OUT}/corruption.png", seed=params.seed)
    noise = fixed_noise(N_IMAGES, "toy", params.seed, net.image_shape)
    _, inputs, preds = toy_sample(net, noise, steps=5, record=True)
    plot_sampling_steps(inputs, preds, f"{OUT}/sampling_steps.png")

    with tracking.start_run(params.mlflow.experiment, "visualize-schedule", used, {}):
        for name in ("schedules", "corruption", "sampling_steps"):
            tracking.log_artifact(f"{OUT}/{name}.png", artifact_path="figures")


if __name__ == "__main__":
    run_stage(main)
