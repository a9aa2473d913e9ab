"""The ablation: one DVC experiment per design choice of the UNet2DModel, each against the default, and the table and
chart made from them (docs/ablation/table.md and docs/ablation.png are regenerated from here, never typed by hand).

    python ablations/run.py run --budget screen    # queue every axis value, run the queue (-j 1), collect
    python ablations/run.py run --budget full --only default "EMA 0.999"   # confirm a few at the full budget
    python ablations/run.py run --budget full --only default "objective v" --seeds 0 1 2   # each with 3 seeds
    python ablations/run.py queue --budget screen  # only queue (then: dvc queue start; dvc queue status)
    python ablations/run.py collect                # finished abl-* experiments and the workspace's own dvc repro
                                                   # (the defaults at the full budget) -> ablations/results.json
    python ablations/run.py table                  # results.json -> docs/ablation/table.md + docs/ablation.png

Budgets: `full` is the default pipeline (the lesson's 3 epochs, every default sampler setting, n from params.yaml);
`screen` stops training after 200 steps and samples 300 images with two samplers, a fraction of the full budget's
cost. Rankings at the screening budget favour choices that learn fast; confirm the winners at `full`.

Every row is reproducible from its `dvc exp` params: `dvc exp apply <name>` or `dvc exp run` with the same -S values.
The collected rows are kept in ablations/results.json (in git), so they outlive the local DVC and MLflow state.
With --seeds each experiment runs once per training seed (`-S seed=k`, named `...-seed<k>`); the table then gives
mean and spread, and every row its verdict against the defaults: better / worse only beyond the noise (the spread
over seeds where both have 2 or more, else the sampling intervals compare measured), otherwise within noise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scratch_diffusion import files
from scratch_diffusion.cli import ScriptParser, refuse
from scratch_diffusion.config import MAX_SEED
from scratch_diffusion.hardware import machine
from scratch_diffusion.metrics import interval_verdict, seed_verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "ablations" / "results.json"
CHART = ROOT / "docs" / "ablation.png"
TABLE = ROOT / "docs" / "ablation" / "table.md"  # the whole file is generated; docs/ablation.md explains it

# One entry per experiment: (label, the -S overrides that make it). Each axis changes one choice of the default.
# The beta schedule has no axis: params.yaml's cosine schedule is compared with linear over training seeds by
# ablations/sweep.py (SEED_SETTINGS).
AXES: list[tuple[str, dict]] = [
    ("default", {}),
    ("objective eps", {"objective": "eps"}),
    ("objective v", {"objective": "v"}),
    # Flow matching (rectified flow): the straight path and its velocity, its times uniform or logit-normal (SD3).
    ("objective flow", {"objective": "flow"}),
    ("flow, logit-normal t", {"objective": "flow", "unet2d.time_sampling": "logit_normal"}),
    ("min-SNR weighting", {"unet2d.loss_weighting": "min_snr"}),
    ("EMA off", {"unet2d.ema_decay": 0}),
    ("EMA 0.999", {"unet2d.ema_decay": 0.999}),
    ("warm-up + cosine lr", {"unet2d.lr_schedule": "cosine", "unet2d.lr_warmup_steps": "WARMUP"}),
    ("no timestep conditioning", {"unet2d.conditioning": "none"}),
    # Same 3 epochs, smaller batches: more optimizer steps for the same images (on the CPU images/s hardly depends
    # on the batch, so these cost about what the default does). Grids and checkpoints keep the default's cadence
    # in images.
    ("batch 64", {"unet2d.batch_size": 64, "unet2d.sample_every": 400, "unet2d.checkpoint_every": 400}),
    ("batch 32", {"unet2d.batch_size": 32, "unet2d.sample_every": 800, "unet2d.checkpoint_every": 800}),
    # The budget itself, the second frame: twice the lesson's epochs (`ablations/sweep.py budget` measures quality
    # against epochs in one long run).
    ("6 epochs", {"unet2d.epochs": 6}),
]

SCREEN_SETTINGS = (
    "[{model: basic, sampler: toy, steps: 5}, {model: unet2d, sampler: ddim, steps: 50}, "
    "{model: unet2d, sampler: dpmsolver++, steps: 20}]"
)
BUDGETS = {
    "screen": {
        "overrides": {"unet2d.max_steps": 200, "sample.n": 300, "sample.settings": SCREEN_SETTINGS},
        "warmup": 20,
    },
    "full": {"overrides": {}, "warmup": 100},
}
# Keys that set the budget rather than a design choice: left out of a row's "change" column.
BUDGET_KEYS = {"unet2d.max_steps", "sample.n", "sample.settings"}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def exp_name(budget: str, label: str, seed: int | None = None) -> str:
    return f"abl-{budget}-{slug(label)}" + ("" if seed is None else f"-seed{seed}")


def overrides(budget: str, label: str) -> dict:
    axis = dict(AXES)[label]
    axis = {k: (BUDGETS[budget]["warmup"] if v == "WARMUP" else v) for k, v in axis.items()}
    return {**BUDGETS[budget]["overrides"], **axis}


def dvc(*args: str, capture: bool = False) -> str:
    """Run the dvc of this interpreter's environment; exit with its message on failure."""
    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe if exe.exists() else "dvc"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=capture)
    if proc.returncode != 0:
        sys.exit(f"error: `{' '.join(cmd[:4])} ...` failed ({proc.returncode})\n{proc.stderr if capture else ''}")
    return proc.stdout if capture else ""


def selected(only: list[str] | None) -> list[str]:
    labels = [label for label, _ in AXES]
    unknown = [o for o in only or [] if o not in labels]
    if unknown:
        refuse(f"--only: unknown experiment(s) {unknown}; allowed: {labels}")
    return only or labels


def queue(budget: str, only: list[str] | None, seeds: list[int] | None = None) -> list[str]:
    names = []
    for label in selected(only):
        for seed in seeds or [None]:
            name = exp_name(budget, label, seed)
            settings = overrides(budget, label) | ({} if seed is None else {"seed": seed})
            args = [a for k, v in settings.items() for a in ("-S", f"{k}={v}")]
            dvc("exp", "run", "--queue", "--name", name, *args)
            names.append(name)
    return names


def wait_for_queue(poll_s: float = 30.0) -> None:
    while True:
        status = dvc("queue", "status", capture=True)
        if not re.search(r"\b(Queued|Running)\b", status):
            print(status)
            return
        time.sleep(poll_s)


# ---- collecting: dvc exp show --json -> rows ---------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _data(rev: dict, kind: str, file: str) -> dict:
    return ((rev.get("data") or {}).get(kind) or {}).get(file, {}).get("data") or {}


def experiments_from_show(show: list) -> list[tuple[dict, dict]]:
    """(baseline rev, experiment rev) for every finished experiment in `dvc exp show --json` output."""
    found = []
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue  # queued or running: its data are the baseline's, not its own
            for rev in exp.get("revs") or []:
                if rev.get("name") and not rev.get("error") and _data(rev, "metrics", "metrics/compare.json"):
                    found.append((baseline, rev))
    return found


def row_from(baseline: dict, rev: dict) -> dict:
    params = flatten(_data(rev, "params", "params.yaml"))
    base = flatten(_data(baseline, "params", "params.yaml"))
    diff = {k: v for k, v in params.items() if base.get(k) != v}
    compare = _data(rev, "metrics", "metrics/compare.json")
    unet = {s: m for s, m in compare["settings"].items() if s.startswith("unet2d/")}
    best = min(unet, key=lambda s: unet[s]["fid"])
    cost = _data(rev, "metrics", "metrics/cost/train-unet2d.json")
    return {
        "name": rev["name"],
        "commit": baseline["rev"][:7],
        "params_diff": diff,
        "seed": params.get("seed"),
        "change": ", ".join(f"{k}={v}" for k, v in diff.items() if k not in BUDGET_KEYS | {"seed"}) or "(default)",
        "train_wall_s": cost.get("wall_s"),
        "n": compare["n"],
        "floor_fid": compare["real_floor_fid"],
        "best_sampler": best.removeprefix("unet2d/"),
        "fid": unet[best]["fid"],
        "fid_lo": unet[best].get("fid_lo"),  # compare's 95% sampling interval; None where compare.json has none
        "fid_hi": unet[best].get("fid_hi"),
        "recognised": unet[best]["recognised"],
        "coverage_kl": unet[best]["coverage_kl"],
        "samplers": {
            s.removeprefix("unet2d/"): {k: unet[s][k] for k in ("fid", "recognised", "coverage_kl")} for s in unet
        },
    }


def results_commit() -> str:
    """The commit whose dvc.lock the workspace's results are (not HEAD: later commits may not touch them)."""
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "dvc.lock"]).returncode != 0:
        return "workspace"  # results newer than any commit
    last = subprocess.run(
        [*git, "log", "-1", "--format=%h", "--abbrev=7", "--", "dvc.lock"], text=True, capture_output=True
    )
    return last.stdout.strip() or "workspace"


def collect() -> dict:
    show = json.loads(dvc("exp", "show", "--json", "--all-commits", capture=True))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    for baseline, rev in experiments_from_show(show):
        m = re.fullmatch(r"abl-(screen|full)-(.+?)(?:-seed\d+)?", rev["name"])
        if not m:
            continue
        # An experiment whose axis is not in AXES (results.json holds some) keeps the label of its collected row.
        known = results["rows"].get(rev["name"], {}).get("label", m.group(2))
        label = next((label for label, _ in AXES if slug(label) == m.group(2)), known)
        row = {"budget": m.group(1), "label": label, **row_from(baseline, rev), "machine": machine()}
        results["rows"][rev["name"]] = row
    # The workspace's own `dvc repro` at the full budget (params.yaml as committed): the defaults' row.
    workspace = next((rev for rev in show if rev.get("rev") == "workspace"), None)
    if workspace and _data(workspace, "metrics", "metrics/compare.json"):
        params = flatten(_data(workspace, "params", "params.yaml"))
        if not params.get("unet2d.max_steps"):
            row = row_from({"rev": results_commit(), "data": workspace["data"]}, workspace)
            label = "defaults (dvc repro)"
            results["rows"]["dvc-repro"] = {
                **row,
                "name": "dvc repro",
                "budget": "full",
                "label": label,
                "machine": machine(),
            }
    files.write_json(RESULTS, results)
    print(f"{len(results['rows'])} rows in {RESULTS.relative_to(ROOT)}")
    return results


# ---- the table and the chart ----------------------------------------------------------------------------------------


def groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of one experiment (its seeds) together, in table order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["budget"], r["label"]), []).append(r)
    return list(out.values())


def against_default(group: list[dict], reference: list[dict] | None) -> str:
    """better / worse / within noise against the defaults at the same budget, by FID: over training seeds where
    both sides have 2 or more, else by the two runs' sampling intervals; '-' where neither was measured."""
    if reference is None or group is reference:
        return "reference" if group is reference else "-"
    if len(group) > 1 and len(reference) > 1:
        return seed_verdict([r["fid"] for r in group], [r["fid"] for r in reference], "fid")
    a, b = group[0], reference[0]
    if len(group) == 1 and len(reference) == 1 and a.get("fid_lo") is not None and b.get("fid_lo") is not None:
        return interval_verdict(a["fid"], (a["fid_lo"], a["fid_hi"]), b["fid"], (b["fid_lo"], b["fid_hi"]), "fid")
    return "-"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| budget | experiment | change (`-S`) | seeds | train min | best sampler | FID | x floor | recognised | "
        "coverage KL | vs defaults |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    grouped = groups(rows)
    reference = {}
    for g in grouped:  # the defaults of each budget: the `default` axis, else the workspace's own dvc repro
        if g[0]["label"] == "default" or (g[0]["name"] == "dvc repro" and g[0]["budget"] not in reference):
            reference[g[0]["budget"]] = g
    for g in grouped:
        r = g[0]
        fid = np.array([x["fid"] for x in g])
        wall = [x["train_wall_s"] for x in g if x.get("train_wall_s")]
        if len(g) > 1:
            fid_text = f"{fid.mean():.1f} (sd {fid.std(ddof=1):.1f})"
        elif r.get("fid_lo") is not None:
            fid_text = f"{r['fid']:.1f} ± {(r['fid_hi'] - r['fid_lo']) / 2:.1f}"
        else:
            fid_text = f"{r['fid']:.1f}"
        seeds = ", ".join(str(x.get("seed", "")) for x in g) if len(g) > 1 else "1"
        samplers = sorted({x["best_sampler"] for x in g})
        lines.append(
            f"| {r['budget']} | {r['label']} | `{r['change']}` | {seeds} | "
            f"{f'{np.mean(wall) / 60:.1f}' if wall else '-'} | {', '.join(samplers)} | {fid_text} | "
            f"{fid.mean() / r['floor_fid']:.2f} | {np.mean([x['recognised'] for x in g]):.3f} | "
            f"{np.mean([x['coverage_kl'] for x in g]):.3f} | "
            f"{against_default(g, reference.get(r['budget']))} |"
        )
    return "\n".join(lines)


def ordered(results: dict) -> list[dict]:
    axes = {label: i for i, (label, _) in enumerate(AXES)}

    def rank(r: dict) -> int:  # the defaults, then earlier defaults kept for comparison, then the axes
        if r["name"] == "dvc repro":
            return -2
        return -1 if r["name"].startswith("dvc repro") else axes.get(r["label"], 99)

    # A total order (label and name break the ties), so that the table is the same whatever order the rows were
    # collected in.
    return sorted(
        results["rows"].values(),
        key=lambda r: (r["budget"] != "full", rank(r), r["label"], r["name"], r.get("seed") or 0),
    )


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    points = []  # (x, y, label)
    for budget, marker in (("screen", "o"), ("full", "s")):
        pts = [r for r in rows if r["budget"] == budget and r.get("train_wall_s")]
        if not pts:
            continue
        # FID over the real-vs-real floor at the same n: FIDs at different n (screen 300, full 1000) do not compare.
        xy = [(r["train_wall_s"] / 60, r["fid"] / r["floor_fid"], r["label"]) for r in pts]
        ax.scatter([x for x, _, _ in xy], [y for _, y, _ in xy], marker=marker, label=f"{budget} (n={pts[0]['n']})")
        points += xy
    ax.set(
        xlabel="train-unet2d wall time (min)",
        ylabel="FID / real-data floor at the same n (lower is better)",
        yscale="log",
        title="UNet2DModel ablation: quality against training time",
    )
    ax.legend()
    # Labels to the right of their points, pushed up (in display space) until none overlaps a nearby one.
    fig.canvas.draw()
    line_px, placed = 11.0, []
    for x, y, label in sorted(points, key=lambda p: p[1]):
        px, py = ax.transData.transform((x, y))
        ly = py
        for qx, qy in sorted(placed, key=lambda q: q[1]):
            if abs(qx - px) < 150 and abs(qy - ly) < line_px:
                ly = qy + line_px
        placed.append((px, ly))
        offset_pt = (ly - py) * 72 / fig.dpi
        ax.annotate(label, (x, y), fontsize=7, xytext=(6, offset_pt), textcoords="offset points", va="center")
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def table(results: dict) -> None:
    rows = ordered(results)
    if not rows:
        refuse(f"{RESULTS.relative_to(ROOT)} has no rows; run `python ablations/run.py collect` first")
    chart(rows, CHART)
    machines = sorted({r["machine"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    text = "\n".join(
        [
            "# UNet2DModel ablation: every experiment",
            "",
            markdown_table(rows),
            "",
            f"Machine: {'; '.join(machines)}. Code: {', '.join(commits)}. FID and recognised share are those of the "
            "experiment's best UNet2DModel sampler (lowest FID), averaged over its seeds where it has several; \"x "
            'floor" is FID over the real-vs-real floor at the same n. FID: mean (sd over seeds), or value ± the 95% '
            "sampling interval's half-width where compare measured one. *vs defaults*: better / worse only beyond the "
            "noise (Welch's t over seeds where both sides have 2 or more, else the two sampling intervals), otherwise "
            "within noise; '-' where no interval was measured (a single run, so no verdict). Made by "
            "`python ablations/run.py table` from ablations/results.json (with the chart docs/ablation.png).",
            "",
        ]
    )
    files.write_text(TABLE, text)  # atomic; creates docs/ablation/ if missing
    print(markdown_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "queue", "collect", "table"])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="screen")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="experiments to queue (labels of AXES)")
    parser.add_argument("--seeds", type=int, nargs="+", help="queue each experiment once per training seed")
    args = parser.parse_args(argv)
    if args.seeds is not None:  # checked before anything is queued or a committed file is touched
        if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds: got {args.seeds}; allowed: 2 or more different seeds (a spread needs two)")
        bad = [k for k in args.seeds if not 0 <= k <= MAX_SEED]
        if bad:
            parser.error(f"--seeds: got {bad[0]}; allowed: 0..{MAX_SEED} (as params.yaml's seed)")
    if args.command == "table" and not RESULTS.is_file():
        refuse(f"{RESULTS.relative_to(ROOT)}: missing; run `python ablations/run.py collect` first")
    if args.command in ("run", "queue"):
        names = queue(args.budget, args.only, args.seeds)
        print(f"queued {len(names)}: {' '.join(names)}")
    if args.command == "run":
        dvc("queue", "start", "-j", "1")
        wait_for_queue()
    if args.command in ("run", "collect"):
        table(collect())
    if args.command == "table":
        table(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
