"""End to end: the real `dvc repro` and `dvc exp run` on a git+DVC copy of the project with tiny params."""

import json
import re
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import run, run_queue, write_params

pytestmark = pytest.mark.slow

OUTPUTS = [
    "data/dataset/manifest.json",
    "models/basic/model.safetensors",
    "models/basic/run.json",
    "metrics/train_basic.json",
    "plots/train_basic/loss.tsv",
    "plots/train_basic/samples.png",
    "models/unet2d/model_index.json",
    "models/unet2d/unet/diffusion_pytorch_model.safetensors",
    "metrics/train_unet2d.json",
    "plots/train_unet2d/samples.png",
    "samples/basic/toy-3.npz",
    "samples/unet2d/ddim-3.npz",
    "samples/unet2d/heun-2.npz",
    "samples/unet2d/dpmsolver++-3.npz",
    "plots/sample/unet2d-heun-2.png",
    "metrics/sample.json",
    "plots/schedule/schedules.png",
    "plots/schedule/corruption.png",
    "plots/schedule/sampling_steps.png",
    "models/classifier/model.safetensors",
    "metrics/classifier.json",
    "reports/compare.md",
    "reports/compare.html",
    "reports/figures/fid_vs_nfe.png",
    "metrics/compare.json",
    "plots/compare/fid_vs_nfe.tsv",
]
STAGES = [
    "check-params",
    "download",
    "train-basic",
    "train-unet2d",
    "sample",
    "visualize-schedule",
    "train-classifier",
    "compare",
]


def test_dvc_repro_then_experiments(project):
    out = run(["dvc", "repro"], cwd=project).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    for path in OUTPUTS:
        assert (project / path).is_file(), path

    # Default store: SQLite at the repo root, absolute; the run id in the DVC output points into it.
    run_id = json.loads((project / "models/basic/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"

    assert "up to date" in run(["dvc", "status"], cwd=project).stdout.lower()
    assert "Running stage" not in run(["dvc", "repro"], cwd=project).stdout
    assert "final_loss" in run(["dvc", "metrics", "show", "--json"], cwd=project).stdout
    # `dvc plots show`: both training loss curves in one chart, each point from its own file.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], cwd=project).stdout)["data"]
    points = plots["loss"][0]["content"]["data"]["values"]
    assert {p["filename"] for p in points} == {"train_basic/loss.tsv", "train_unet2d/loss.tsv"}
    timings = json.loads((project / "metrics/sample.json").read_text())
    assert timings["unet2d/heun-2"]["nfe"] == 3 and timings["basic/toy-3"]["nfe"] == 3
    images = np.load(project / "samples/unet2d/ddim-3.npz")["images"]
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    sample_run = client.search_runs(
        [client.get_experiment_by_name("scratch-diffusion").experiment_id],
        filter_string="tags.mlflow.runName = 'sample'",
    )[0]
    assert sample_run.data.tags["train_run_basic"] == run_id

    # The report lists every sample set, with the numbers of metrics/compare.json: each with its 95% interval and
    # its verdict against the best setting.
    compare = json.loads((project / "metrics/compare.json").read_text())
    report = (project / "reports/compare.md").read_text()
    assert sorted(compare["settings"]) == sorted(timings)
    for name, row in compare["settings"].items():
        line = next(r for r in report.splitlines() if r.startswith(f"| {name} |"))
        assert f"| {row['fid']:.2f} [{row['fid_lo']:.2f}, {row['fid_hi']:.2f}] |" in line, line
        assert f"| {row['nfe']} |" in line
        assert row["fid_lo"] <= row["fid"] <= row["fid_hi"] and row["kid_lo"] <= row["kid"] <= row["kid_hi"]
        assert row["verdict"] in ("best", "within noise", "worse")
    assert [r["verdict"] for r in compare["settings"].values()].count("best") == 1
    assert compare["best_fid_unet2d"] == min(r["fid"] for n, r in compare["settings"].items() if n.startswith("unet2d"))
    assert "Best setting: **" in report and "data:image/png;base64," in (project / "reports/compare.html").read_text()

    # compare points the registry alias `champion` at the version it measured (the first one: nothing to beat), and
    # `generate` reaches it by the alias alone, loading the logged safetensors.
    registered = json.loads((project / "models/unet2d/run.json").read_text())
    champion = client.get_model_version_by_alias(registered["registered_model"], "champion")
    assert str(champion.version) == str(registered["registered_version"])
    assert float(champion.tags["compare.fid"]) == pytest.approx(compare["best_fid_unet2d"], abs=1e-3)
    run(
        [
            "scratch-diffusion",
            "generate",
            "--model",
            f"models:/{registered['registered_model']}@champion",
            "--steps",
            "2",
            "--n",
            "2",
            "--out",
            "champion",
        ],
        cwd=project,
    )
    assert (project / "champion/ddim-2-seed0.npz").is_file()

    # The EMA axis from one run: the script retraces the stage's trajectory, so its copy at params.yaml's own
    # ema_warmup is the stage's model, bit for bit, and each copy gets the compare stage's metrics.
    run([sys.executable, "ablations/ema_horizons.py", "train", "--warmups", "10", "4"], cwd=project)
    run([sys.executable, "ablations/ema_horizons.py", "measure", "--steps", "3"], cwd=project)
    horizons = json.loads((project / "ablations/ema_horizons.json").read_text())
    assert horizons["default_matches_models_unet2d"] is True
    assert [r["warmup"] for r in horizons["rows"]] == [10, 4] and all(r["steps"] == 8 for r in horizons["rows"])
    assert horizons["rows"][0]["fid"] != horizons["rows"][1]["fid"]
    assert "| 4 | 2 |" in (project / "docs/ablation/ema.md").read_text()  # mean age 8 / 4 steps

    # The wide screen: its defaults row retraces the stage on a CPU, so its samples score exactly what compare
    # reported for the same sampler; another setting gives another model. The budget run measures every epoch.
    sweep = ["ablations/sweep.py", "run", "--setting", "", "--setting", "unet2d.lr=5e-4"]
    run([sys.executable, *sweep], cwd=project)
    rows = json.loads((project / "ablations/sweep.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["", "unet2d.lr=5e-4"]
    for name, row in rows[0]["samplers"].items():
        assert row["fid"] == pytest.approx(compare["settings"][f"unet2d/{name}"]["fid"], rel=1e-6), name
    assert rows[1]["samplers"]["ddim-3"]["fid"] != rows[0]["samplers"]["ddim-3"]["fid"]
    budget = ["ablations/sweep.py", "budget", "--every", "1", "--setting", "unet2d.max_steps=0 unet2d.epochs=2"]
    run([sys.executable, *budget], cwd=project)
    setting = budget[-1]  # added to the runs already in the file (the repository's own), or replacing its own
    (budget_run,) = [
        r for r in json.loads((project / "ablations/budget.json").read_text())["runs"] if r["setting"] == setting
    ]
    assert [(r["epochs"], r["steps"]) for r in budget_run["rows"]] == [(1, 16), (2, 32)]  # 256 images, batch 16
    # Training-seed spread: each setting once per seed, summarised as mean and spread with a noise-aware verdict.
    run(
        [
            sys.executable,
            "ablations/sweep.py",
            "run",
            "--seeds",
            "1",
            "2",
            "--setting",
            "",
            "--setting",
            "unet2d.lr=5e-4",
        ],
        cwd=project,
    )
    seeded = json.loads((project / "ablations/seeds.json").read_text())["rows"]
    assert [r["setting"] for r in seeded] == ["seed=1", "seed=2", "unet2d.lr=5e-4 seed=1", "unet2d.lr=5e-4 seed=2"]
    run([sys.executable, "ablations/sweep.py", "table"], cwd=project)
    assert "| `unet2d.lr=5e-4` | ddim-3 |" in (project / "docs/ablation/sweep.md").read_text()
    seeds_md = (project / "docs/ablation/seeds.md").read_text()
    assert re.search(r"^\| `unet2d.lr=5e-4` \| ddim-3 \| 2 \| .*\| (better|worse|within noise) \|$", seeds_md, re.M)
    bad = run([sys.executable, "ablations/sweep.py", "run", "--setting", "unet2d.lr=0"], cwd=project, check=False)
    assert bad.returncode != 0 and "unet2d.lr: got 0" in bad.stderr

    # The training seed changes the models judged, never the judge.
    params = (project / "params.yaml").read_text()
    write_params(project, {"seed": 1})
    changed = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout)
    assert {"train-basic", "train-unet2d"} <= set(changed) and "train-classifier" not in changed
    (project / "params.yaml").write_text(params)

    # Changing the objective reruns train-unet2d only: neither download nor train-basic.
    run(["git", "add", "-A"], cwd=project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=project)
    exp = run(["dvc", "exp", "run", "-S", "objective=eps", "-n", "eps-exp"], cwd=project).stdout
    assert all(f"Running stage '{s}'" in exp for s in ["train-unet2d", "sample", "compare"])
    for untouched in ["download", "train-basic", "visualize-schedule", "train-classifier"]:
        assert f"Running stage '{untouched}'" not in exp
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=project).stdout)
    names = [e.get("name") for rev in shown for e in (rev.get("experiments") or []) for e in e["revs"]]
    assert "eps-exp" in names
    assert "best_fid_unet2d" in run(["dvc", "exp", "show", "--md"], cwd=project).stdout

    # A value refused under `dvc exp run -S` stops the pipeline at check-params: every stage keeps its outputs.
    before, params = (project / "metrics/compare.json").read_text(), (project / "params.yaml").read_text()
    bad = run(["dvc", "exp", "run", "-S", "objective=noise"], cwd=project, check=False)
    assert bad.returncode != 0 and "objective: got 'noise', allowed: 'x0', 'eps', 'v'" in bad.stdout + bad.stderr
    assert "git checkout params.yaml && dvc checkout" in bad.stdout + bad.stderr
    assert (project / "models/unet2d/model_index.json").is_file() and (project / "samples/unet2d/ddim-3.npz").is_file()
    assert (project / "metrics/compare.json").read_text() == before
    (project / "params.yaml").write_text(params)  # as the eps experiment left it

    # The experiment's run landed in the same store, tagged with its DVC experiment name.
    runs = client.search_runs(
        [client.get_experiment_by_name("scratch-diffusion").experiment_id],
        filter_string="tags.dvc_exp_name = 'eps-exp'",
    )
    assert sorted(r.info.run_name for r in runs) == ["compare", "sample", "train-unet2d"]
    assert [r.data.params["objective"] for r in runs if r.info.run_name == "train-unet2d"] == ["eps"]

    # Queued experiments, two at a time in temporary copies: both complete, both land in the same MLflow store.
    # One is queued by the ablation script (its `full` budget adds nothing to the axis's -S values).
    run([sys.executable, "ablations/run.py", "queue", "--budget", "full", "--only", "objective v"], cwd=project)
    run(["dvc", "exp", "run", "--queue", "-S", "unet2d.lr=2e-3", "-n", "q-lr"], cwd=project)
    status = run_queue(project, jobs=2)
    assert status.count("Success") == 2, status
    shown = run(["dvc", "exp", "show", "--json"], cwd=project).stdout
    assert '"abl-full-objective-v"' in shown and '"q-lr"' in shown
    for name in ("abl-full-objective-v", "q-lr"):
        runs = client.search_runs(
            [client.get_experiment_by_name("scratch-diffusion").experiment_id],
            filter_string=f"tags.dvc_exp_name = '{name}'",
        )
        assert sorted(r.info.run_name for r in runs) == ["compare", "sample", "train-unet2d"], name
        assert all(r.info.status == "FINISHED" for r in runs)
    assert not list((project / ".dvc/tmp/exps").rglob("mlflow.db"))  # no store left inside a temp copy

    # The ablation table is built from `dvc exp show --json`: one row per ablation experiment, its params diff
    # against the baseline commit, and the numbers its compare stage logged to MLflow.
    run([sys.executable, "ablations/run.py", "collect"], cwd=project)
    row = json.loads((project / "ablations/results.json").read_text())["rows"]["abl-full-objective-v"]
    assert row["params_diff"] == {"objective": "v"} and row["change"] == "objective=v" and row["budget"] == "full"
    compare_run = client.search_runs(
        [client.get_experiment_by_name("scratch-diffusion").experiment_id],
        filter_string="tags.dvc_exp_name = 'abl-full-objective-v' and tags.mlflow.runName = 'compare'",
    )[0]
    assert row["fid"] == pytest.approx(compare_run.data.metrics["best_fid_unet2d"])
    assert row["recognised"] == pytest.approx(compare_run.data.metrics["best_recognised_unet2d"])
    assert row["train_wall_s"] > 0 and row["best_sampler"] in ("ddim-3", "heun-2", "dpmsolver++-3")
    table = (project / "docs/ablation/table.md").read_text()
    assert "| full | objective v | `objective=v` |" in table and (project / "docs/ablation.png").is_file()
