"""train-basic: the lesson's BasicUNet trained the toy way (uniform-noise corruption, predict x0, MSE).

    dvc repro train-basic
    python stages/train_basic.py                      # one process, CPU or the one GPU
    accelerate launch stages/train_basic.py           # as configured by `accelerate config`

Reads params `seed`, `data.n_train`, `basic.*`, `mlflow.*` and the dataset in data/dataset. Writes
models/basic/ (weights as safetensors + the MLflow run id), metrics/train_basic.json, and
plots/train_basic/ (loss curve TSV, sample grid PNG). Logs one MLflow run named train-basic.
"""

from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratch_diffusion import files, tracking
from scratch_diffusion.config import flatten, load_params, params_hash
from scratch_diffusion.data import load_split
from scratch_diffusion.images import grid, to_uint8
from scratch_diffusion.recipe import basic_parts, fit_basic
from scratch_diffusion.samplers import toy_sample
from scratch_diffusion.stage import run_stage
from scratch_diffusion.training import Checkpointing, resumable_run_id, stage_accelerator
from scratch_diffusion.training_report import report_training

DATA_ROOT = "data/dataset"
CHECKPOINTS = "checkpoints/train-basic"
OUT = "models/basic"


def main() -> None:
    params = load_params()
    p = params.basic
    used = {
        "seed": params.seed,
        "data.n_train": params.data.n_train,
        "basic": params.section("basic"),
        "mlflow": params.section("mlflow"),
    }
    images, _ = load_split(DATA_ROOT, train=True, n=params.data.n_train)

    accelerator, choice = stage_accelerator("train-basic", "basic", p.mixed_precision, p.channels_last)
    model = basic_parts(params)
    # Fixed start noise: grids from different steps and runs show the same "seeds" of digits.
    noise = torch.rand(p.sample_n, 1, 28, 28, generator=torch.Generator().manual_seed(params.seed))

    def sample_grid(net):
        net.eval()
        return grid(to_uint8(toy_sample(net, noise.to(accelerator.device), p.sample_steps)))

    main_proc = accelerator.is_main_process
    tags = {"params_hash": params_hash(used), "model": "basic_unet"}
    ckpt = None
    Path(CHECKPOINTS).mkdir(parents=True, exist_ok=True)  # a DVC output even when checkpointing is off (empty)
    if p.checkpoint_every:
        ckpt = Checkpointing(Path(CHECKPOINTS), p.checkpoint_every, p.checkpoints_keep, tags["params_hash"])
    resume_id = resumable_run_id(ckpt)
    logged_params = {**flatten(used), **choice.as_params()}
    run = (
        tracking.start_run(params.mlflow.experiment, "train-basic", logged_params, tags, resume_run_id=resume_id)
        if main_proc
        else None
    )
    with run or nullcontext() as active:
        # A resumed run continues its MLflow run: log only the steps it has not logged yet.
        logged = tracking.last_logged_step(active.info.run_id) if main_proc and resume_id else -1
        if ckpt is not None and main_proc:
            ckpt.run_id = active.info.run_id
        result = fit_basic(
            params,
            model,
            images,
            accelerator,
            choice.channels_last,
            on_log=lambda s, v: s > logged and tracking.log_metrics({"loss": v}, step=s),
            sample_every=p.sample_every,
            on_sample=lambda s, net: s > logged and tracking.log_image(sample_grid(net), key="samples", step=s),
            checkpointing=ckpt,
            desc="train-basic",
        )
        if not main_proc:
            return
        net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # plain forward: picklable for MLflow
        with files.atomic_path(f"{OUT}/model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        report_training(result, sample_grid(net), "metrics/train_basic.json", "plots/train_basic")
        # The weights beside the pickle: `generate` loads a registry model from them, without unpickling it.
        info = (
            tracking.log_torch_model(net.cpu(), extra_files=[f"{OUT}/model.safetensors"])
            if params.mlflow.log_model
            else None
        )
        files.write_json(
            f"{OUT}/run.json",
            {
                "run_id": active.info.run_id,
                "experiment_id": active.info.experiment_id,
                "model_uri": info.model_uri if info else None,
            },
        )
    return choice.as_params(prefix="")


if __name__ == "__main__":
    run_stage(main)
