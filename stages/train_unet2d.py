"""train-unet2d: diffusers' UNet2DModel trained the DDPM way (or the toy way), objective and schedule as params.

    dvc repro train-unet2d
    dvc exp run -S objective=eps                      # or v; -S unet2d.corruption=toy; -S unet2d.conditioning=none
    python stages/train_unet2d.py
    accelerate launch stages/train_unet2d.py

Reads params `seed`, `objective`, `data.n_train`, `unet2d.*`, `mlflow.*` and data/dataset. Writes models/unet2d/
(a diffusers DDPMPipeline folder: unet + scheduler with the right prediction_type, plus scratch_diffusion.json and
the MLflow run id), metrics/train_unet2d.json and plots/train_unet2d/. Logs one MLflow run named train-unet2d and
registers the model under `unet2d.registered_model`.
"""

from contextlib import nullcontext
from pathlib import Path

import torch

from scratch_diffusion import files, tracking
from scratch_diffusion.config import flatten, load_params, params_hash
from scratch_diffusion.data import NUM_CLASSES, load_split
from scratch_diffusion.images import grid, to_uint8
from scratch_diffusion.model_files import META, save_unet2d
from scratch_diffusion.models import Guided
from scratch_diffusion.recipe import fit_unet2d, unet2d_parts
from scratch_diffusion.samplers import fixed_noise, sample_images
from scratch_diffusion.stage import run_stage
from scratch_diffusion.training import Checkpointing, resumable_run_id, stage_accelerator
from scratch_diffusion.training_report import report_training

DATA_ROOT = "data/dataset"
CHECKPOINTS = "checkpoints/train-unet2d"
OUT = "models/unet2d"


def main() -> None:
    params = load_params()
    p = params.unet2d
    used = {
        "seed": params.seed,
        "objective": params.objective,
        "data.n_train": params.data.n_train,
        "unet2d": params.section("unet2d"),
        "mlflow": params.section("mlflow"),
    }
    images, labels = load_split(DATA_ROOT, train=True, n=params.data.n_train)

    accelerator, choice = stage_accelerator("train-unet2d", "unet2d", p.mixed_precision, p.channels_last)
    parts = unet2d_parts(params)
    model, scheduler, _, ema = parts
    # Same start noise for every grid: comparable across steps and runs. DDIM for DDPM models, the lesson's
    # sampler for toy ones.
    sampler = "toy" if p.corruption == "toy" else "ddim"
    noise = fixed_noise(p.sample_n, p.corruption, params.seed)

    def sample_grid(net):
        net.eval()
        if p.class_conditional:  # digits 0..9 along each row, plain conditional
            net = Guided(net, torch.arange(p.sample_n) % NUM_CLASSES, scale=1.0)
        x01, _ = sample_images(
            net, sampler, p.sample_steps, noise.to(accelerator.device), scheduler.config, seed=params.seed
        )
        return grid(to_uint8(x01))

    main_proc = accelerator.is_main_process
    tags = {"params_hash": params_hash(used), "model": "unet2d", "objective": params.objective}
    ckpt = None
    Path(CHECKPOINTS).mkdir(parents=True, exist_ok=True)  # a DVC output even when checkpointing is off (empty)
    if p.checkpoint_every:
        ckpt = Checkpointing(Path(CHECKPOINTS), p.checkpoint_every, p.checkpoints_keep, tags["params_hash"])
    resume_id = resumable_run_id(ckpt)
    logged_params = {**flatten(used), **choice.as_params()}
    run = (
        tracking.start_run(params.mlflow.experiment, "train-unet2d", logged_params, tags, resume_run_id=resume_id)
        if main_proc
        else None
    )
    with run or nullcontext() as active:
        # A resumed run continues its MLflow run: log only the steps it has not logged yet.
        logged = tracking.last_logged_step(active.info.run_id) if main_proc and resume_id else -1
        if ckpt is not None and main_proc:
            ckpt.run_id = active.info.run_id
        result = fit_unet2d(
            params,
            parts,
            images,
            labels,
            accelerator,
            choice.channels_last,
            on_log=lambda s, v: s > logged and tracking.log_metrics({"loss": v}, step=s),
            sample_every=p.sample_every,
            on_sample=lambda s, net: s > logged and tracking.log_image(sample_grid(net), key="samples", step=s),
            checkpointing=ckpt,
            desc="train-unet2d",
        )
        if not main_proc:
            return
        final = ema.model if ema is not None else accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        meta = {
            "objective": params.objective,
            "corruption": p.corruption,
            "conditioning": p.conditioning,
            "ema_decay": p.ema_decay,
            "class_conditional": p.class_conditional,
            "run_id": active.info.run_id,
        }
        save_unet2d(OUT, final, scheduler, meta)
        report_training(result, sample_grid(final), "metrics/train_unet2d.json", "plots/train_unet2d")
        info = None
        if params.mlflow.log_model:
            info = tracking.log_torch_model(
                final.cpu(),
                registered_name=p.registered_model,
                tags=flatten(used),
                # What `generate` loads a registry model from, without unpickling it.
                extra_files=[
                    f"{OUT}/unet/config.json",
                    f"{OUT}/unet/diffusion_pytorch_model.safetensors",
                    f"{OUT}/scheduler/scheduler_config.json",
                    f"{OUT}/{META}",
                ],
            )
        files.write_json(
            f"{OUT}/run.json",
            {
                "run_id": active.info.run_id,
                "experiment_id": active.info.experiment_id,
                "model_uri": info.model_uri if info else None,
                "registered_model": p.registered_model if info else None,
                "registered_version": info.registered_model_version if info else None,
            },
        )
    return choice.as_params(prefix="")


if __name__ == "__main__":
    run_stage(main)
