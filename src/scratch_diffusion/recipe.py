"""One owner of a training run: from params to a trained model.

`train_model(network, params, stage=...)` is everything a training stage does, for each of the three networks (the
BasicUNet, the UNet2DModel and the classifier that judges their samples): it loads the training split, builds the
network (and, for the UNet2DModel, its noise schedule, loss and EMA) from the params, derives the run's
identity (params, data, code: identity.py) so that a checkpoint is resumed only by the run that made it, opens the
MLflow run (or continues the one its checkpoint belongs to), trains through `training.fit`, and saves the model
folder, the DVC metrics and plots and the MLflow model. The stages are a few lines around it; the ablation scripts
and the speed benchmark call it without a stage (no MLflow run, no checkpoints, no reports), so none of them can
retrace a stage and drift from it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from scratch_diffusion import files, serving, tracking, tuning
from scratch_diffusion.choices import PREDICTION_TYPES
from scratch_diffusion.config import Params, ParamsError, flatten, params_hash, training_epochs
from scratch_diffusion.corruption import ddpm_scheduler, flow_scheduler
from scratch_diffusion.data import DatasetInfo, dataset_digest, describe, load_split
from scratch_diffusion.hardware import Choice, choose, detect
from scratch_diffusion.identity import digest, run_identity
from scratch_diffusion.images import grid, to_uint8
from scratch_diffusion.model_files import save_basic, save_unet2d
from scratch_diffusion.models import Guided, build_network
from scratch_diffusion.models.classifier import CONFIG, Classifier, channel_stats
from scratch_diffusion.objectives import classifier_loss, ddpm_loss, flow_loss, toy_loss
from scratch_diffusion.samplers import fixed_noise, sample_images
from scratch_diffusion.training import (
    EMA,
    Checkpointing,
    Horizons,
    TrainResult,
    budget_line,
    claim_checkpoints,
    fit,
    planned_steps,
    resumable_run_id,
    stage_accelerator,
    timing_step,
)
from scratch_diffusion.training_report import report_training

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

NETWORKS = ("basic", "unet2d", "classifier")
DATA_ROOT = "data/dataset"


@dataclass
class Trained:
    """What a training run gives back. `model` is what gets saved and sampled: the EMA weights where the run keeps
    an EMA, else the trained weights, in eval mode on `device`."""

    model: torch.nn.Module
    scheduler: DDPMScheduler | None  # the noise schedule (UNet2DModel only)
    info: DatasetInfo  # what it trained on: the images' shape and classes
    result: TrainResult
    device: torch.device
    choice: Choice  # the precision and layout it trained with
    run_id: str | None  # the MLflow run (with a stage, on the main process)
    metrics: dict[str, float]  # what `evaluate` measured of the trained model (empty without it)
    averages: dict[int, torch.nn.Module]  # ema_warmups' averages by warm-up (empty without them)


def used_params(network: str, params: Params) -> dict:
    """The params a training of `network` reads: its MLflow params and the params part of its identity, from the
    sections its stage lists in dvc.yaml, less the keys its configuration never reads (Unet2dParams.unused)."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; allowed: {', '.join(NETWORKS)}")
    if network == "classifier":
        # Its own seed and the whole training split, so that `-S seed=...` or `data.n_train` change the models
        # judged, never the judge; inception_weights is compare's (for unlabelled data), never the training's.
        judge = {k: v for k, v in params.section("classifier").items() if k != "inception_weights"}
        return {"classifier": judge, "mlflow": {"experiment": params.mlflow.experiment}}
    used = {"seed": params.seed}
    if network == "unet2d":
        used["objective"] = params.objective
    # The logged model's request defaults: a toy-corruption BasicUNet has one sampler, so of its setting only steps.
    serve = params.section("serve")
    if network == "basic":
        serve = {k: serve[k] for k in ("max_images", "n", "toy_steps")}
    section = params.section(network)
    if network == "unet2d":
        section = {k: v for k, v in section.items() if k not in params.unet2d.unused(params.objective)}
    return {
        **used,
        "data.n_train": params.data.n_train,
        network: section,
        "mlflow": params.section("mlflow"),
        "serve": serve,
    }


def training_identity(
    network: str, params: Params, data_root: str | Path, scripts: tuple[str | Path, ...] = ()
) -> dict:
    """What a training of `network` depends on (identity.run_identity): its params, the dataset's bytes, and every
    source file that this module reaches, plus `scripts` (a stage's own file)."""
    # Not the logged model's request defaults: they change what predict draws by default, never the weights.
    used = {k: v for k, v in used_params(network, params).items() if k != "serve"}
    return run_identity(flatten(used), dataset_digest(data_root), [__file__, *scripts])


def noise_schedule(params: Params) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The UNet2DModel's noise schedule: DDPM's, with the objective as diffusers' prediction_type, or flow matching's
    straight path."""
    u = params.unet2d
    if params.objective == "flow":
        return flow_scheduler(u.num_train_timesteps)
    return ddpm_scheduler(
        u.num_train_timesteps, u.beta_schedule, u.beta_start, u.beta_end, PREDICTION_TYPES[params.objective]
    )


def unet2d_meta(params: Params) -> dict:
    """What models/unet2d/scratch_diffusion.json records beside diffusers' files (model_files.save_unet2d)."""
    u = params.unet2d
    return {
        "objective": params.objective,
        "corruption": u.corruption,
        "conditioning": u.conditioning,
        "ema_decay": u.ema_decay,
        "class_conditional": u.class_conditional,
    }


def dataset_meta(info: DatasetInfo) -> dict:
    """What a model folder records of the data it trained on (model_files.META): enough to draw images of its shape
    and to name its classes."""
    return {
        "dataset": info.name,
        "resolution": info.resolution,
        "channels": info.channels,
        "classes": list(info.classes),
    }


def seed_of(network: str, params: Params) -> int:
    """The seed of a training of `network`: the classifier's own, else params' `seed`."""
    return params.classifier.seed if network == "classifier" else params.seed


def _parts(network: str, params: Params, info: DatasetInfo, images: torch.Tensor | None = None):
    """(model, noise schedule or None, loss_fn, EMA or None, fit's per-network arguments), the initial weights drawn
    from the training's seed, the networks shaped for the dataset `info` describes (the classifier standardises its
    input by the training split `images`' channel statistics)."""
    if network == "classifier":
        if images is None:
            raise ValueError("_parts: the classifier needs its training split's images (their channel statistics)")
        mean, std = channel_stats(images)  # the whole training split's: on MNIST exactly 0.1307 and 0.3081
        torch.manual_seed(params.classifier.seed)
        model = Classifier(info.channels, info.resolution, info.num_classes, mean, std)
        return model, None, classifier_loss, None, {"lr_schedule": "cosine", "labelled": True}
    torch.manual_seed(params.seed)
    if network == "basic":
        return build_network(network, params.unet2d, info.channels, info.resolution), None, toy_loss, None, {}
    p = params.unet2d
    if p.class_conditional and not info.num_classes:  # preflight says so before any stage; this is for the others
        raise ParamsError(
            f"unet2d.class_conditional: got true, but the {info.name} dataset is unlabelled (no class folders); "
            "allowed: false, or a folder with one subfolder per class"
        )
    model = build_network(network, p, info.channels, info.resolution, info.num_classes)
    scheduler = noise_schedule(params)
    if p.corruption == "toy":
        loss_fn = toy_loss
    elif params.objective == "flow":
        loss_fn = flow_loss(
            p.num_train_timesteps,
            p.time_sampling,
            p.logit_mean,
            p.logit_std,
            label_dropout=p.label_dropout,
            null_label=model.null_label,
        )
    else:
        loss_fn = ddpm_loss(
            scheduler,
            params.objective,
            p.loss_weighting,
            p.min_snr_gamma,
            label_dropout=p.label_dropout,
            null_label=model.null_label,
        )
    ema = EMA(model, p.ema_decay, p.ema_warmup) if p.ema_decay > 0 else None
    extra = {
        "grad_clip": p.grad_clip,
        "lr_schedule": p.lr_schedule,
        "warmup_steps": p.lr_warmup_steps,
        "labelled": p.class_conditional,
    }
    return model, scheduler, loss_fn, ema, extra


def _tuner(network: str, params: Params, model, loss_fn, images, labels, info: DatasetInfo):
    """tune(rule, device, processes) -> Choice for training.stage_accelerator: `auto` timed on this run's own step
    (its network, loss, batch size and data) where the run is long enough to pay for it (tuning.resolve)."""
    section = getattr(params, network)
    batch = images[: section.batch_size]
    epochs = training_epochs(section.epochs, info.name, len(images))

    def tune(rule: Choice, device: torch.device, processes: int) -> Choice:
        steps = planned_steps(section, epochs, len(images), processes)
        key = {
            **tuning.machine_key(device, processes),
            "network": network,
            "architecture": tuning.network_key(model),
            "image_shape": list(info.shape),
        }
        y = labels[: len(batch)] if labels is not None else None
        return tuning.resolve(
            rule,
            section.mixed_precision,
            section.channels_last,
            training=True,
            steps=steps,
            batch=len(batch),
            key=key,
            run_step=timing_step(model, loss_fn, batch, y, lr=section.lr, device=device),
            device=device,
        )

    return tune


def stage_choice(network: str, params: Params, data_root: str | Path = DATA_ROOT) -> Choice:
    """What a training of `network` at `params` runs with on this machine (one process), without training: the
    same resolution as train_model's, so `auto` is timed now or read from the cache (benchmarks/speed.py)."""
    section = getattr(params, network)
    images, labels = load_split(data_root, train=True, n=params.data.n_train)
    info = describe(data_root)
    model, _, loss_fn, _, extra = _parts(network, params, info, images)
    tune = _tuner(network, params, model, loss_fn, images, labels if extra.get("labelled") else None, info)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return tune(choose(network, section.mixed_precision, section.channels_last, detect(device.type)), device, 1)


def _grid_maker(
    network: str, params: Params, scheduler, device, info: DatasetInfo
) -> Callable[[torch.nn.Module], object]:
    """A function net -> sample grid (uint8, grey or RGB as the data) from a fixed start noise of the dataset's
    shape, so grids of different steps and runs show the same "seeds" of images. The lesson's sampler for
    toy-corruption models, DDIM for DDPM ones."""
    p = getattr(params, network)
    corruption = "toy" if network == "basic" else p.corruption
    sampler = "toy" if corruption == "toy" else "ddim"
    noise = fixed_noise(p.sample_n, corruption, params.seed, info.shape)
    conditional = network == "unet2d" and p.class_conditional
    config = scheduler.config if scheduler is not None else None

    def make(net: torch.nn.Module):
        net.eval()
        if conditional:  # the classes in turn along each row (0..9 for MNIST), plain conditional
            net = Guided(net, torch.arange(p.sample_n) % info.num_classes, scale=1.0)
        x01, _ = sample_images(net, sampler, p.sample_steps, noise.to(device), config, seed=params.seed)
        return grid(to_uint8(x01))

    return make


def train_model(
    network: str,
    params: Params,
    *,
    stage: str | None = None,
    out: str | Path | None = None,
    data_root: str | Path = DATA_ROOT,
    ema_warmups: tuple[int, ...] = (),
    on_sample: Callable[[int, torch.nn.Module], None] | None = None,
    sample_every: int = 0,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    desc: str | None = None,
) -> Trained:
    """Train `network` ('basic', 'unet2d' or 'classifier') as params say.

    With `stage` (e.g. 'train-unet2d'), the run is that stage's: an MLflow run of that name with the params, loss
    and sample grids; checkpoints in checkpoints/<stage>/ resumed only by a run of the same identity (others are
    cleared); model files in `out`, metrics/<stage>.json, plots/<stage>/ and the logged (for the UNet2DModel,
    registered) MLflow model. Without a stage, only training, and the model files in `out` if given.
    `ema_warmups` keeps, in place of the run's own EMA, one average per warm-up at the run's ema_decay (EMA horizons
    compared from one training; without a stage), returned in `Trained.averages`. `on_sample(step, model)` is
    called every `sample_every` steps (with a stage: at its grids, every `sample_every` of its params) with the
    averaged weights.
    `evaluate(model)` measures the trained model (the classifier's test accuracy) on the main process; its metrics
    are logged to the run and returned in `Trained.metrics`.

    The classifier (the judge) trains on the whole training split in fp32 NCHW on every machine, never timed: its
    features are FID's scale, which must not move with the machine's fastest arithmetic. It has no sample grids, no
    DVC plots and no logged MLflow model; its stage writes its metrics file.
    """
    if stage is not None and out is None:
        raise ValueError(f"stage {stage!r}: `out`, the model folder, is needed")
    if ema_warmups and (stage is not None or network != "unet2d"):
        raise ValueError("ema_warmups: the UNet2DModel's, without a stage (a stage's run keeps its params' one EMA)")
    used = used_params(network, params)  # refuses an unknown network
    section, desc = getattr(params, network), desc or stage or network
    judge = network == "classifier"
    n_train = None if judge else params.data.n_train
    images, labels = load_split(data_root, train=True, n=n_train)  # (N, C, H, W) uint8
    info = describe(data_root)
    model, scheduler, loss_fn, own_ema, extra = _parts(network, params, info, images)
    labelled = extra.pop("labelled", False)

    if judge:
        accelerator, choice = stage_accelerator(desc, network, "fp32", False)
    else:
        tune = _tuner(network, params, model, loss_fn, images, labels if labelled else None, info)
        accelerator, choice = stage_accelerator(desc, network, section.mixed_precision, section.channels_last, tune)
    epochs = training_epochs(section.epochs, info.name, len(images))
    if stage is not None and accelerator.is_main_process:
        print(budget_line(stage, section, epochs, len(images), accelerator.num_processes, choice), flush=True)
    averaging = Horizons(model, params.unet2d.ema_decay, ema_warmups) if ema_warmups else own_ema
    main = accelerator.is_main_process

    def averaged(m: torch.nn.Module) -> torch.nn.Module:
        return averaging.model if averaging is not None else accelerator.unwrap_model(m, keep_fp32_wrapper=False)

    ckpt, run, resume_id, sample_grid = None, None, None, None
    held = ExitStack()  # the checkpoint folder's lock, for the whole run
    if stage is not None:
        sample_grid = None if judge else _grid_maker(network, params, scheduler, accelerator.device, info)
        script = sys.argv[0]  # the stage's own file, as Python was asked to run it
        identity = training_identity(
            network, params, data_root, (script,) if script.endswith(".py") and Path(script).is_file() else ()
        )
        # What `auto` resolved to and where: the same params give other arithmetic elsewhere.
        identity["ran_with"] = {
            "processes": accelerator.num_processes,
            "device": accelerator.device.type,
            "precision": choice.precision,
            "channels_last": choice.channels_last,
        }
        if section.checkpoint_every:
            # Not a DVC output (DVC would put its cached copy back in place of a killed experiment's): at the root
            # of the repository, which for a queued experiment is the one it came from, in a folder per identity.
            root = tracking.repo_root()
            stage_dir = (Path() if root == Path.cwd().resolve() else root) / "checkpoints" / stage
            folder = (
                held.enter_context(claim_checkpoints(stage_dir, identity)) if main else stage_dir / digest(identity)
            )
            ckpt = Checkpointing(folder, section.checkpoint_every, section.checkpoints_keep, identity)
        resume_id = resumable_run_id(ckpt)
        tags = {"params_hash": params_hash(used), "inputs": digest(identity), "model": _MODEL_TAG[network]}
        if network == "unet2d":
            tags["objective"] = params.objective
        # Not `serve`: it is the logged model's (its params and registry tags), and a run resumed from its final
        # checkpoint after a change of serve (the same identity) may not change the values its params hold.
        logged_params = {**flatten({k: v for k, v in used.items() if k != "serve"}), **choice.as_params()}
        if main:
            run = tracking.start_run(params.mlflow.experiment, stage, logged_params, tags, resume_run_id=resume_id)

    with held, run or nullcontext() as active:
        hooks = {"on_sample": on_sample, "sample_every": sample_every} if on_sample is not None else {}
        if stage is not None:
            # A resumed run continues its MLflow run: log only the steps it has not logged yet. The hooks are the
            # same on every process (fit synchronises the processes around a grid); only the main one calls them.
            logged = tracking.last_logged_step(active.info.run_id) if active is not None and resume_id else -1
            if ckpt is not None and active is not None:
                ckpt.run_id = active.info.run_id

            def log_grid(step: int, net: torch.nn.Module) -> None:
                if step > logged:
                    tracking.log_image(sample_grid(net), key="samples", step=step)
                if on_sample is not None:
                    on_sample(step, net)

            hooks = {"on_log": lambda s, v: s > logged and tracking.log_metrics({"loss": v}, step=s)}
            if sample_grid is not None:
                hooks |= {"on_sample": log_grid, "sample_every": section.sample_every}
        result = fit(
            model,
            loss_fn,
            images,
            accelerator,
            batch_size=section.batch_size,
            lr=section.lr,
            epochs=epochs,
            seed=seed_of(network, params),
            max_steps=section.max_steps,
            ema=averaging,
            log_every=section.log_every,
            labels=labels if labelled else None,
            checkpointing=ckpt,
            channels_last=choice.channels_last,
            desc=desc,
            **extra,
            **hooks,
        )
        if main and accelerator.num_processes == 1:  # the timing was of one process's steps
            tuning.check_rate(desc, choice, result.images_per_s)
        final = averaged(model).eval()
        run_id = active.info.run_id if active else None
        averages = {w: e.model.eval() for w, e in averaging.emas.items()} if ema_warmups else {}
        trained = Trained(final, scheduler, info, result, accelerator.device, choice, run_id, {}, averages)
        if evaluate is not None and main:
            trained.metrics = evaluate(final)
            if active is not None:
                tracking.log_metrics({**trained.metrics, "final_loss": result.final_loss, "wall_s": result.wall_s})
        if out is not None and main:
            _save(
                network,
                params,
                trained,
                Path(out),
                run=active,
                sample_grid=sample_grid,
                stage=stage,
                used=used,
                data_root=data_root,
            )
    return trained


def judged_data(info: DatasetInfo, data_root: str | Path) -> dict:
    """What models/classifier/config.json records of the data a judge is for (metrics.read_config refuses any
    other): the dataset, its digest, the images' shape and the number of classes."""
    return {
        "dataset": info.name,
        "dataset_digest": dataset_digest(data_root),
        "channels": info.channels,
        "resolution": info.resolution,
        "num_classes": info.num_classes,
    }


_MODEL_TAG = {"basic": "basic_unet", "unet2d": "unet2d", "classifier": "classifier"}


def _save(
    network: str, params: Params, trained: Trained, out: Path, *, run, sample_grid, stage, used, data_root
) -> None:
    """The model folder; with a stage's run, also its DVC metrics and plots, the MLflow model and run.json."""
    net = trained.model
    if network == "classifier":  # its weights and what rebuilds it for the data it judges (Judge.from_files)
        with files.atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in net.cpu().state_dict().items()}, str(tmp))
        files.write_json(out / CONFIG, {"judge": True, **judged_data(trained.info, data_root), **net.config()})
        if run is not None:
            files.write_json(out / "run.json", {"run_id": run.info.run_id})
        return
    if network == "basic":
        corruption, conditional = "toy", False
        save_basic(out, net, dataset_meta(trained.info))
    else:
        meta = {**unet2d_meta(params), **dataset_meta(trained.info), "run_id": run.info.run_id if run else ""}
        corruption, conditional = meta["corruption"], meta["class_conditional"]
        save_unet2d(out, net, trained.scheduler, meta)
    if run is None:
        return
    name = stage.replace("-", "_")
    report_training(trained.result, sample_grid(net), f"metrics/{name}.json", f"plots/{name}")
    registered = getattr(params, network).registered_model
    info = None
    # A class-conditional model's classes, by the dataset's names in label order (what a request's `class` names).
    classes = {"classes": json.dumps(list(trained.info.classes), ensure_ascii=False)} if conditional else {}
    if params.mlflow.log_model:
        info = serving.log_model(
            out,
            image_shape=tuple(net.image_shape),
            defaults=params.serve.defaults(corruption, conditional),
            max_images=params.serve.max_images,
            registered_name=registered,
            tags=flatten(used) | classes,
        )
        where = f"registry version models:/{registered}/{info.registered_model_version}" if registered else ""
        print(f"{stage}: logged the model as {where or info.model_uri} (mlflow models serve -m ...)", flush=True)
    record = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "model_uri": info.model_uri if info else None,
        "registered_model": registered if info else None,
        "registered_version": info.registered_model_version if info else None,
    }
    files.write_json(out / "run.json", record)
