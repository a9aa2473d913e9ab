"""Images from a trained model on request: the one loader and the one request behind `scratch-diffusion generate`,
the sample stage and the logged MLflow model (mlflow_model.py, which `mlflow models serve` runs).

A request names `n`, `seed`, `sampler`, `steps`, `eta`, for a flow model `shift`, and, for a class-conditional model,
`class` (names or indices, cycled over the n images) and `guidance_scale`; a field left out takes the caller's
default (the logged model's own, set from params.yaml's `serve`). `check_request` refuses a bad field in one line (the
field, the value, what is allowed) before anything is drawn; `draw` turns a checked request into uint8 images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratch_diffusion import tracking
from scratch_diffusion.choices import class_index
from scratch_diffusion.config import MAX_SEED, MAX_SHIFT, max_sample_steps
from scratch_diffusion.corruption import is_flow
from scratch_diffusion.model_files import META, load_basic, load_unet2d
from scratch_diffusion.samplers import expected_evaluations, generate, samplers_for, sampling_choice, trained_with

# Images per model call, for generate and the logged model alike: a stochastic sampler (ddpm, ddim with eta > 0)
# seeds each batch on its own, so the same request draws the same images only at the same batch size.
BATCH_SIZE = 250
FIELDS = ("n", "seed", "sampler", "steps", "eta", "shift", "class", "guidance_scale")
MAX_GUIDANCE = 50.0
# The folder of a logged model that holds the trained model's files (the artifact's name in mlflow_model.py).
ARTIFACT = "model"
# What MLflow prints on registering a model version (eprint, to stderr): the stage says it in its own line.
_REGISTERED = re.compile(r"(Successfully registered model|Created version|Registered model) '")


class RequestError(ValueError):
    """A request field that is not allowed; `str(e)` is one line: the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(self.named(field))

    def named(self, name: str) -> str:
        """The message with the field called `name` (the CLI's `--digit` for `class`)."""
        return f"{name}: got {self.value!r}, allowed: {self.allowed}"


@dataclass(frozen=True)
class Drawable:
    """A trained model ready to draw: the denoiser, its corruption, its trained scheduler config (None for the toy
    corruption) and the names of its classes (empty unless class-conditional)."""

    net: torch.nn.Module
    corruption: str
    trained_config: Any
    classes: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.net.image_shape)

    def samplers(self) -> tuple[str, ...]:
        return samplers_for(self.corruption, self.trained_config)


def load(path: str | Path, device="cpu", network: str | None = None) -> Drawable:
    """The model in a folder that train-basic or train-unet2d wrote (or its copy inside a logged MLflow model), of
    the kind `network` ('basic', 'unet2d'; None: as the folder holds). Weights load from safetensors only. Raises
    FileNotFoundError or model_files.ModelFileError (both OSError)."""
    path = Path(path)
    if network == "basic" or (network is None and (path / "model.safetensors").is_file()):
        return Drawable(load_basic(path, device), "toy", None, ())
    net, scheduler, meta = load_unet2d(path, device)
    classes = ()
    if net.null_label is not None:  # names as the dataset has them; indices for folders that do not record them
        recorded = meta.get("classes") or []
        classes = tuple(recorded) if len(recorded) == net.null_label else tuple(map(str, range(net.null_label)))
    return Drawable(net, meta["corruption"], scheduler.config, classes)


def logged_model_folder(local: str | Path) -> Path | None:
    """Where the model's own files are inside a downloaded MLflow model: the pyfunc's `model` artifact (as its
    MLmodel file names it), or `extra_files` beside the pickle of a pytorch-flavour model logged by older versions
    of the training stages. None when it holds neither: that model could only be loaded by unpickling it."""
    import yaml

    local = Path(local)
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        found = local / flavor["artifacts"][ARTIFACT]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        found = local / "extra_files"
    return found if (found / META).is_file() else None


@dataclass(frozen=True)
class Request:
    """A checked request. `classes` are indices, cycled over the n images (None: the model is unconditional)."""

    n: int
    seed: int
    sampler: str
    steps: int
    eta: float
    classes: tuple[int, ...] | None
    guidance_scale: float | None
    shift: float = 1.0


def _plain(value: Any) -> Any:
    """A JSON or DataFrame value as plain Python: numpy scalars unwrapped, arrays as lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def missing(value: Any) -> bool:
    """A field left out: absent, null, or the NaN a DataFrame puts in a column that a row lacks."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integer(field: str, value: Any, lo: int, hi: int | None, why: str = "") -> int:
    allowed = f"an integer {lo}..{hi}{why}" if hi is not None else f"an integer >= {lo}{why}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise RequestError(field, value, allowed)
    if value < lo or (hi is not None and value > hi):
        raise RequestError(field, value, allowed.removeprefix("an integer "))
    return int(value)


def _number(field: str, value: Any, lo: float, hi: float, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(field, value, f"a number {lo:g}..{hi:g}{why}")
    return float(value)


def _class_index(model: Drawable, value: Any) -> int:
    """A class by its name (as the dataset names it) or its index."""
    try:
        return class_index(model.classes, value)
    except ValueError as e:
        raise RequestError("class", value, str(e)) from None


def check_request(
    model: Drawable, raw: Mapping[str, Any], defaults: Mapping[str, Any], max_images: int | None = None
) -> Request:
    """`raw` (field -> value; a missing field takes `defaults`) checked against `model`; RequestError names the first
    bad field. `max_images` bounds `n` (the logged model's limit: one request cannot take all the memory)."""
    raw = {k: _plain(v) for k, v in raw.items() if not missing(_plain(v))}
    unknown = sorted(set(raw) - set(FIELDS), key=str)
    if unknown:
        raise RequestError("request", unknown[0], f"the fields {', '.join(FIELDS)}")
    conditional = bool(model.classes)
    for field in ("class", "guidance_scale"):
        if field in raw and not conditional:
            raise RequestError(
                field, raw[field], "none: this model is not class-conditional (trained with unet2d.class_conditional)"
            )
    value = {**{k: v for k, v in defaults.items() if not missing(v)}, **raw}.get
    n = _integer("n", value("n"), 1, max_images, " (the model's max_images)" if max_images else "")
    seed = _integer("seed", value("seed", 0), 0, MAX_SEED)
    samplers = model.samplers()
    sampler = value("sampler")
    if sampler not in samplers:
        why = f" (the model was trained with {trained_with(model.corruption, model.trained_config)})"
        raise RequestError("sampler", sampler, ", ".join(samplers) + why)
    if model.trained_config is None:
        steps = _integer("steps", value("steps"), 1, None)
    else:
        train_steps = model.trained_config.num_train_timesteps
        most = max_sample_steps(sampler, train_steps)
        why = "" if most == train_steps else f" ({sampler} fails or draws NaN at all of them)"
        steps = _integer("steps", value("steps"), 1, most, f" for this model{why}")
    # A default eta is the default sampler's; another sampler takes none.
    eta = _number("eta", value("eta", 0.0) if sampler == "ddim" else raw.get("eta", 0.0), 0.0, 1.0)
    if eta and sampler != "ddim":
        raise RequestError("eta", eta, f"0 with sampler {sampler!r} (eta is for ddim only)")
    # The flow path's step spacing (diffusers' `shift`); a DDPM or toy model's steps have none to move.
    shift = raw.get("shift", 1.0)
    if model.trained_config is not None and is_flow(model.trained_config):
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 < shift <= MAX_SHIFT:
            raise RequestError("shift", shift, f"a number > 0 and <= {MAX_SHIFT:g} (1: the trained spacing)")
    elif isinstance(shift, bool) or shift != 1:
        why = trained_with(model.corruption, model.trained_config)
        raise RequestError("shift", shift, f"1 (shift moves a flow model's steps; this one was trained with {why})")
    classes, guidance = None, None
    if conditional:
        asked = value("class")
        asked = list(range(len(model.classes))) if missing(asked) else asked
        asked = asked if isinstance(asked, list | tuple) and asked else [asked]
        classes = tuple(_class_index(model, c) for c in asked)
        guidance = _number("guidance_scale", value("guidance_scale"), 0.0, MAX_GUIDANCE)
    return Request(n, seed, sampler, steps, eta, classes, guidance, float(shift))


def draw(
    model: Drawable,
    request: Request,
    device="cpu",
    *,
    precision: str = "auto",
    channels_last: str | bool = "auto",
    batch_size: int = BATCH_SIZE,
    announce: str | None = None,
) -> tuple[np.ndarray, int, torch.Tensor | None]:
    """(uint8 images (n, H, W) or (n, H, W, 3), model evaluations per image, the labels drawn or None).

    Precision and layout as the sample stage chooses them (`auto`: timed on this machine and model where the calls
    ahead pay for it); `announce` names the caller in the line that says what was chosen (None: no line)."""
    guidance, labels = {}, None
    if request.classes is not None:
        labels = torch.tensor([request.classes[i % len(request.classes)] for i in range(request.n)])
        guidance = {"labels": labels, "guidance_scale": request.guidance_scale}
    calls = -(-request.n // batch_size) * expected_evaluations(request.sampler, request.steps)
    batch = min(batch_size, request.n)
    choice = sampling_choice(model.net, precision, channels_last, device, batch=batch, evaluations=calls)
    if announce:
        choice.announce(announce)
    images, nfe = generate(
        model.net,
        request.sampler,
        request.steps,
        request.n,
        batch_size=batch_size,
        seed=request.seed,
        corruption=model.corruption,
        trained_config=model.trained_config,
        device=device,
        eta=request.eta,
        shift=request.shift,
        precision=choice.precision,
        channels_last=choice.channels_last,
        **guidance,
    )
    return images, nfe, labels


# The distributions the logged model's code imports (mlflow_model.py and the package source shipped with it),
# pinned at the versions that wrote it: MLflow's own inference of them wants network access. tests/test_serving.py
# loads a logged model in a Python that has only these (and what they require).
MODEL_REQUIREMENTS = ("mlflow", "torch", "diffusers", "numpy", "safetensors", "pillow", "platformdirs", "pyyaml")


def pip_requirements() -> list[str]:
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in MODEL_REQUIREMENTS]


def log_model(
    folder: str | Path,
    *,
    image_shape: tuple[int, int, int],
    defaults: Mapping[str, Any],
    max_images: int,
    name: str = "model",
    registered_name: str | None = None,
    tags: Mapping | None = None,
):
    """Log a trained model folder (models/basic, models/unet2d) as an MLflow pyfunc model from code: mlflow_model.py
    builds it, the folder's safetensors and configs travel as its artifact, this package's source beside it; no
    pickle anywhere. Its predict draws images (`defaults`: the request defaults; `max_images`: the most one request
    may ask for); the signature names every request field and the output's shape (C, H, W = `image_shape`).
    MLflow checks the input example by loading the logged model and predicting it."""
    import contextlib
    import io
    import logging
    import shutil
    import sys
    import tempfile

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

    tracking.no_progress_bars()  # MLflow downloads the logged model to check its input example
    package_dir = Path(__file__).resolve().parent
    channels, height, width = image_shape
    # Every field may be left out, and each is typed by check_request, whose one-line refusal names it (MLflow's
    # own schema check would answer a wrong type with a dump of the request instead).
    inputs = Schema([ColSpec(AnyType(), field, required=False) for field in FIELDS])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width) + ((3,) if channels == 3 else ()))])
    example = {**defaults, "n": min(2, max_images)}  # MLflow draws it once at logging: a few images suffice
    config = {"defaults": dict(defaults), "max_images": int(max_images)}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ARTIFACT  # the files that make the model, not the run's record beside them
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns("run.json"))
        quiet = logging.getLogger("mlflow")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # its INFO line on validating the example
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                info = tracking.with_retry(
                    mlflow.pyfunc.log_model,
                    name=name,
                    python_model=str(package_dir / "mlflow_model.py"),
                    artifacts={ARTIFACT: str(staged)},
                    code_paths=[str(package_dir)],
                    model_config=config,
                    signature=ModelSignature(inputs=inputs, outputs=outputs),
                    input_example=example,
                    pip_requirements=pip_requirements(),
                    registered_model_name=registered_name,
                    params={"max_images": int(max_images), **{f"default.{k}": v for k, v in defaults.items()}},
                    tags=tracking.clean(tags or {}),
                )
        finally:
            quiet.setLevel(level)
            # The caller says in one line which version it wrote; MLflow's own lines on registering go, the rest stays.
            for line in said.getvalue().splitlines():
                if not _REGISTERED.match(line):
                    print(line, file=sys.stderr)
    if registered_name and tags:
        # The registry shows version tags, not the logged model's: copy the params there too.
        client = mlflow.MlflowClient()
        for k, v in tracking.clean(tags).items():
            tracking.with_retry(client.set_model_version_tag, registered_name, info.registered_model_version, k, v)
    return info
