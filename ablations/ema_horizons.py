"""The EMA axis, measured from one training run per seed: the default train-unet2d trajectory with its weight
average tracked at several horizons at once (`unet2d.ema_warmup` values), each copy sampled and measured as compare
does, and the horizons compared over training seeds.

    python ablations/ema_horizons.py train                 # one default training: checkpoints/ema-horizons/seed42/
    python ablations/ema_horizons.py train --seed 0        # the same with `-S seed=0` (one seed per process)
    python ablations/ema_horizons.py measure               # every copy of every trained seed:
                                                           # ablations/ema_horizons.json + docs/ablation/ema.md
    python ablations/ema_horizons.py measure --seed 0      # one seed, added beside those already measured
    python ablations/ema_horizons.py table                 # docs/ablation/ema.md again from the JSON
    python ablations/ema_horizons.py train --warmups 10 4  # other horizons

Why one run per seed: the EMA never feeds back into training, so `dvc exp run -S unet2d.ema_warmup=k -S
unet2d.ema_decay=0.99999` trains the same trajectory and saves the same weights as the copy w<k> here (the script
says whether the copy of params.yaml's own ema_warmup at its own seed matches models/unet2d bit for bit). K horizons
cost one training instead of K experiments, and the copies of one seed compare paired. The decay cap is set out of
reach (0.99999) so that the warm-up alone sets each horizon; the default's cap (0.995) is not reached within the
lesson's 3 epochs either, so the copy at the default warm-up is the default model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from scratch_diffusion import files
from scratch_diffusion.choices import DIFFUSERS_SAMPLERS
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.config import MAX_SEED, ParamsError, SampleSetting, Unet2dParams, load_params, sample_setting
from scratch_diffusion.data import describe
from scratch_diffusion.hardware import machine
from scratch_diffusion.identity import what_changed
from scratch_diffusion.metrics import Judge, seed_verdict
from scratch_diffusion.model_files import META, load_unet2d, save_unet2d
from scratch_diffusion.recipe import train_model, training_identity, unet2d_meta
from scratch_diffusion.samplers import expected_evaluations, generate, sampling_choice

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "checkpoints" / "ema-horizons"
RESULTS = ROOT / "ablations" / "ema_horizons.json"
TABLE = ROOT / "docs" / "ablation" / "ema.md"  # the whole file is generated; docs/ablation.md explains it
CAP = 0.99999  # the largest unet2d.ema_decay allowed: out of reach, so ema_warmup alone sets the horizon
DATA = ROOT / "data" / "dataset"


def seed_dir(seed: int) -> Path:
    return MODELS / f"seed{seed}"


def seed_params(seed: int | None):
    params = load_params(ROOT / "params.yaml")
    return params if seed is None else dataclasses.replace(params, seed=seed)  # what `-S seed=k` trains


def train(warmups: list[int], seed: int | None) -> None:
    params = seed_params(seed)
    capped = dataclasses.replace(params, unet2d=dataclasses.replace(params.unet2d, ema_decay=CAP))
    trained = train_model("unet2d", capped, data_root=DATA, ema_warmups=tuple(warmups), desc="ema-horizons")
    steps = trained.result.steps
    out = seed_dir(params.seed)
    shutil.rmtree(out, ignore_errors=True)  # copies of an earlier run would be measured as if of this one
    # What the copies were trained on: `measure` refuses copies of other inputs (code, data, params).
    trained_on = training_identity("unet2d", params, DATA, (__file__,))
    for w, average in trained.averages.items():
        meta = {
            **unet2d_meta(params),
            "ema_decay": CAP,
            "ema_warmup": w,
            "steps": steps,
            "run_id": "",
            "trained_on": trained_on,
        }
        save_unet2d(out / f"w{w}", average.cpu(), trained.scheduler, meta)
    print(f"saved {len(warmups)} EMA copies after {steps} steps to {out.relative_to(ROOT)}")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def trained_seeds() -> list[int]:
    return sorted(int(d.name[4:]) for d in MODELS.glob("seed*") if d.name[4:].isdigit() and any(d.glob("w*")))


def refuse_stale(seed: int) -> None:
    """Exit with one line when a seed's copies were trained on other params, data or code than today's: measured,
    they would pass for what today's code trains."""
    now = training_identity("unet2d", seed_params(seed), DATA, (__file__,))
    for meta_file in sorted(seed_dir(seed).glob(f"w*/{META}")):
        meta = json.loads(meta_file.read_text())
        changed = what_changed(meta["trained_on"], now) if "trained_on" in meta else "made before inputs were recorded"
        if changed:
            refuse(
                f"{meta_file.parent.relative_to(ROOT)}: trained on other inputs than today's ({changed}); "
                f"retrain with `python ablations/ema_horizons.py train --seed {seed}`"
            )


def measure_seed(seed: int, setting: SampleSetting, judge: Judge) -> dict:
    """Every EMA copy of one training seed, sampled and measured as compare does."""
    params = load_params(ROOT / "params.yaml")
    sp = dataclasses.replace(params.sample, n=params.sample.size(describe(DATA).n_test))  # sample.n auto, as the stage
    dirs = sorted(
        (d for d in seed_dir(seed).glob("w*") if (d / "scratch_diffusion.json").is_file()),
        key=lambda d: -int(d.name[1:]),
    )
    rows = []
    for d in dirs:
        model, scheduler, meta = load_unet2d(d)
        calls = -(-judge.n // sp.batch_size) * expected_evaluations(setting.sampler, setting.steps)
        batch = min(sp.batch_size, judge.n)
        choice = sampling_choice(model, sp.precision, sp.channels_last, "cpu", batch=batch, evaluations=calls)
        images, _ = generate(
            model,
            setting.sampler,
            setting.steps,
            judge.n,
            batch_size=sp.batch_size,
            seed=sp.seed,
            corruption=meta["corruption"],
            trained_config=scheduler.config,
            eta=setting.eta,
            precision=choice.precision,
            channels_last=choice.channels_last,
        )
        quality = judge.measure(images)
        quality.pop("replicates")
        row = {"warmup": meta["ema_warmup"], "steps": meta["steps"], **quality}
        print(
            f"seed {seed}, ema_warmup {row['warmup']}: FID {row['fid']:.2f} ({row['fid'] / judge.floor:.2f}x floor), "
            f"recognised {row['recognised']:.3f}",
            flush=True,
        )
        rows.append(row)
    # The copy of params.yaml's own ema_warmup, trained with its own seed, is the stage's model.
    own = seed_dir(seed) / f"w{params.unet2d.ema_warmup}"
    stage_model = ROOT / "models" / "unet2d"
    matches = same_weights(own, stage_model) if seed == params.seed and own.is_dir() and stage_model.is_dir() else None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "rows": rows,
        "machine": machine(),
        "commit": commit,
        "default_matches_models_unet2d": matches,
    }


def measure(setting: SampleSetting, seeds: list[int] | None, replace: bool) -> dict:
    """Measures the given seeds' copies (default: every trained seed) into ablations/ema_horizons.json, beside the
    seeds already there if they were measured with the same yardstick (sampler, n, classifier)."""
    params = load_params(ROOT / "params.yaml")
    trained = trained_seeds()
    seeds = seeds or trained
    missing = [k for k in seeds if k not in trained]
    if not seeds or missing:
        refuse(
            f"{MODELS.relative_to(ROOT)}: no EMA copies for seed(s) {missing or 'any'}; run "
            "`python ablations/ema_horizons.py train --seed K` first"
        )
    for seed in seeds:  # every seed checked before any sampling
        refuse_stale(seed)
    classifier_file = ROOT / "models" / "classifier" / "model.safetensors"
    if not classifier_file.is_file():
        refuse(f"{classifier_file.relative_to(ROOT)}: missing; run `dvc repro train-classifier` first")
    n = params.sample.size(describe(DATA).n_test)  # sample.n auto, as the stage
    judge = Judge.from_files(classifier_file, DATA, n)  # compare's own yardstick
    if judge.classifier is None:  # every verdict here is on FID
        refuse(f"the EMA ablation ranks horizons by FID, which needs a classifier: {judge.no_classifier}")
    yardstick = {"n": judge.n, "floor_fid": judge.floor, "sampler": setting.name.removeprefix("unet2d/")}

    def check(results: dict | None) -> dict:
        if results is None:
            return {**yardstick, "runs": {}}
        # Equal floors mean the same classifier and reference set; a run judged otherwise does not compare.
        same = results["n"] == yardstick["n"] and results["sampler"] == yardstick["sampler"]
        if not same or not math.isclose(results["floor_fid"], yardstick["floor_fid"], rel_tol=1e-6):
            refuse(
                f"{RESULTS.relative_to(ROOT)} holds seeds measured with {results['sampler']} at n = "
                f"{results['n']} (floor {results['floor_fid']:.2f}); this measure uses {yardstick['sampler']} at "
                f"n = {yardstick['n']} (floor {yardstick['floor_fid']:.2f}). Measure with the same sampler and "
                "params.yaml's sample.n, or pass --replace to start the file anew"
            )
        return results

    if not replace:
        check(json.loads(RESULTS.read_text()) if RESULTS.is_file() else None)  # refused before any sampling
    results = None
    for i, seed in enumerate(seeds):
        run = measure_seed(seed, setting, judge)
        start_anew = replace and i == 0

        def add(old: dict | None, seed: str = str(seed), run: dict = run, start_anew: bool = start_anew) -> dict:
            kept = check(None if start_anew else old)
            return {**kept, "runs": {**kept["runs"], seed: run}}

        # Re-read under the lock, so a measure of other seeds running beside this one keeps its seeds.
        results = files.update_json(RESULTS, add)
    return results


def by_warmup(results: dict) -> dict[int, dict[int, dict]]:
    """{ema_warmup: {seed: row}}, longest horizon first."""
    out: dict[int, dict[int, dict]] = {}
    for seed, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for r in run["rows"]:
            out.setdefault(r["warmup"], {})[int(seed)] = r
    return dict(sorted(out.items()))


def markdown_table(results: dict, default: int) -> str:
    """Per horizon: mean and spread over training seeds, and the verdict against params.yaml's ema_warmup, paired
    by seed (the copies of one seed share one trajectory and one set of start noise)."""
    groups = by_warmup(results)
    base = groups.get(default, {})
    lines = [
        "| `unet2d.ema_warmup` | mean age (steps) | seeds | FID mean (sd over seeds) | FID sampling ±95% | x floor | "
        "recognised mean (sd) | FID per seed | vs the default (FID; recognised) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    sd = lambda v: f"{np.std(v, ddof=1):.3g}" if len(v) > 1 else "-"  # noqa: E731
    for w, runs in groups.items():
        seeds = sorted(runs)
        fid = [runs[k]["fid"] for k in seeds]
        rec = [runs[k]["recognised"] for k in seeds]
        halves = [(r["fid_hi"] - r["fid_lo"]) / 2 for r in runs.values() if "fid_hi" in r]
        half = f"{np.mean(halves):.1f}" if halves else "-"
        shared = [k for k in seeds if k in base]
        if w == default:
            against = "the default"
        elif len(shared) > 1:
            against = "; ".join(
                seed_verdict([runs[k][key] for k in shared], [base[k][key] for k in shared], key, paired=True)
                for key in ("fid", "recognised")
            )
        else:
            against = "needs 2 seeds"
        age = np.mean([runs[k]["steps"] for k in seeds]) / w
        lines.append(
            f"| {w} | {age:.0f} | {len(seeds)} | {np.mean(fid):.1f} ({sd(fid)}) | {half} | "
            f"{np.mean(fid) / results['floor_fid']:.2f} | {np.mean(rec):.3f} ({sd(rec)}) | "
            f"{', '.join(f'{v:.1f}' for v in fid)} | {against} |"
        )
    return "\n".join(lines)


def table(results: dict) -> None:
    params = load_params(ROOT / "params.yaml")
    matches = {
        True: "matches `models/unet2d` bit for bit",
        False: "does NOT match `models/unet2d`",
        None: "was not checked against `models/unet2d`",
    }
    runs = results["runs"]
    own = runs.get(str(params.seed))
    seeds = ", ".join(sorted(runs, key=int))
    ordered = sorted(runs.items(), key=lambda kv: int(kv[0]))
    by_machine: dict[str, list[str]] = {}
    for k, r in ordered:
        by_machine.setdefault(r["machine"], []).append(k)
    machines = "; ".join(f"{m} (seed {', '.join(ks)})" for m, ks in by_machine.items())
    commits = ", ".join(f"seed {k}: {r['commit']}" for k, r in ordered)
    unbounded = [k for k, r in ordered if not all("fid_hi" in row for row in r["rows"])]
    if unbounded:  # rows without sampling intervals
        commits += f" (seed {', '.join(unbounded)} measured without sampling intervals: not in the ±95% column)"
    check = (
        f"The copy of params.yaml's own `ema_warmup` at its own seed ({params.seed}) "
        f"{matches[own['default_matches_models_unet2d']]}."
        if own
        else f"params.yaml's own seed ({params.seed}) is not among them."
    )
    text = "\n".join(
        [
            "# The EMA horizon over training seeds",
            "",
            markdown_table(results, params.unet2d.ema_warmup),
            "",
            f"One training run per seed (params.yaml's defaults with `-S seed=k`; seeds {seeds}), each carrying its "
            f"EMA at every horizon; {results['sampler']}, n = {results['n']}, sample seed fixed, floor "
            f"{results['floor_fid']:.2f}. *sd over seeds*: the training-seed spread. *FID sampling ±95%*: the mean "
            "bootstrap half-width over the sample set. Verdict: the 95% t interval of the per-seed differences from "
            f"`ema_warmup` {params.unet2d.ema_warmup} (params.yaml's) excludes 0, else within noise. {check} "
            f"Machine: {machines}. Code: {commits}. Made by `python ablations/ema_horizons.py measure`.",
            "",
        ]
    )
    files.write_text(TABLE, text)  # atomic; creates docs/ablation/ if missing
    print(markdown_table(results, params.unet2d.ema_warmup))


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "measure", "table"])
    parser.add_argument("--warmups", type=int, nargs="+", default=[20, 10, 6, 4, 3], metavar="K")
    parser.add_argument(
        "--sampler",
        default="ddim",
        choices=DIFFUSERS_SAMPLERS,
        help="measure: one sampler setting (default: DDIM-50, eta 1)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--replace", action="store_true", help="measure: start ablations/ema_horizons.json anew (other yardstick)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="training seeds (`-S seed=k`); train takes one (default: params.yaml's seed), measure several "
        "(default: every trained seed)",
    )
    parser.add_argument("--eta", type=float, default=None, help="DDIM only (default 1)")
    args = parser.parse_args(argv)
    # Every argument is checked before any training or sampling, and before a committed file is touched.
    lo, hi, *_ = Unet2dParams.__dataclass_fields__["ema_warmup"].metadata["range"]
    bad = [w for w in args.warmups if not lo <= w <= hi]
    if bad or len(set(args.warmups)) != len(args.warmups):
        parser.error(
            f"--warmups: got {args.warmups}; allowed: different integers {lo}..{hi} (unet2d.ema_warmup's range)"
        )
    bad = [k for k in args.seed or [] if not 0 <= k <= MAX_SEED]
    if bad or (args.seed and len(set(args.seed)) != len(args.seed)):
        parser.error(f"--seed: got {args.seed}; allowed: different integers 0..{MAX_SEED} (as params.yaml's seed)")
    try:
        if args.command == "train":
            if args.seed is not None and len(args.seed) != 1:
                parser.error(f"--seed: got {args.seed}; train takes one seed (run it once per seed)")
            train(args.warmups, args.seed[0] if args.seed else None)
        elif args.command == "measure":
            eta = args.eta if args.eta is not None else 1.0 if args.sampler == "ddim" else 0.0
            # Checked as params.yaml's sample settings are: steps and eta in range, eta for ddim only, and no more
            # steps than the trained schedule (params.yaml's: `measure` refuses copies trained on other params).
            schedule = load_params(ROOT / "params.yaml").unet2d.num_train_timesteps
            raw = {"model": "unet2d", "sampler": args.sampler, "steps": args.steps, "eta": eta}
            try:
                setting = sample_setting(raw, "--", schedule)
            except ParamsError as e:
                parser.error(str(e))
            table(measure(setting, args.seed, args.replace))
        else:
            if not RESULTS.is_file():
                refuse(f"{RESULTS.relative_to(ROOT)}: missing; run `python ablations/ema_horizons.py measure`")
            table(json.loads(RESULTS.read_text()))
    except ParamsError as e:  # params.yaml itself
        refuse(f"{e}")


if __name__ == "__main__":
    main()
