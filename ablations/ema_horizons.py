"""The EMA axis, measured from one training run: the default train-unet2d trajectory with its weight average
tracked at several horizons at once (`unet2d.ema_warmup` values), each copy sampled and measured as compare does.

    python ablations/ema_horizons.py train                 # ~35 min here: checkpoints/ema-horizons/w<k>/
    python ablations/ema_horizons.py measure               # ~4 min a copy: ablations/ema_horizons.json +
                                                           # docs/ablation/ema.md
    python ablations/ema_horizons.py table                 # docs/ablation/ema.md again from the JSON
    python ablations/ema_horizons.py train --warmups 10 4  # other horizons (10 = the EMA before it had a knob)

Why one run: the EMA never feeds back into training, so `dvc exp run -S unet2d.ema_warmup=k -S
unet2d.ema_decay=0.99999` trains the same trajectory and saves the same weights as the copy w<k> here (the script
says whether the copy of params.yaml's own ema_warmup matches models/unet2d bit for bit). K horizons cost one
training instead of K experiments. The decay cap is set out of reach (0.99999) so that the warm-up alone sets each
horizon; the default's cap (0.995) is not reached within the lesson's 1407 steps either (not before step 1790).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from scratch_diffusion import files
from scratch_diffusion.choices import DIFFUSERS_SAMPLERS
from scratch_diffusion.config import ParamsError, SampleSetting, load_params
from scratch_diffusion.data import load_split
from scratch_diffusion.hardware import cpu_name, for_sampling
from scratch_diffusion.metrics import Judge
from scratch_diffusion.model_files import load_unet2d, save_unet2d
from scratch_diffusion.recipe import fit_unet2d, unet2d_parts
from scratch_diffusion.samplers import generate
from scratch_diffusion.training import EMA, stage_accelerator

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "checkpoints" / "ema-horizons"
RESULTS = ROOT / "ablations" / "ema_horizons.json"
TABLE = ROOT / "docs" / "ablation" / "ema.md"  # the whole file is generated; docs/ablation.md explains it
CAP = 0.99999  # the largest unet2d.ema_decay allowed: out of reach, so ema_warmup alone sets the horizon
DATA = ROOT / "data" / "dataset"


class Horizons:
    """Several EMAs of one run behind the interface that `fit` drives (update, model, updates)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmups: list[int]):
        self.emas = {w: EMA(model, decay, w) for w in warmups}
        self.model = self.emas[warmups[0]].model  # what fit moves to the device first; the rest follow below
        self.updates = 0

    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        for ema in self.emas.values():
            ema.update(model)


def train(warmups: list[int]) -> None:
    params = load_params(ROOT / "params.yaml")
    p = params.unet2d
    images, labels = load_split(DATA, train=True, n=params.data.n_train)
    # The stage's order of construction, so the trajectory is the stage's (see the module docstring).
    accelerator, choice = stage_accelerator("ema-horizons", "unet2d", p.mixed_precision, p.channels_last)
    parts = unet2d_parts(params)
    model, scheduler, _, _ = parts
    horizons = Horizons(model, CAP, warmups)
    for ema in horizons.emas.values():
        ema.model.to(accelerator.device)
    fit_unet2d(params, parts, images, labels, accelerator, choice.channels_last, ema=horizons, desc="ema-horizons")
    shutil.rmtree(MODELS, ignore_errors=True)  # copies of an earlier run would be measured as if of this one
    for w, ema in horizons.emas.items():
        meta = {
            "objective": params.objective,
            "corruption": p.corruption,
            "conditioning": p.conditioning,
            "ema_decay": CAP,
            "ema_warmup": w,
            "class_conditional": p.class_conditional,
            "steps": horizons.updates,
            "run_id": "",
        }
        save_unet2d(MODELS / f"w{w}", ema.model.cpu(), scheduler, meta)
    print(f"saved {len(warmups)} EMA copies after {horizons.updates} steps to {MODELS.relative_to(ROOT)}")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def measure(setting: SampleSetting) -> dict:
    params = load_params(ROOT / "params.yaml")
    sp = params.sample
    dirs = sorted(
        (d for d in MODELS.glob("w*") if (d / "scratch_diffusion.json").is_file()), key=lambda d: -int(d.name[1:])
    )
    if not dirs:
        sys.exit(f"error: {MODELS.relative_to(ROOT)}: no EMA copies; run `python ablations/ema_horizons.py train`")
    classifier_file = ROOT / "models" / "classifier" / "model.safetensors"
    if not classifier_file.is_file():
        sys.exit(f"error: {classifier_file.relative_to(ROOT)}: missing; run `dvc repro train-classifier` first")
    n = sp.n
    judge = Judge.from_files(classifier_file, DATA, n)  # compare's own yardstick
    floor = judge.floor
    rows = []
    for d in dirs:
        model, scheduler, meta = load_unet2d(d)
        images, _ = generate(
            model,
            setting.sampler,
            setting.steps,
            n,
            batch_size=sp.batch_size,
            seed=sp.seed,
            corruption=meta["corruption"],
            trained_config=scheduler.config,
            eta=setting.eta,
            precision=for_sampling(sp.precision, "cpu").precision,
        )
        quality = judge.measure(images)
        quality.pop("replicates")
        row = {"warmup": meta["ema_warmup"], "steps": meta["steps"], **quality}
        print(
            f"ema_warmup {row['warmup']}: FID {row['fid']:.2f} ({row['fid'] / floor:.2f}x floor), "
            f"recognised {row['recognised']:.3f}",
            flush=True,
        )
        rows.append(row)
    own = MODELS / f"w{params.unet2d.ema_warmup}"
    stage_model = ROOT / "models" / "unet2d"
    matches = same_weights(own, stage_model) if own.is_dir() and stage_model.is_dir() else None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = {
        "rows": rows,
        "n": n,
        "floor_fid": floor,
        "sampler": setting.name.removeprefix("unet2d/"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "commit": commit,
        "default_matches_models_unet2d": matches,
    }
    files.write_json(RESULTS, results)
    return results


def markdown_table(results: dict) -> str:
    lines = [
        "| `unet2d.ema_warmup` | mean age of the averaged weights (steps) | FID | x floor | recognised | coverage KL |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ratio = r["fid"] / results["floor_fid"]
        lines.append(
            f"| {r['warmup']} | {r['steps'] / r['warmup']:.0f} | {r['fid']:.1f} | {ratio:.2f} | "
            f"{r['recognised']:.3f} | {r['coverage_kl']:.3f} |"
        )
    return "\n".join(lines)


def table(results: dict) -> None:
    matches = {
        True: "matches `models/unet2d` bit for bit",
        False: "does NOT match `models/unet2d`",
        None: "was not checked against `models/unet2d`",
    }[results["default_matches_models_unet2d"]]
    text = "\n".join(
        [
            "# The EMA horizon, from one training run",
            "",
            markdown_table(results),
            "",
            f"One training run (params.yaml's defaults), {results['sampler']}, n = {results['n']}, floor "
            f"{results['floor_fid']:.2f}. Machine: {results['machine']}. Code: {results['commit']}. The copy of "
            f"params.yaml's own `ema_warmup` {matches}. Made by `python ablations/ema_horizons.py measure`.",
            "",
        ]
    )
    files.write_text(TABLE, text)  # atomic; creates docs/ablation/ if missing
    print(markdown_table(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "measure", "table"])
    parser.add_argument("--warmups", type=int, nargs="+", default=[20, 10, 6, 4, 3], metavar="K")
    parser.add_argument(
        "--sampler",
        default="ddim",
        choices=DIFFUSERS_SAMPLERS,
        help="measure: one sampler setting (default: DDIM-50, eta 1)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=None, help="DDIM only (default 1)")
    args = parser.parse_args(argv)
    bad = [w for w in args.warmups if w < 2]
    if bad:
        parser.error(f"--warmups: got {bad}; allowed: integers >= 2")
    if args.command == "train":
        train(args.warmups)
    elif args.command == "measure":
        eta = args.eta if args.eta is not None else 1.0 if args.sampler == "ddim" else 0.0
        setting = SampleSetting("unet2d", args.sampler, args.steps, eta)
        try:
            setting.validate("--")
        except ParamsError as e:
            parser.error(str(e))
        table(measure(setting))
    else:
        table(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
