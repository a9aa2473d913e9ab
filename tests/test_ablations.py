"""The ablation scripts' seed bookkeeping and verdicts, on rows shaped as their runs write them (the runs
themselves are exercised end to end in test_pipeline.py)."""

import importlib.util
import shutil

import pytest

from tests.conftest import REPO


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "ablations" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_row(label: str, fid: float, seed: int | None = None, half: float | None = None) -> dict:
    return {
        "name": f"abl-full-{label}",
        "budget": "full",
        "label": label,
        "change": label,
        "seed": seed,
        "train_wall_s": 60.0,
        "best_sampler": "ddim-50-eta1",
        "fid": fid,
        "floor_fid": 10.0,
        "recognised": 0.8,
        "coverage_kl": 0.01,
        "fid_lo": None if half is None else fid - half,
        "fid_hi": None if half is None else fid + half,
    }


def test_dvc_ablation_rows_get_verdicts_from_both_spreads():
    run = script("run")
    rows = [run_row("default", f, s) for s, f in enumerate([60.0, 62.0, 61.0])]
    rows += [run_row("objective v", f, s) for s, f in enumerate([80.0, 79.0, 82.0])]  # beyond the seed spread
    rows += [run_row("EMA off", f, s) for s, f in enumerate([55.0, 75.0, 64.0])]  # inside it
    rows += [run_row("batch 32", 61.5, half=5.0), run_row("6 epochs", 45.0)]  # one run each
    table = run.markdown_table(rows).splitlines()
    verdict = {line.split(" | ")[1]: line.split(" | ")[-1].rstrip(" |") for line in table[2:]}
    assert verdict == {
        "default": "reference",
        "objective v": "worse",
        "EMA off": "within noise",
        "batch 32": "-",
        "6 epochs": "-",
    }
    assert "| 0, 1, 2 |" in table[2] and "61.0 (sd 1.0)" in table[2]
    single = run.markdown_table([run_row("default", 60.0, half=4.0), run_row("batch 32", 70.0, half=4.0)])
    assert single.splitlines()[-1].endswith("| worse |") and "70.0 ± 4.0" in single


def test_seed_experiments_are_named_and_queued_per_seed():
    run = script("run")
    assert run.exp_name("full", "objective v", 2) == "abl-full-objective-v-seed2"
    assert run.exp_name("full", "objective v") == "abl-full-objective-v"
    with pytest.raises(SystemExit):
        run.main(["queue", "--seeds", "1"])  # a spread needs two


def test_sweep_seed_table_compares_settings_and_samplers():
    sweep = script("sweep")
    assert sweep.with_seeds(["", "objective=eps"], [0, 1]) == [
        "seed=0",
        "seed=1",
        "objective=eps seed=0",
        "objective=eps seed=1",
    ]

    def row(setting, ddim, dpm):
        m = lambda f: {"fid": f, "fid_lo": f - 3, "fid_hi": f + 3, "kid": f / 10, "recognised": 0.8}  # noqa: E731
        return {"setting": setting, "n": 1000, "samplers": {"ddim-50-eta1": m(ddim), "dpmsolver++-20": m(dpm)}}

    rows = [
        row("seed=0", 60, 70),
        row("seed=1", 70, 80.5),
        row("seed=2", 65, 74),
        row("objective=eps seed=0", 700, 900),
        row("objective=eps seed=1", 720, 950),
        row("objective=eps seed=2", 710, 940),
    ]
    lines = sweep.seeds_table({"machine": "test", "rows": rows}).splitlines()
    assert lines[2].endswith("| best sampler |") and "| 65.0 (5) |" in lines[2]
    assert lines[3].endswith("| worse vs ddim-50-eta1 |")  # paired by seed: +10, +10.5, +9
    assert lines[4].startswith("| `objective=eps` | ddim-50-eta1 | 3 |") and lines[4].endswith("| worse |")


def test_budget_rows_are_judged_against_the_long_experiments_targets():
    sweep = script("sweep")

    def point(epochs, fid, kid, kid_lo, kid_hi, recognised):
        return {
            "epochs": epochs,
            "steps": epochs * 469,
            "sampler": "ddim-50-eta1",
            "fid": fid,
            "kid": kid,
            "kid_lo": kid_lo,
            "kid_hi": kid_hi,
            "recognised": recognised,
            "coverage_kl": 0.01,
        }

    rows = [point(3, 80, 190, 95, 330, 0.80), point(6, 48, 62, 4, 160, 0.871), point(12, 30, 20, 2, 60, 0.90)]
    first = rows[0]
    assert sweep.missed_targets(rows[0], first, 12.5) == [
        "recognised >= 0.88",
        "FID <= 2.5x floor",
        "KID clear of the first point",
    ]
    assert sweep.missed_targets(rows[1], first, 12.5) == [
        "recognised >= 0.88",
        "FID <= 2.5x floor",
        "KID clear of the first point",  # 160 overlaps [95, 330]
    ]
    assert sweep.missed_targets(rows[2], first, 12.5) == []  # 30 <= 31.25, and 60 < 95
    budget = {"runs": [{"setting": "unet2d.epochs=12", "machine": "cpu", "floor_fid": 12.5, "rows": rows}]}
    lines = sweep.budget_table(budget).splitlines()
    assert lines[4].startswith("| `unet2d.epochs=12` | cpu | 12 | 5628 |") and lines[4].endswith("| none |")


# The scripts rewrite committed files (ablations/*.json, docs/ablation/*.md): each runs here from a copy of the
# repository's files, so that ROOT (derived from the script's own path) is the copy and nothing committed is at risk.
LAB_FILES = [
    "params.yaml",
    "ablations/run.py",
    "ablations/sweep.py",
    "ablations/ema_horizons.py",
    "ablations/results.json",
    "ablations/sweep.json",
    "ablations/budget.json",
    "ablations/seeds.json",
    "ablations/ema_horizons.json",
    "docs/ablation/sweep.md",
    "docs/ablation/seeds.md",
    "docs/ablation/ema.md",
    "docs/ablation/table.md",
    "benchmarks/speed.py",
]


@pytest.fixture
def lab(tmp_path, monkeypatch):
    for name in LAB_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def script_in(root, path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], root / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_ARGUMENTS = [
    # The cases: a mistyped --out removed the sweep's rows from docs/ablation/sweep.md; --steps 0 divided by
    # zero; --eta 5 went into the results.
    ("ablations/sweep.py", ["table", "--out", "ablations/sweep.jsn"], "--out: ablations/sweep.jsn does not exist"),
    ("ablations/ema_horizons.py", ["measure", "--steps", "0"], "--steps: got 0, allowed range [1, 10000]"),
    ("ablations/ema_horizons.py", ["measure", "--eta", "5"], "--eta: got 5.0, allowed range [0.0, 1.0]"),
    # More of the class: arguments that were trusted until hours of training had passed, or that wrote nonsense.
    (
        "ablations/ema_horizons.py",
        ["measure", "--sampler", "euler", "--eta", "0.5"],
        "--eta: got 0.5 for sampler 'euler'; eta is for ddim only",
    ),
    (
        "ablations/ema_horizons.py",
        ["measure", "--sampler", "dpmsolver++", "--steps", "1000"],
        "--steps: unet2d/dpmsolver++-1000 has 1000 steps, all of the schedule's num_train_timesteps (1000)",
    ),
    ("ablations/ema_horizons.py", ["measure", "--steps", "2000"], "more than the schedule's num_train_timesteps"),
    ("ablations/ema_horizons.py", ["train", "--warmups", "3", "3"], "--warmups: got [3, 3]; allowed: different"),
    ("ablations/ema_horizons.py", ["train", "--warmups", "5000"], "allowed: different integers 2..1000"),
    ("ablations/ema_horizons.py", ["measure", "--seed", "1", "1"], "--seed: got [1, 1]; allowed: different"),
    ("ablations/sweep.py", ["run", "--out", "ablations/budget.json"], "--out: ablations/budget.json holds no 'rows'"),
    ("ablations/sweep.py", ["budget", "--out", "ablations/sweep.json"], "--out: ablations/sweep.json holds no 'runs'"),
    ("ablations/sweep.py", ["run", "--out", "docs"], "--out: docs is a folder"),
    ("ablations/sweep.py", ["run", "--jobs", "0"], "--jobs: got 0; allowed: 1..64"),
    ("ablations/sweep.py", ["run", "--seeds", "0", "0"], "--seeds: got [0, 0]; allowed: 2 or more different seeds"),
    ("ablations/sweep.py", ["run", "--seeds", "0", "-1"], "--seeds: got -1; allowed: 0..4294967295"),
    ("ablations/sweep.py", ["budget", "--every", "4"], "--every: got 4; allowed: 1..3 (the setting's unet2d.epochs)"),
    ("ablations/run.py", ["queue", "--seeds", "0", "0"], "--seeds: got [0, 0]; allowed: 2 or more different seeds"),
    ("ablations/run.py", ["queue", "--seeds", "1", "4294967296"], "--seeds: got 4294967296; allowed: 0..4294967295"),
    ("benchmarks/speed.py", ["--repeats", "0"], "--repeats: got 0; allowed: 1..100"),
    ("benchmarks/speed.py", ["--steps", "-5"], "--steps: got -5; allowed: 0..100000"),
]


@pytest.mark.parametrize(("path", "argv", "message"), BAD_ARGUMENTS, ids=[" ".join(c[1]) for c in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_before_any_file_is_touched(lab, monkeypatch, capsys, path, argv, message):
    before = snapshot(lab)
    module = script_in(lab, path)
    monkeypatch.setattr("sys.argv", [path, *argv])  # benchmarks/speed.py reads sys.argv itself
    with pytest.raises(SystemExit) as exit_info:
        module.main() if path == "benchmarks/speed.py" else module.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, (exit_info.value.code, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err  # one line, no usage block
    assert snapshot(lab) == before


@pytest.mark.parametrize(
    ("path", "missing", "message"),
    [
        ("ablations/ema_horizons.py", "ablations/ema_horizons.json", "ablations/ema_horizons.json: missing; run"),
        ("ablations/run.py", "ablations/results.json", "ablations/results.json: missing; run"),
    ],
)
def test_a_table_without_results_is_one_line(lab, capsys, path, missing, message):
    (lab / missing).unlink(missing_ok=True)
    before = snapshot(lab)
    with pytest.raises(SystemExit) as exit_info:
        script_in(lab, path).main(["table"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert snapshot(lab) == before


def test_the_table_is_the_committed_one_whatever_order_the_rows_were_collected_in(lab):
    """`ablations/run.py table` regenerates docs/ablation/table.md as committed, and the same from rows collected in
    another order (ties in the ranking used to keep the order of the JSON file)."""
    import json

    module = script_in(lab, "ablations/run.py")
    module.main(["table"])
    table = lab / "docs/ablation/table.md"
    assert table.read_text() == (REPO / "docs/ablation/table.md").read_text()
    results = lab / "ablations/results.json"
    rows = json.loads(results.read_text())
    rows["rows"] = dict(reversed(list(rows["rows"].items())))
    results.write_text(json.dumps(rows))
    module.main(["table"])
    assert table.read_text() == (REPO / "docs/ablation/table.md").read_text()
