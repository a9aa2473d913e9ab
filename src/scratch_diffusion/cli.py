"""`scratch-diffusion generate`: images from a trained model, outside the pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from scratch_diffusion.stage import StageError, run_stage


class ScriptParser(argparse.ArgumentParser):
    """argparse with the convention of every command and script here: a bad argument is one line on stderr,
    `error: <what>` (naming the option, the value and what is allowed), and exit code 2; `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def refuse(message: str) -> NoReturn:
    """The same for what a script finds before any work that argparse cannot see (a missing input file): one line,
    exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


GENERATE_EXAMPLES = """examples:
  scratch-diffusion generate --model models/unet2d --sampler dpmsolver++ --steps 20 --n 64
  scratch-diffusion generate --model models/basic --sampler toy --steps 40
  scratch-diffusion generate --model models:/scratch-diffusion-unet2d@champion --sampler ddim --steps 50
"""


def _load_any(model: str, device: str):
    """The model (serving.Drawable) in a DVC output folder or behind an MLflow model URI.

    A registry model loads from the safetensors weights and configs logged with it (serving.logged_model_folder),
    never by unpickling anything: anyone who can register a version would otherwise run code here."""
    from pathlib import Path

    from scratch_diffusion import serving

    path = Path(model)
    if model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        from scratch_diffusion import tracking

        uri = tracking.connect()  # in seconds, where MLflow would retry for minutes; credentials out of the URI
        try:
            pinned, resolved = tracking.resolve_alias(model)  # an alias names one version, said in one line
            if resolved:
                print(f"generate: {resolved}", flush=True)
            local = mlflow.artifacts.download_artifacts(artifact_uri=pinned)
        except Exception as e:  # MlflowException / RestException: unknown name, version or alias
            raise StageError(f"--model: cannot load {model!r} from {tracking.shown_uri(uri)}: {e}") from None
        path = serving.logged_model_folder(local)
        if path is None:
            raise StageError(
                f"--model: {model!r} carries no safetensors weights and metadata, only a pickle; "
                "refused (unpickling a registry model runs its code): use a model logged by this "
                "project's training stages"
            )
    try:
        return serving.load(path, device)
    except OSError as e:  # missing, truncated or foreign files (model_files.ModelFileError)
        raise StageError(
            f"--model: {model!r} is neither a trained model folder (models/basic, models/unet2d) nor an MLflow "
            f"model URI (models:/<name>/<version> or models:/<name>@champion): {e}"
        ) from None


# The request fields as generate's options name them.
OPTIONS = {"guidance_scale": "--guidance-scale"}  # the others are --<field>


def _writable_folder(out: str) -> str | None:
    """Why folder `out` cannot take generate's files, or None. Creates nothing: a failed generate leaves no folder."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"{out!r} is a file; allowed: a folder (created if missing)"
    if not path.exists():
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            return f"cannot create {out!r} ({parent.name} is a file); allowed: a folder you can write to"
        path = parent
    return None if os.access(path, os.W_OK) else f"{out!r} is not writable; allowed: a folder you can write to"


def generate_main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    import numpy as np
    import torch

    from scratch_diffusion.choices import SAMPLE_PRECISIONS, SAMPLERS
    from scratch_diffusion.config import MAX_SEED
    from scratch_diffusion.files import atomic_path
    from scratch_diffusion.images import class_columns, grid, save_png
    from scratch_diffusion.serving import RequestError, check_request, draw

    parser = ScriptParser(
        prog="scratch-diffusion generate",
        description="Sample images from a trained model and write a PNG grid and an npz (uint8, N x H x W for a "
        "one-channel model, N x H x W x 3 for an RGB one; the image shape is the model's). The same request "
        "draws the same images as the logged MLflow model's predict (mlflow models serve).",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="models/unet2d",
        help="a trained model folder (models/unet2d, models/basic) or an MLflow model URI such as "
        "models:/scratch-diffusion-unet2d/1 or models:/scratch-diffusion-unet2d@champion (the best by compare; "
        "store: MLFLOW_TRACKING_URI or ./mlflow.db)",
    )
    parser.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help="toy for toy-corruption models; a diffusers scheduler for DDPM ones (default: toy for a toy-corruption "
        "model, else ddim)",
    )
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="start-noise seed; same seed, same images (default: 0)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parser.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow models (objective flow) only: moves the steps toward the noise end, sigma -> shift sigma / "
        "(1 + (shift - 1) sigma), diffusers' shift (default: 1, the trained spacing)",
    )
    parser.add_argument("--batch-size", type=int, default=250, help="images per model call (default: 250)")
    parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME",
        help="class-conditional models: draw this class, by the dataset's name for it or its index (repeatable: "
        "--class 3 --class 7 alternates; default: every class in turn)",
    )
    parser.add_argument(
        "--digit",
        type=int,
        action="append",
        metavar="D",
        help="class-conditional models: draw this class by its index 0..K-1 (MNIST: the digit; repeatable)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        metavar="S",
        help="class-conditional models: classifier-free guidance scale, 0 unconditional, "
        "1 plain conditional, > 1 guided (default: 2, the best measured trade-off)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=SAMPLE_PRECISIONS,
        help="model evaluations under bf16 autocast, or all fp32 (default: auto; auto precision and layout are "
        "timed on this machine and model where the calls ahead pay for it, and cached)",
    )
    parser.add_argument(
        "--channels-last",
        default="auto",
        choices=("auto", "true", "false"),
        help="model evaluations in the NHWC (true) or NCHW (false) memory layout (default: auto)",
    )
    parser.add_argument("--out", default="generated", help="output folder (default: generated/)")
    args = parser.parse_args(argv)
    # What needs no model is checked before it loads.
    for name in ("steps", "n", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, allowed: 1 or more")
    if not 0 <= args.seed <= MAX_SEED:  # torch's generator takes 64 bits, and each batch seeds with seed + i
        parser.error(f"--seed: got {args.seed}, allowed: 0..{MAX_SEED} (as params.yaml's sample.seed)")
    if not 0 <= args.eta <= 1 or (args.eta and args.sampler not in (None, "ddim")):
        parser.error(f"--eta: got {args.eta}, allowed: 0..1 with --sampler ddim only")
    if args.classes and args.digit:
        parser.error("--class/--digit: got both, allowed: one of them (--digit D is --class D)")
    if (why := _writable_folder(args.out)) is not None:
        parser.error(f"--out: {why}")
    out = Path(args.out)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _load_any(args.model, device)
    # The same request as the logged model's predict, with generate's own defaults.
    raw = {"n": args.n, "seed": args.seed, "steps": args.steps}
    raw["sampler"] = args.sampler or ("toy" if model.corruption == "toy" else "ddim")
    raw |= {"eta": args.eta} if args.eta or raw["sampler"] == "ddim" else {}
    raw |= {"shift": args.shift} if args.shift is not None else {}
    asked = args.classes or args.digit
    raw |= {"class": asked} if asked else {}
    raw |= {"guidance_scale": args.guidance_scale} if args.guidance_scale is not None else {}
    try:
        request = check_request(model, raw, {"guidance_scale": 2.0})
    except RequestError as e:
        option = "--digit" if e.field == "class" and args.digit else OPTIONS.get(e.field, f"--{e.field}")
        if e.field in ("class", "guidance_scale") and not model.classes:
            parser.error(
                f"--class/--digit/--guidance-scale: {args.model!r} is not class-conditional; allowed only with a "
                "model trained with unet2d.class_conditional: true"
            )
        parser.error(e.named(option))

    layout = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    images, nfe, labels = draw(
        model,
        request,
        device,
        precision=args.precision,
        channels_last=layout,
        batch_size=args.batch_size,
        announce="generate",
    )
    shift = f"-shift{request.shift:g}" if request.shift != 1 else ""  # as the sample stage names a setting
    stem = f"{request.sampler}-{request.steps}{shift}-seed{request.seed}"
    if labels is not None:
        classes = request.classes
        # The classes asked for (MNIST: -digits0123456789); every class of a model of many is "all", so that the
        # name stays short.
        asked = "_".join(map(str, classes)) if max(classes) > 9 else "".join(map(str, classes))
        asked = "all" if not (args.classes or args.digit) and len(model.classes) > 10 else asked
        stem += f"-digits{asked}-g{request.guidance_scale:g}"
    with atomic_path(out / f"{stem}.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images, **({"labels": labels.numpy()} if labels is not None else {}))
    picture = grid(images, nrow=class_columns(len(request.classes), request.n)) if labels is not None else grid(images)
    save_png(out / f"{stem}.png", picture)
    print(f"wrote {out / stem}.png and .npz: {request.n} images, {nfe} model evaluations each")


def main(argv: list[str] | None = None) -> None:
    """`scratch-diffusion <command>`; one command for now: generate."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: scratch-diffusion generate [options]   (scratch-diffusion generate --help for the options)")
        sys.exit(0 if argv else 2)
    if argv[0] != "generate":
        print(f"error: unknown command {argv[0]!r}; allowed: generate", file=sys.stderr)
        sys.exit(2)
    run_stage(lambda: generate_main(argv[1:]), record_cost=False)  # not a pipeline stage: no metrics/cost file
