"""`scratch-diffusion generate`: images from a trained model, outside the pipeline."""

from __future__ import annotations

import os
import sys

from scratch_diffusion.stage import StageError, run_stage

GENERATE_EXAMPLES = """examples:
  scratch-diffusion generate --model models/unet2d --sampler dpmsolver++ --steps 20 --n 64
  scratch-diffusion generate --model models/basic --sampler toy --steps 40
  scratch-diffusion generate --model models:/scratch-diffusion-unet2d@champion --sampler ddim --steps 50
"""


def _load_any(model: str, device: str):
    """(denoiser, corruption, trained scheduler config or None) from a DVC output folder or an MLflow model URI.

    A registry model loads from the safetensors weights, configs and metadata logged beside it (extra_files),
    never by unpickling the logged model: anyone who can register a version would otherwise run code here."""
    from pathlib import Path

    from scratch_diffusion.model_files import META, load_basic, load_unet2d

    path = Path(model)
    if model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        from scratch_diffusion import tracking

        uri = tracking.connect()  # in seconds, where MLflow would retry for minutes; credentials out of the URI
        try:
            pinned, resolved = tracking.resolve_alias(model)  # an alias names one version, said in one line
            if resolved:
                print(f"generate: {resolved}", flush=True)
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned)) / "extra_files"
        except Exception as e:  # MlflowException / RestException: unknown name, version or alias
            raise StageError(f"--model: cannot load {model!r} from {tracking.shown_uri(uri)}: {e}") from None
        if not ((path / "model.safetensors").is_file() or (path / META).is_file()):
            raise StageError(
                f"--model: {model!r} carries no safetensors weights and metadata beside its pickle; "
                "refused (unpickling a registry model runs its code): use a model logged by this "
                "project's training stages"
            )
    try:
        if (path / "model.safetensors").is_file():
            return load_basic(path, device), "toy", None
        net, scheduler, meta = load_unet2d(path, device)
    except OSError as e:  # missing, truncated or foreign files (model_files.ModelFileError)
        raise StageError(
            f"--model: {model!r} is neither a trained model folder (models/basic, models/unet2d) nor an MLflow "
            f"model URI (models:/<name>/<version> or models:/<name>@champion): {e}"
        ) from None
    return net, meta["corruption"], scheduler.config


def generate_main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    import numpy as np
    import torch

    from scratch_diffusion.choices import DIFFUSERS_SAMPLERS, SAMPLE_PRECISIONS, SAMPLERS
    from scratch_diffusion.config import MAX_SEED, max_sample_steps
    from scratch_diffusion.images import class_columns, grid, save_png
    from scratch_diffusion.samplers import expected_evaluations, generate, sampling_choice

    parser = argparse.ArgumentParser(
        prog="scratch-diffusion generate",
        description="Sample images from a trained model and write a PNG grid and an npz (uint8, N x H x W for a "
        "one-channel model, N x H x W x 3 for an RGB one; the image shape is the model's).",
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
        default="ddim",
        choices=SAMPLERS,
        help="toy for toy-corruption models; a diffusers scheduler for DDPM ones (default: ddim)",
    )
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="start-noise seed; same seed, same images (default: 0)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--batch-size", type=int, default=250, help="images per model call (default: 250)")
    parser.add_argument(
        "--digit",
        type=int,
        action="append",
        metavar="D",
        help="class-conditional models: draw this class, 0..K-1 for a model of K classes (MNIST: the digit; "
        "repeatable: --digit 3 --digit 7 alternates; default: every class in turn)",
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
    for name in ("steps", "n", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, allowed: 1 or more")
    if not 0 <= args.seed <= MAX_SEED:  # torch's generator takes 64 bits, and each batch seeds with seed + i
        parser.error(f"--seed: got {args.seed}, allowed: 0..{MAX_SEED} (as params.yaml's sample.seed)")
    if not 0 <= args.eta <= 1 or (args.eta and args.sampler != "ddim"):
        parser.error(f"--eta: got {args.eta}, allowed: 0..1 with --sampler ddim only")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {args.out!r} is a file; allowed: a folder (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create {args.out!r} ({e.strerror}); allowed: a folder you can write to")
    if not os.access(out, os.W_OK):
        parser.error(f"--out: {args.out!r} is not writable; allowed: a folder you can write to")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, corruption, config = _load_any(args.model, device)
    if (args.sampler == "toy") != (corruption == "toy"):
        allowed = "toy" if corruption == "toy" else ", ".join(DIFFUSERS_SAMPLERS)
        parser.error(
            f"--sampler: got {args.sampler!r} for a model trained with the {corruption} corruption; allowed: {allowed}"
        )
    if config is not None and args.steps > (most := max_sample_steps(args.sampler, config.num_train_timesteps)):
        why = "" if most == config.num_train_timesteps else f" ({args.sampler} fails or draws NaN at all of them)"
        parser.error(f"--steps: got {args.steps}, allowed: 1..{most} for this model{why}")

    conditional = getattr(net, "null_label", None) is not None
    if not conditional and (args.digit or args.guidance_scale is not None):
        parser.error(
            f"--digit/--guidance-scale: {args.model!r} is not class-conditional; allowed only with a model "
            "trained with unet2d.class_conditional: true"
        )
    num_classes = net.null_label if conditional else 0  # the null label follows the model's classes
    bad = [d for d in args.digit or [] if not 0 <= d < num_classes]
    if bad:
        parser.error(f"--digit: got {bad[0]}, allowed: 0..{num_classes - 1} (the model's {num_classes} classes)")
    if args.guidance_scale is not None and not 0 <= args.guidance_scale <= 50:
        parser.error(f"--guidance-scale: got {args.guidance_scale}, allowed: 0..50")
    guidance = {}
    if conditional:
        digits = args.digit or list(range(num_classes))
        guidance = {
            "labels": torch.tensor([digits[i % len(digits)] for i in range(args.n)]),
            "guidance_scale": 2.0 if args.guidance_scale is None else args.guidance_scale,
        }

    layout = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    calls = -(-args.n // args.batch_size) * expected_evaluations(args.sampler, args.steps)
    choice = sampling_choice(net, args.precision, layout, device, batch=min(args.batch_size, args.n), evaluations=calls)
    choice.announce("generate")
    images, nfe = generate(
        net,
        args.sampler,
        args.steps,
        args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        corruption=corruption,
        trained_config=config,
        device=device,
        eta=args.eta,
        precision=choice.precision,
        channels_last=choice.channels_last,
        **guidance,
    )
    stem = f"{args.sampler}-{args.steps}-seed{args.seed}"
    if guidance:
        # The classes asked for (MNIST: -digits0123456789); every class of a model of many is "all", so that the
        # name stays short.
        asked = "_".join(map(str, digits)) if max(digits) > 9 else "".join(map(str, digits))
        asked = "all" if args.digit is None and num_classes > 10 else asked
        stem += f"-digits{asked}-g{guidance['guidance_scale']:g}"
    from scratch_diffusion.files import atomic_path

    with atomic_path(out / f"{stem}.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images, **({"labels": guidance["labels"].numpy()} if guidance else {}))
    save_png(out / f"{stem}.png", grid(images, nrow=class_columns(len(digits), args.n)) if guidance else grid(images))
    print(f"wrote {out / stem}.png and .npz: {args.n} images, {nfe} model evaluations each")


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
