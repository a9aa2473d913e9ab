"""sample: every sampler setting in params on the trained models, as arrays, grids and timings.

    dvc repro sample
    python stages/sample.py

Reads params `sample.*`, `mlflow.experiment`, and models/basic, models/unet2d (only those its settings name).
Writes samples/<model>/<sampler>-<steps>.npz (uint8, key `images`: N x H x W for one-channel data, N x H x W x 3 for
RGB, the shape the model was trained on), plots/sample/<model>-<sampler>-<steps>.png (a grid of the first 64),
metrics/sample.json (NFE, seconds per image per setting). A class-conditional UNet2DModel is sampled once per
guidance scale: <sampler>-<steps>-g<scale>.npz, with the classes asked for (sample.classes, as indices) under key
`labels` and a grid of one class per column. Logs one MLflow run named `sample`, tagged with the ids of the training
runs it used.
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)
import numpy as np
import torch
from tqdm.auto import tqdm

from scratch_diffusion import files, serving, tracking, tuning
from scratch_diffusion.config import flatten, load_params
from scratch_diffusion.data import describe
from scratch_diffusion.images import class_columns, grid, save_png
from scratch_diffusion.models import Guided
from scratch_diffusion.samplers import expected_evaluations, generate, samplers_for, sampling_choice, trained_with
from scratch_diffusion.stage import StageError, duration, run_stage

DATA_ROOT = "data/dataset"
MODEL_DIRS = {"basic": Path("models/basic"), "unet2d": Path("models/unet2d")}
GRID_N = 64


def load_models(names: set[str], device) -> dict:
    """{name: (denoiser, corruption, trained scheduler config or None, training run id, class names: empty unless
    class-conditional)}"""
    loaded = {}
    for name in sorted(names):
        path = MODEL_DIRS[name]
        try:  # the loader of generate and the logged MLflow model
            model = serving.load(path, device, name)
        except OSError as e:  # missing, or model_files.ModelFileError: truncated, corrupt, not ours
            raise StageError(str(e)) from None
        run_file = path / "run.json"
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else ""
        loaded[name] = (model.net, model.corruption, model.trained_config, run_id, model.classes)
    return loaded


def main() -> None:
    params = load_params()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = load_models({s.model for s in params.sample.settings}, device)
    # sample.n `auto` takes its value from the test split's size: one n for this run, resolved once.
    data = describe(DATA_ROOT)
    sp = replace(params.sample, n=params.sample.size(data.n_test))
    asked = sp.class_indices(data.classes) if data.classes else ()
    # Every setting must fit its model before any sampling starts.
    for i, s in enumerate(sp.settings):
        corruption = models[s.model][1]
        # A class-conditional model must have the data's classes (preflight checked the asked ones against the data;
        # the model may be older than it).
        if (mine := models[s.model][4]) and mine != data.classes:
            raise StageError(
                f"{MODEL_DIRS[s.model]}: trained on the classes {list(mine)!r}, but {DATA_ROOT} has "
                f"{list(data.classes)!r}; retrain it (`dvc repro -f train-{s.model}`)"
            )
        config = models[s.model][2]
        if s.sampler not in (allowed := samplers_for(corruption, config)):
            raise StageError(
                f"sample.settings[{i}].sampler: got {s.sampler!r} for {s.model}, which was trained with "
                f"{trained_with(corruption, config)}; allowed: {', '.join(allowed)}"
            )

    used = {"sample": params.section("sample"), "mlflow.experiment": params.mlflow.experiment}
    used["sample"]["settings"] = [s.name for s in sp.settings]
    tags = {f"train_run_{name}": m[3] for name, m in models.items()}
    # One sample set per setting; a class-conditional model's settings once per guidance scale, asking for
    # sample.classes cycled over the n images (so that each grid column holds one class: images.class_columns).
    labels = torch.tensor([asked[i % len(asked)] for i in range(sp.n)]) if asked else None
    jobs = []
    for s in sp.settings:
        if models[s.model][4]:
            jobs += [(f"{s.name}-g{g:g}", s, g) for g in sp.guidance_scales]
        else:
            jobs.append((s.name, s, None))
    # Each model evaluates in its own precision and layout: `auto` timed on it where the calls ahead pay for it.
    choices, batches = {}, -(-sp.n // sp.batch_size)
    for name in sorted(models):
        calls = sum(
            batches * expected_evaluations(s.sampler, s.steps) * (len(sp.guidance_scales) if models[name][4] else 1)
            for s in sp.settings
            if s.model == name
        )
        batch = min(sp.batch_size, sp.n)
        choices[name] = sampling_choice(
            models[name][0], sp.precision, sp.channels_last, device, batch=batch, evaluations=calls
        )
        choices[name].announce(f"sample {name}")
    timings = {}
    evaluated = {name: [0, 0.0] for name in choices}  # images through each model, seconds: its evaluation rate
    bar = tqdm(total=sp.n * len(jobs), desc="sample", unit="img", disable=not sys.stderr.isatty())
    resolved = {k: v for name, c in choices.items() for k, v in c.as_params(f"resolved.{name}.").items()}
    logged_params = {**flatten(used), **resolved}
    with tracking.start_run(params.mlflow.experiment, "sample", logged_params, tags) as active:
        for name, s, scale in jobs:
            model, corruption, config, *_ = models[s.model]
            bar.set_postfix_str(name)
            guidance = {} if scale is None else {"labels": labels, "guidance_scale": scale}
            start = time.perf_counter()
            images, nfe = generate(
                model,
                s.sampler,
                s.steps,
                sp.n,
                batch_size=sp.batch_size,
                seed=sp.seed,
                corruption=corruption,
                trained_config=config,
                device=device,
                eta=s.eta,
                shift=s.shift,
                precision=choices[s.model].precision,
                channels_last=choices[s.model].channels_last,
                progress=progress_reporter(name, sp.n, start, bar),
                **guidance,
            )
            seconds = time.perf_counter() - start
            evaluated[s.model][0] += sp.n * nfe * (1 if scale is None else Guided.batch_multiple(scale))
            evaluated[s.model][1] += seconds
            arrays = {"images": images} if scale is None else {"images": images, "labels": labels.numpy()}
            with files.atomic_path(f"samples/{name}.npz") as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
            if scale is None:
                picture = grid(images[:GRID_N])
            else:
                picture = grid(images[:100], nrow=class_columns(len(asked), len(images[:100])))
            save_png(f"plots/sample/{name.replace('/', '-')}.png", picture)
            key = name.replace("/", "-").replace("+", "p")  # MLflow metric/image keys: no '+'
            tracking.log_image(picture, key=f"samples-{key}", step=0)
            timings[name] = {
                "n": sp.n,
                "nfe": nfe,
                "seconds_per_image": seconds / sp.n,
                "images_per_s": sp.n / seconds,
                **({} if scale is None else {"guidance_scale": scale}),
            }
            tracking.log_metrics({f"{key}.seconds_per_image": seconds / sp.n, f"{key}.nfe": nfe})
            print(f"sample: {name}: {sp.n} images, NFE {nfe}, {seconds / sp.n * 1000:.1f} ms/image", flush=True)
        bar.close()
        for name, (images_through, seconds) in evaluated.items():
            if seconds > 0:
                tuning.check_rate(f"sample {name}", choices[name], images_through / seconds)
        files.write_json("metrics/sample.json", timings)
        files.write_json("samples/run.json", {"run_id": active.info.run_id})
    return {k: v for name, c in choices.items() for k, v in c.as_params(f"{name}.").items()}


def progress_reporter(name: str, n: int, start: float, bar):
    """The progress callback of one setting: advances the bar and, off a terminal, after the first batch says how
    long the setting will take (the first batch's rate, so an estimate)."""
    done = 0

    def report(batch: int) -> None:
        nonlocal done
        bar.update(batch)
        done += batch
        if done == batch and done < n and bar.disable:
            rate = done / (time.perf_counter() - start)
            print(
                f"sample: {name}: {rate:.1f} img/s; about {duration((n - done) / rate)} left for this setting",
                flush=True,
            )

    return report


if __name__ == "__main__":
    run_stage(main)
