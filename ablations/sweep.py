"""A wide screen of train-unet2d settings at the full budget, for a machine with a GPU: each setting is trained in
its own process (several at once share the device), sampled with params.yaml's unet2d sample settings and measured
as compare does (FID, recognised share, coverage at sample.n against the same real test images).

    python ablations/sweep.py run --jobs 12                   # the settings below; ablations/sweep.json
    python ablations/sweep.py run --setting "unet2d.lr=2e-3 unet2d.lr_schedule=cosine"   # others, `-S` syntax
    python ablations/sweep.py budget --every 3 --setting "unet2d.epochs=60"   # one long run; ablations/budget.json
    python ablations/sweep.py table                           # docs/ablation/sweep.md from both files

Why it exists: on a 2-core CPU one full-budget setting costs most of an hour, so the DVC-experiment ablation
(ablations/run.py) can afford a handful; a GPU trains one in minutes, and several at once. The GPU's numbers are not
the CPU's (other arithmetic, other kernels): they rank settings, and the chosen one is then confirmed on the CPU as
a DVC experiment, which is what docs/ablation/table.md reports. A setting is written as `dvc exp run -S` would
take it (dotted keys of params.yaml, YAML values), so any row can be rerun with `dvc exp run -S ...`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from scratch_diffusion import files
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.config import MAX_SEED, ParamsError, params_from_dict, training_epochs
from scratch_diffusion.data import describe, load_split
from scratch_diffusion.hardware import machine
from scratch_diffusion.metrics import Judge, seed_verdict
from scratch_diffusion.model_files import load_unet2d, save_unet2d
from scratch_diffusion.recipe import noise_schedule, train_model, unet2d_meta
from scratch_diffusion.samplers import expected_evaluations, generate, sampling_choice

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "dataset"
RESULTS = ROOT / "ablations" / "sweep.json"
BUDGET = ROOT / "ablations" / "budget.json"
SEEDS = ROOT / "ablations" / "seeds.json"
TABLE = ROOT / "docs" / "ablation" / "sweep.md"  # the whole files are generated; docs/ablation.md explains them
SEEDS_TABLE = ROOT / "docs" / "ablation" / "seeds.md"
BUDGET_FIGURE = ROOT / "docs" / "ablation" / "budget.png"
# The ablation's headline claims, rechecked over training seeds (`run --seeds 0 1 2 --out ablations/seeds.json`):
# the objective, the beta schedule and (every row sampled with each unet2d sampler) the sampler.
SEED_SETTINGS = ["", "unet2d.beta_schedule=linear", "objective=eps"]

# The screen: the defaults first (the calibration against the CPU's numbers), then learning rate and its schedule,
# batch size, EMA, and the budget itself. Settings start in list order, so a run cut short has the earlier ones.
SETTINGS = [
    "",
    "unet2d.lr=2e-3",
    "unet2d.lr=3e-3 unet2d.lr_warmup_steps=100",
    "unet2d.lr=5e-4",
    "unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.lr=3e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.lr=4e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=200",
    "unet2d.batch_size=64",
    "unet2d.batch_size=64 unet2d.lr=5e-4",
    "unet2d.batch_size=64 unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.batch_size=256 unet2d.lr=2e-3",
    "unet2d.batch_size=256 unet2d.lr=3e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=50",
    "unet2d.ema_decay=0",
    "unet2d.ema_decay=0 unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.ema_warmup=20 unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.ema_warmup=6 unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.grad_clip=0",
    "unet2d.loss_weighting=min_snr unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.beta_schedule=linear unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "objective=v unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.epochs=6",
    "unet2d.epochs=6 unet2d.lr=2e-3 unet2d.lr_schedule=cosine unet2d.lr_warmup_steps=100",
    "unet2d.epochs=12",
]


def parse_setting(text: str) -> dict:
    """'a.b=1 c=x' -> {'a.b': 1, 'c': 'x'}, values read as YAML (as `dvc exp run -S` reads them)."""
    overrides = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"setting {text!r}: {item!r} is not key=value (e.g. unet2d.lr=2e-3)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def apply(raw: dict, overrides: dict) -> dict:
    """params.yaml's dict with dotted-key overrides set; a key params.yaml lacks is an error (as with -S)."""
    raw = json.loads(json.dumps(raw))  # a deep copy of plain data
    for key, value in overrides.items():
        node, *path = raw, *key.split(".")
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{key}: no such section in params.yaml")
            node = node[part]
        if path[-1] not in node:
            raise ParamsError(f"{key}: no such key in params.yaml")
        node[path[-1]] = value
    return raw


def setting_params(text: str):
    params = params_from_dict(apply(yaml.safe_load((ROOT / "params.yaml").read_text()), parse_setting(text)))
    if params.unet2d.corruption != "ddpm" or params.unet2d.class_conditional:
        raise ParamsError(f"setting {text!r}: the sweep measures unconditional DDPM models only")
    return params


def measure_samplers(judge: Judge, params, folder: Path, device, lead_only: bool = False) -> dict:
    """{sampler name: compare's metrics} for params.yaml's unet2d sample settings (the first one only if lead_only),
    drawn from the model folder as the sample stage draws from models/unet2d.

    Read back from disk, a scheduler config has no `_use_default_values`, so samplers inherit all of DDPM's values
    (e.g. its timestep spacing) as the sample stage's do; the in-memory config would give them their own defaults.
    """
    sp = replace(params.sample, n=params.sample.size(describe(DATA).n_test))  # sample.n auto, as the stage
    net, scheduler, _ = load_unet2d(folder, device)
    settings = [s for s in sp.settings if s.model == "unet2d"]
    out = {}
    for setting in settings[:1] if lead_only else settings:
        calls = -(-sp.n // sp.batch_size) * expected_evaluations(setting.sampler, setting.steps)
        batch = min(sp.batch_size, sp.n)
        choice = sampling_choice(net, sp.precision, sp.channels_last, device, batch=batch, evaluations=calls)
        x, _ = generate(
            net,
            setting.sampler,
            setting.steps,
            sp.n,
            batch_size=sp.batch_size,
            seed=sp.seed,
            corruption="ddpm",
            trained_config=scheduler.config,
            device=device,
            eta=setting.eta,
            precision=choice.precision,
            channels_last=choice.channels_last,
        )
        quality = judge.measure(x)
        quality.pop("replicates")  # the intervals stay; verdicts across runs use the seed spread
        out[setting.name.removeprefix("unet2d/")] = quality
    return out


def judge_for(params) -> Judge:
    n = params.sample.size(describe(DATA).n_test)  # sample.n auto, as the stage
    judge = Judge.from_files(ROOT / "models" / "classifier" / "model.safetensors", DATA, n)
    if judge.classifier is None:  # every verdict here is on FID
        refuse(f"the sweep ranks settings by FID, which needs a classifier: {judge.no_classifier}")
    return judge


def one(text: str, out: Path | None) -> None:
    """Train, sample and measure one setting; its row goes to `out` (JSON) if given, and is printed."""
    params = setting_params(text)
    judge = judge_for(params)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trained = train_model("unet2d", params, data_root=DATA, out=Path(tmp) / "unet2d", desc=text or "defaults")
        train_s, result = time.perf_counter() - start, trained.result
        samplers = measure_samplers(judge, params, Path(tmp) / "unet2d", trained.device)
    best = min(samplers, key=lambda k: samplers[k]["fid"])
    row = {
        "setting": text,
        "n": judge.n,
        "steps": result.steps,
        "train_s": round(train_s, 1),
        "final_loss": result.final_loss,
        "floor_fid": judge.floor,
        "best_sampler": best,
        **samplers[best],
        "samplers": samplers,
    }
    if out is not None:
        files.write_json(out, row)
    print(
        f"[{text or 'defaults'}] {best}: FID {row['fid']:.2f} ({row['fid'] / judge.floor:.2f}x floor), "
        f"recognised {row['recognised']:.3f}, train {train_s:.0f} s",
        flush=True,
    )


def budget(text: str, every: int, out: Path) -> None:
    """The budget as a second frame: one run of `unet2d.epochs` epochs, its EMA measured every `every` epochs with
    the lead sampler. With a constant lr, the EMA after k epochs is what a k-epoch run saves (the EMA's decay is a
    function of the step alone), so one run gives every shorter budget too."""
    params = setting_params(text)
    if params.unet2d.lr_schedule != "constant":
        raise ParamsError(f"setting {text!r}: budget needs unet2d.lr_schedule=constant (a schedule depends on the end)")
    judge = judge_for(params)
    steps_per_epoch = -(-len(load_split(DATA, train=True, n=params.data.n_train)[1]) // params.unet2d.batch_size)
    here = machine()
    rows = []

    scheduler = noise_schedule(params)

    def measure(step: int, net) -> None:
        if step == 0:
            return
        with tempfile.TemporaryDirectory() as tmp:
            meta = {**unet2d_meta(params), "run_id": ""}
            save_unet2d(Path(tmp) / "unet2d", copy.deepcopy(net).cpu(), scheduler, meta)
            device = next(net.parameters()).device
            metrics = measure_samplers(judge, params, Path(tmp) / "unet2d", device, lead_only=True)
        ((name, m),) = metrics.items()
        rows.append({"epochs": step / steps_per_epoch, "steps": step, "sampler": name, **m})
        this = {"setting": text, "machine": here, "floor_fid": judge.floor, "rows": rows}

        def replace_own(old: dict | None) -> dict:  # its earlier run on this machine kind; others' runs stay
            runs = [r for r in (old or {"runs": []})["runs"] if (r["setting"], r["machine"]) != (text, here)]
            return {"runs": [*runs, this]}

        files.update_json(out, replace_own)  # re-read under a lock: budget runs beside this one keep theirs
        print(
            f"[{text or 'defaults'}] {step / steps_per_epoch:g} epochs: {name} FID {m['fid']:.2f} "
            f"({m['fid'] / judge.floor:.2f}x floor), recognised {m['recognised']:.3f}",
            flush=True,
        )

    every_steps = every * steps_per_epoch
    trained = train_model(
        "unet2d", params, data_root=DATA, on_sample=measure, sample_every=every_steps, desc=text or "defaults"
    )
    measure(trained.result.steps, trained.model)


def with_seeds(settings: list[str], seeds: list[int] | None) -> list[str]:
    """Each setting once per training seed (`seed=k` appended), or as given without --seeds."""
    if not seeds:
        return settings
    return [f"{text} seed={k}".strip() for text in settings for k in seeds]


def run(settings: list[str], jobs: int, out: Path) -> None:
    """Every setting in its own process, `jobs` at a time; rows gathered into `out` as they finish."""
    for text in settings:  # every setting checked before any work starts
        params_from_dict(apply(yaml.safe_load((ROOT / "params.yaml").read_text()), parse_setting(text)))
    for need in (DATA / "manifest.json", ROOT / "models" / "classifier" / "model.safetensors"):
        if not need.is_file():
            refuse(f"{need.relative_to(ROOT)}: missing; run `dvc repro train-classifier` first")
    work = Path(tempfile.mkdtemp(prefix="sweep-"))  # one row file per process, merged into `out`
    env = dict(os.environ)
    if jobs > 1:  # the cores shared out (one job keeps the stage's own thread count, hence its arithmetic)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // jobs))
    pending = list(enumerate(settings))
    running: dict[int, subprocess.Popen] = {}
    rows: dict[int, dict] = {}

    def gather() -> None:
        results = {"machine": machine(), "rows": [rows[i] for i in sorted(rows)]}
        files.write_json(out, results)

    while pending or running:
        while pending and len(running) < jobs:
            i, text = pending.pop(0)
            running[i] = subprocess.Popen(
                [sys.executable, __file__, "one", "--setting", text, "--out", str(work / f"{i}.json")], env=env
            )
        time.sleep(2)
        for i, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            part = work / f"{i}.json"
            if proc.returncode == 0 and part.is_file():
                rows[i] = json.loads(part.read_text())
                gather()
            else:
                print(f"setting {settings[i]!r} failed (exit {proc.returncode})", file=sys.stderr)
    gather()


def label(text: str) -> str:
    return f"`{text}`" if text else "defaults (params.yaml)"


def markdown_table(results: dict) -> str:
    lines = [
        "| setting (`dvc exp run -S` keys) | best sampler | FID | x floor | recognised | coverage KL |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(results["rows"], key=lambda r: r["fid"]):
        lines.append(
            f"| {label(r['setting'])} | {r['best_sampler']} | {r['fid']:.1f} | "
            f"{r['fid'] / r['floor_fid']:.2f} | {r['recognised']:.3f} | {r['coverage_kl']:.3f} |"
        )
    return "\n".join(lines)


def _ci(r: dict, key: str, fmt: str) -> str:
    value = fmt.format(r[key])
    return f"{value} [{fmt.format(r[key + '_lo'])}, {fmt.format(r[key + '_hi'])}]" if key + "_lo" in r else value


def _pm(r: dict, key: str, fmt: str) -> str:
    """value ± the half-width of its bootstrap interval (invariant to where the interval is centred)."""
    value = fmt.format(r[key])
    return f"{value} ± {fmt.format((r[key + '_hi'] - r[key + '_lo']) / 2)}" if key + "_lo" in r else value


# The long experiment's targets (n = 1000): recognised share, FID against the real-data floor, and a KID interval
# clear of the same run's first point (the lesson's budget).
TARGET_RECOGNISED = 0.88
TARGET_FLOOR_RATIO = 2.5


def missed_targets(row: dict, first: dict, floor: float) -> list[str]:
    """The long experiment's targets that `row` misses (KID judged against `first`, the run's first point)."""
    missed = []
    if row["recognised"] < TARGET_RECOGNISED:
        missed.append(f"recognised >= {TARGET_RECOGNISED}")
    if row["fid"] > TARGET_FLOOR_RATIO * floor:
        missed.append(f"FID <= {TARGET_FLOOR_RATIO}x floor")
    if "kid_hi" not in row or "kid_lo" not in first:
        missed.append("KID (not measured)")
    elif row is first or row["kid_hi"] >= first["kid_lo"]:
        missed.append("KID clear of the first point")
    return missed


def budget_table(budget: dict) -> str:
    lines = [
        "| run | machine | epochs | steps | sampler | FID ±95% | x floor | KID [95%] | recognised ±95% | coverage KL "
        "| targets missed |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for run_ in budget["runs"]:
        first = run_["rows"][0]
        for r in run_["rows"]:
            kid = _ci(r, "kid", "{:.3g}") if "kid" in r else ""
            missed = missed_targets(r, first, run_["floor_fid"])
            lines.append(
                f"| {label(run_['setting'])} | {run_['machine']} | {r['epochs']:g} | {r['steps']} | {r['sampler']} | "
                f"{_pm(r, 'fid', '{:.1f}')} | {r['fid'] / run_['floor_fid']:.2f} | {kid} | "
                f"{_pm(r, 'recognised', '{:.3f}')} | {r['coverage_kl']:.3f} | {', '.join(missed) or 'none'} |"
            )
    return "\n".join(lines)


def budget_figure(budget: dict, path: Path) -> None:
    """FID, KID and recognised share against epochs, one line per run that carries intervals (error bars: 95%)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run_ in budget["runs"]:
        rows = [r for r in run_["rows"] if "kid_lo" in r]
        if not rows:
            continue
        epochs = [r["epochs"] for r in rows]
        for ax, key in zip(axes, ("fid", "kid", "recognised"), strict=True):
            y = np.array([r[key] for r in rows])
            err = np.array([[r[key] - r[key + "_lo"], r[key + "_hi"] - r[key]] for r in rows]).T
            ax.errorbar(epochs, y, yerr=err, marker="o", capsize=3, label=f"{run_['setting']} ({run_['machine']})")
    floor = budget["runs"][-1]["floor_fid"]
    axes[0].axhline(TARGET_FLOOR_RATIO * floor, color="grey", ls="--", label=f"target: {TARGET_FLOOR_RATIO}x floor")
    axes[2].axhline(TARGET_RECOGNISED, color="grey", ls="--", label=f"target: {TARGET_RECOGNISED}")
    for ax, title in zip(axes, ("FID (lower is better)", "KID (lower is better)", "recognised share"), strict=True):
        ax.set(title=title, xlabel="epochs")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def by_seed(results: dict) -> dict[str, dict[int, dict]]:
    """{setting without its seed: {seed: row}}, in the order the settings first appear."""
    groups: dict[str, dict[int, dict]] = {}
    for r in results["rows"]:
        overrides = parse_setting(r["setting"])
        seed = overrides.pop("seed", None)
        base = " ".join(f"{k}={v}" for k, v in overrides.items())
        groups.setdefault(base, {})[seed] = r
    return groups


def seeds_table(results: dict) -> str:
    """Per setting and sampler: mean and spread over training seeds, the mean sampling interval, and the verdict
    against the defaults (Welch's t over seeds) or, for samplers of the defaults, against its best sampler (paired
    by seed)."""
    groups = by_seed(results)
    base = groups.get("")
    lines = [
        "| setting | sampler | seeds | FID mean (sd over seeds) | FID sampling ±95% | KID mean (sd) | "
        "recognised mean (sd) | FID per seed | vs defaults, same sampler |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for text, runs in groups.items():
        seeds = sorted(runs)
        for sampler in runs[seeds[0]]["samplers"]:
            got = [runs[k]["samplers"][sampler] for k in seeds]
            fid = np.array([m["fid"] for m in got])
            kid = np.array([m["kid"] for m in got])
            rec = np.array([m["recognised"] for m in got])
            half = np.mean([(m["fid_hi"] - m["fid_lo"]) / 2 for m in got])
            if text and base is not None and len(seeds) > 1:
                theirs = [base[k]["samplers"][sampler]["fid"] for k in sorted(base)]
                against = seed_verdict(fid, theirs, "fid")
            elif not text and len(seeds) > 1:
                best = min(
                    runs[seeds[0]]["samplers"], key=lambda s: np.mean([runs[k]["samplers"][s]["fid"] for k in seeds])
                )
                best_fid = [runs[k]["samplers"][best]["fid"] for k in seeds]
                against = "best sampler" if sampler == best else f"{seed_verdict(fid, best_fid, 'fid', True)} vs {best}"
            else:
                against = ""
            sd = lambda v: f"{v.std(ddof=1):.3g}" if len(v) > 1 else "-"  # noqa: E731
            lines.append(
                f"| {label(text)} | {sampler} | {len(seeds)} | {fid.mean():.1f} ({sd(fid)}) | {half:.1f} | "
                f"{kid.mean():.3g} ({sd(kid)}) | {rec.mean():.3f} ({sd(rec)}) | "
                f"{', '.join(f'{v:.1f}' for v in fid)} | {against} |"
            )
    return "\n".join(lines)


def table(results: dict | None, budget: dict | None, seeds: dict | None) -> None:
    shown = []
    if results or budget:
        parts = ["# A wider screen on a GPU, and the budget", ""]
        if results:
            shown.append(markdown_table(results))
            parts += [
                shown[-1],
                "",
                f"Each setting trained once at the full budget (3 epochs, 1407 steps) on {results['machine']}, "
                "several at once; not this CPU's arithmetic, so a ranking to confirm on the CPU as DVC experiments.",
                "",
            ]
        if budget:
            machines = sorted({r["machine"] for r in budget["runs"]})
            shown.append(budget_table(budget))
            parts += [
                shown[-1],
                "",
                f"The budget as a second frame: one run each, its EMA measured every few epochs "
                f"({', '.join(machines)}); brackets are 95% intervals over the sample set (KID: over its subsets). "
                f"*targets missed*: the long experiment's targets, recognised >= {TARGET_RECOGNISED}, FID within "
                f"{TARGET_FLOOR_RATIO}x the floor and a KID interval entirely below the run's first point's.",
                "",
            ]
        if budget:
            budget_figure(budget, BUDGET_FIGURE)
            parts += [f"![quality against epochs]({BUDGET_FIGURE.name})", ""]
        parts += ["Made by `python ablations/sweep.py table` from ablations/sweep.json and ablations/budget.json.", ""]
        files.write_text(TABLE, "\n".join(parts))  # atomic; creates docs/ablation/ if missing
    if seeds:
        shown.append(seeds_table(seeds))
        files.write_text(
            SEEDS_TABLE,
            "\n".join(
                [
                    "# The ablation's claims over training seeds",
                    "",
                    shown[-1],
                    "",
                    f"Each setting trained with each training seed (`-S seed=k`) at the lesson's budget (3 epochs) on "
                    f"{seeds['machine']}, several at once, and sampled with every unet2d sampler of params.yaml (n = "
                    f"{seeds['rows'][0]['n']}, sample seed fixed). *sd over seeds*: the training-seed spread, "
                    "which holds the sampling noise too; *FID sampling ±95%*: the mean half-width of each run's "
                    "bootstrap interval over its sample set. *vs defaults*: better / worse only where Welch's 95% t "
                    "interval of the difference of seed means excludes 0, else within noise; the defaults' samplers "
                    "are compared with its best one, paired by seed.",
                    "",
                    "Made by `python ablations/sweep.py table` from ablations/seeds.json "
                    "(`python ablations/sweep.py run --seeds 0 1 2 --jobs 9 --out ablations/seeds.json`).",
                    "",
                ]
            ),
        )
    print("\n\n".join(shown))


MAX_JOBS = 64  # processes at once; more than any machine here trains side by side


def refuse_out(parser: argparse.ArgumentParser, out: Path, key: str, command: str) -> None:
    """`out` is rewritten whole (run) or added to (budget): refuse a folder, and a file of another kind (a budget
    file given to run would lose its runs) or one that is not JSON, before any work."""
    if out.is_dir():
        parser.error(f"--out: {out} is a folder; allowed: a JSON file (created if missing)")
    if not out.exists():
        return
    try:
        held = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--out: {out} is not a readable JSON file ({e}); allowed: a results file of `{command}`")
    if not isinstance(held, dict) or not isinstance(held.get(key), list | dict):
        parser.error(
            f"--out: {out} holds no {key!r} (not a results file of `{command}`); allowed: a results file "
            f"of `{command}`, or a new path"
        )


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "one", "budget", "table"])
    parser.add_argument("--setting", action="append", help="overrides as `dvc exp run -S` takes them (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run: train each setting once per training seed")
    parser.add_argument("--jobs", type=int, default=1, help="settings trained at once")
    parser.add_argument(
        "--out",
        type=Path,
        help="run: default ablations/sweep.json (ablations/seeds.json with --seeds); budget: ablations/budget.json",
    )
    parser.add_argument("--every", type=int, default=3, help="budget: measure every k epochs")
    args = parser.parse_args(argv)
    # Every argument is checked before any training and before a committed file is touched.
    try:
        if args.command == "one":
            one((args.setting or [""])[0], args.out)
        elif args.command == "budget":
            text = (args.setting or [""])[0]
            p = setting_params(text)
            # epochs auto as the stage resolves it; only a folder's size needs the data
            size = p.data.n_train or (describe(DATA).n_train if p.data.dataset == "folder" else 0)
            epochs = training_epochs(p.unet2d.epochs, p.data.dataset, size)
            if not 1 <= args.every <= epochs:
                parser.error(f"--every: got {args.every}; allowed: 1..{epochs} (the setting's unet2d.epochs)")
            out = args.out or BUDGET
            refuse_out(parser, out, "runs", "budget")
            budget(text, args.every, out)
        elif args.command == "run":
            if not 1 <= args.jobs <= MAX_JOBS:
                parser.error(f"--jobs: got {args.jobs}; allowed: 1..{MAX_JOBS}")
            if args.seeds is not None:
                if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
                    parser.error(f"--seeds: got {args.seeds}; allowed: 2 or more different seeds (a spread needs two)")
                bad = [k for k in args.seeds if not 0 <= k <= MAX_SEED]
                if bad:
                    parser.error(f"--seeds: got {bad[0]}; allowed: 0..{MAX_SEED} (as params.yaml's seed)")
            out = args.out or (SEEDS if args.seeds else RESULTS)
            refuse_out(parser, out, "rows", "run")
            default = SEED_SETTINGS if args.seeds else SETTINGS
            settings = with_seeds(args.setting if args.setting is not None else default, args.seeds)
            run(settings, args.jobs, out)
        else:
            # A mistyped --out would read as "no sweep results" and rewrite the table without its rows.
            if args.out is not None and not args.out.is_file():
                parser.error(
                    f"--out: {args.out} does not exist; allowed: a results file of `run` (default: "
                    f"{RESULTS.relative_to(ROOT)})"
                )
            refuse_out(parser, args.out or RESULTS, "rows", "run")
            read = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
            results, budget_, seeds = read(args.out or RESULTS), read(BUDGET), read(SEEDS)
            if not (results or budget_ or seeds):
                refuse("no results yet; run `python ablations/sweep.py run` first")
            table(results, budget_, seeds)
    except ParamsError as e:
        refuse(f"{e}")


if __name__ == "__main__":
    main()
