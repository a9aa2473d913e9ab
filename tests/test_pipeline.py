"""End to end: the real `dvc repro` and `dvc exp run` on a git+DVC copy of the project with tiny params.

One project is reproduced once for the module; each test then checks one thing about it, in file order (the later
ones run experiments on top of what the earlier ones left), so the first failure does not hide the rest."""

import hashlib
import json
import re
import sys
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import make_project, run, run_queue, write_params
from tests.test_mlflow_ui import mlflow_process
from tests.test_serving import assert_no_pickle

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


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, mnist_raw):
    """The project after one `dvc repro`, and what it printed (stdout, then stderr)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = make_project(tmp_path_factory.mktemp("pipeline") / "project", mnist_raw)
        proc = run(["dvc", "repro"], cwd=project)
        yield project, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(reproduced):
    return reproduced[0]


@pytest.fixture(scope="module")
def client(project):
    # Default store: SQLite at the repo root, absolute.
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def runs_named(client, filter_string: str) -> list:
    return client.search_runs([client.get_experiment_by_name("scratch-diffusion").experiment_id], filter_string)


@pytest.fixture(scope="module")
def baseline(project):
    """The reproduced project committed: the experiments' baseline (ablations/run.py diffs params against it)."""
    run(["git", "add", "-A"], cwd=project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], cwd=project)
    return project


def test_repro_runs_every_stage_and_writes_its_outputs(reproduced, client):
    project, out = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    # Quiet stages: each training stage names the version it registered in one line; no pickle warning, no bars.
    for stage in ("train-basic", "train-unet2d"):
        name = f"scratch-diffusion-{stage.removeprefix('train-')}"
        assert f"{stage}: logged the model as registry version models:/{name}/1 " in out, out
    assert "pickle" not in out.lower() and "Downloading artifacts" not in out and "Created version" not in out
    for path in OUTPUTS:
        assert (project / path).is_file(), path
    # The run id in the DVC output points into the default store.
    run_id = json.loads((project / "models/basic/run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    sample_run = runs_named(client, "tags.mlflow.runName = 'sample'")[0]
    assert sample_run.data.tags["train_run_basic"] == run_id
    timings = json.loads((project / "metrics/sample.json").read_text())
    assert timings["unet2d/heun-2"]["nfe"] == 3 and timings["basic/toy-3"]["nfe"] == 3
    images = np.load(project / "samples/unet2d/ddim-3.npz")["images"]
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8


def test_a_second_repro_runs_nothing_and_dvc_reads_the_outputs(project):
    # Only check-params, which lists the data source every time (always_changed), runs; nothing downstream of it.
    status = run(["dvc", "status"], cwd=project).stdout
    assert [line for line in status.splitlines() if line.strip()] == ["check-params:", "\talways changed"], status
    repro = run(["dvc", "repro"], cwd=project).stdout
    assert re.findall(r"Running stage '([\w-]+)'", repro) == ["check-params"], repro
    assert "final_loss" in run(["dvc", "metrics", "show", "--json"], cwd=project).stdout
    # `dvc plots show`: both training loss curves in one chart, each point from its own file.
    plots = json.loads(run(["dvc", "plots", "show", "--json"], cwd=project).stdout)["data"]
    points = plots["loss"][0]["content"]["data"]["values"]
    assert {p["filename"] for p in points} == {"train_basic/loss.tsv", "train_unet2d/loss.tsv"}


def test_the_report_carries_every_setting_with_its_interval_and_verdict(project):
    timings = json.loads((project / "metrics/sample.json").read_text())
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


def test_a_tiny_run_records_its_fid_but_the_champion_is_set_by_hand(project, client):
    """compare records the FID and the judge on the version it measured, but a tiny run's judge is below the default
    pipeline's scale (tracking.SCALE_RULE), so it makes no champion; moved there by hand, as the docs say, the alias
    serves `generate`, which reaches it by the alias alone, loading the logged safetensors."""
    compare = json.loads((project / "metrics/compare.json").read_text())
    registered = json.loads((project / "models/unet2d/run.json").read_text())
    name, version = registered["registered_model"], str(registered["registered_version"])
    measured = client.get_model_version(name, version)
    assert float(measured.tags["compare.fid"]) == pytest.approx(compare["best_fid_unet2d"], abs=1e-3)
    judge = hashlib.sha256((project / "models/classifier/model.safetensors").read_bytes()).hexdigest()[:16]
    assert measured.tags["compare.judge.classifier"] == judge and measured.tags["compare.n"] == str(compare["n"])
    assert int(measured.tags["compare.judge.images"]) < 180_000  # the tiny judge's, below the default scale
    with pytest.raises(mlflow.exceptions.MlflowException, match="champion not found"):
        client.get_model_version_by_alias(name, "champion")
    client.set_registered_model_alias(name, "champion", version)
    model = f"models:/{name}@champion"
    said = run(
        ["scratch-diffusion", "generate", "--model", model, "--steps", "2", "--n", "2", "--out", "out"], cwd=project
    )
    assert f"generate: {model} is version {version} (FID " in said.stdout
    assert (project / "out/ddim-2-seed0.npz").is_file()


def test_the_champion_is_served_over_http_and_no_version_holds_a_pickle(project, client, monkeypatch):
    """`mlflow models serve` from the alias, set on the version a tiny `dvc repro` registered: a request's images
    decode in one line and are the images `generate` draws for it; each bad kind of request is HTTP 400 with one line
    naming the field, and the server answers the next one. Every version the pipeline registered is built from code,
    without a pickle."""
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["MLFLOW_TRACKING_URI"])  # restored after the test, as set below
    mlflow.set_tracking_uri(store["MLFLOW_TRACKING_URI"])
    for version in client.search_model_versions(""):
        assert_no_pickle(f"models:/{version.name}/{version.version}")
    assert {v.name for v in client.search_model_versions("")} == {"scratch-diffusion-basic", "scratch-diffusion-unet2d"}
    client.set_registered_model_alias("scratch-diffusion-unet2d", "champion", "1")  # by hand: a tiny run promotes none
    model = "models:/scratch-diffusion-unet2d@champion"
    serve = ["models", "serve", "-m", model, "--env-manager", "local"]

    def post(url: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with mlflow_process(serve, "/ping", cwd=project, env=store, timeout=180) as url:
        status, answer = post(url, {"inputs": {"n": 3, "seed": 2, "steps": 3, "eta": 0}})
        assert status == 200, answer
        images = np.asarray(answer["predictions"], dtype=np.uint8)
        assert images.shape == (3, 28, 28)
        bad = [
            ({"sampler": "bogus"}, "sampler: got 'bogus', allowed: ddpm, ddim"),
            ({"steps": 0}, "steps: got 0, allowed: 1..1000 for this model"),
            ({"n": 65}, "n: got 65, allowed: 1..64 (the model's max_images)"),
            ({"class": "7"}, "class: got '7', allowed: none: this model is not class-conditional"),
            ({"guidance_scale": 3}, "guidance_scale: got 3, allowed: none: this model is not class-conditional"),
            ({"seed": "zero"}, "seed: got 'zero', allowed: an integer 0..4294967295"),
        ]
        for body, line in bad:
            status, answer = post(url, {"inputs": body})
            assert status == 400 and answer["message"].splitlines()[-1].startswith(f"Error: {line}"), answer
        status, answer = post(url, {"dataframe_records": [{"n": 1, "steps": 2}]})
        assert status == 200 and np.asarray(answer["predictions"]).shape == (1, 28, 28)
    cmd = ["scratch-diffusion", "generate", "--model", model, "--n", "3", "--seed", "2", "--steps", "3", "--out", "srv"]
    run(cmd, cwd=project, env=store)
    assert np.array_equal(np.load(project / "srv/ddim-3-seed2.npz")["images"], images)


def test_undoing_an_edit_restores_the_training_from_the_run_cache(project):
    """Edit a file the training depends on, repro (it trains), undo the edit, repro: DVC restores the earlier result
    from its run-cache instead of training again, and run.json still names the MLflow run that made it."""
    made = {p: (project / p).read_bytes() for p in ("models/basic/model.safetensors", "models/basic/run.json")}
    source = project / "src/scratch_diffusion/objectives.py"
    original = source.read_text()
    source.write_text(original + "\n# an edit\n")
    try:
        assert "Running stage 'train-basic'" in run(["dvc", "repro", "train-basic"], cwd=project).stdout
    finally:
        source.write_text(original)
    undone = run(["dvc", "repro", "train-basic"], cwd=project).stdout
    # DVC's words for a restore from its run-cache
    assert "Stage 'train-basic' is cached - skipping run, checking out outputs" in undone, undone
    assert "Running stage 'train-basic'" not in undone
    assert all((project / p).read_bytes() == content for p, content in made.items())


def test_ema_horizons_retrace_the_stage(project):
    """The EMA axis from one run per seed: the script retraces the stage's trajectory, so its copy at params.yaml's
    own ema_warmup and seed is the stage's model, bit for bit; each copy gets the compare stage's metrics, and two
    seeds give each horizon a paired verdict against the default."""
    script = [sys.executable, "ablations/ema_horizons.py"]
    run([*script, "train", "--warmups", "10", "4"], cwd=project)
    run([*script, "train", "--warmups", "10", "4", "--seed", "7"], cwd=project)
    # The repository's file holds seeds measured at n = 1000: another yardstick is refused, not mixed in.
    mixed = run([*script, "measure", "--steps", "3"], cwd=project, check=False)
    assert mixed.returncode != 0 and "pass --replace" in mixed.stderr
    run([*script, "measure", "--steps", "3", "--replace"], cwd=project)
    horizons = json.loads((project / "ablations/ema_horizons.json").read_text())
    own, other = horizons["runs"]["42"], horizons["runs"]["7"]
    assert own["default_matches_models_unet2d"] is True and other["default_matches_models_unet2d"] is None
    assert [r["warmup"] for r in own["rows"]] == [10, 4] and all(r["steps"] == 8 for r in own["rows"])
    assert own["rows"][0]["fid"] != own["rows"][1]["fid"] != other["rows"][1]["fid"]
    table = (project / "docs/ablation/ema.md").read_text()
    (w4,) = [line for line in table.splitlines() if line.startswith("| 4 | 2 | 2 |")]  # mean age 8 / 4 steps
    assert re.search(r"\| (better|worse|within noise); (better|worse|within noise) \|$", w4), w4
    bad = run([*script, "train", "--seed", "-1"], cwd=project, check=False)
    assert bad.returncode != 0 and "--seed: got [-1]" in bad.stderr


def test_the_sweep_retraces_the_stage_and_gives_each_setting_over_seeds(project):
    """The wide screen, each setting once per training seed: its defaults row at params.yaml's own seed retraces the
    stage on a CPU, so its samples score exactly what compare reported for the same sampler; another seed gives
    another model; the seed table summarises the setting as mean and spread, each sampler with its verdict
    (settings against the defaults: tests/test_ablations.py)."""
    compare = json.loads((project / "metrics/compare.json").read_text())
    run([sys.executable, "ablations/sweep.py", "run", "--seeds", "42", "1", "--setting", ""], cwd=project)
    rows = json.loads((project / "ablations/seeds.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["seed=42", "seed=1"]
    for name, row in rows[0]["samplers"].items():
        assert row["fid"] == pytest.approx(compare["settings"][f"unet2d/{name}"]["fid"], rel=1e-6), name
    assert rows[1]["samplers"]["ddim-3"]["fid"] != rows[0]["samplers"]["ddim-3"]["fid"]
    bad = run([sys.executable, "ablations/sweep.py", "run", "--setting", "unet2d.lr=0"], cwd=project, check=False)
    assert bad.returncode != 0 and "unet2d.lr: got 0" in bad.stderr

    setting = "unet2d.max_steps=0 unet2d.epochs=2"  # the budget run measures every epoch
    run([sys.executable, "ablations/sweep.py", "budget", "--every", "1", "--setting", setting], cwd=project)
    # Added to the runs already in the file (the repository's own), or replacing its own.
    runs = json.loads((project / "ablations/budget.json").read_text())["runs"]
    (budget_run,) = [r for r in runs if r["setting"] == setting]
    assert [(r["epochs"], r["steps"]) for r in budget_run["rows"]] == [(1, 16), (2, 32)]  # 256 images, batch 16

    run([sys.executable, "ablations/sweep.py", "table"], cwd=project)
    assert (project / "docs/ablation/budget.png").is_file()  # the budget runs' quality curve
    seeds_md = (project / "docs/ablation/seeds.md").read_text()
    verdict = r"(best sampler|(better|worse|within noise) vs \S+)"
    assert re.search(rf"^\| defaults \(params.yaml\) \| ddim-3 \| 2 \| .*\| {verdict} \|$", seeds_md, re.M), seeds_md


def test_the_training_seed_changes_the_models_never_the_judge(project):
    params = (project / "params.yaml").read_text()
    try:
        write_params(project, {"seed": 1})
        changed = json.loads(run(["dvc", "status", "--json"], cwd=project).stdout)
    finally:
        (project / "params.yaml").write_text(params)
    assert {"train-basic", "train-unet2d"} <= set(changed) and "train-classifier" not in changed


def test_a_refused_value_stops_the_experiment_before_any_stage(baseline):
    """A value refused under `dvc exp run -S` stops the pipeline at check-params: every stage keeps its outputs."""
    project = baseline
    before, params = (project / "metrics/compare.json").read_text(), (project / "params.yaml").read_text()
    try:
        bad = run(["dvc", "exp", "run", "-S", "objective=noise"], cwd=project, check=False)
    finally:
        (project / "params.yaml").write_text(params)
    assert (
        bad.returncode != 0 and "objective: got 'noise', allowed: 'x0', 'eps', 'v', 'flow'" in bad.stdout + bad.stderr
    )
    assert "git checkout params.yaml && dvc checkout" in bad.stdout + bad.stderr
    assert (project / "models/unet2d/model_index.json").is_file() and (project / "samples/unet2d/ddim-3.npz").is_file()
    assert (project / "metrics/compare.json").read_text() == before


def test_queued_experiments_land_in_one_store_and_the_ablation_table(baseline):
    """Queued experiments, two at a time in temporary copies, on a fresh store (no mlflow.db yet: both workers
    create its schema at once): both complete, each reruns only what depends on its change (flow matching as the
    objective:
    train-unet2d, sample and compare; the sampling seed: sample and compare), and both land in the same MLflow store,
    the workspace's, tagged with their DVC experiment names. One is queued by the ablation script (its `full` budget
    adds nothing to the axis's -S values); its table is built from `dvc exp show --json`: the params diff against the
    baseline and the numbers compare logged."""
    project = baseline
    (project / "mlflow.db").rename(project / "mlflow-before.db")
    run([sys.executable, "ablations/run.py", "queue", "--budget", "full", "--only", "objective flow"], cwd=project)
    run(["dvc", "exp", "run", "--queue", "-S", "sample.seed=1", "-n", "q-seed"], cwd=project)  # sample, compare
    status = run_queue(project, jobs=2)
    assert status.count("Success") == 2 and "Failed" not in status, status
    # The same file spelt another way: MLflow keeps one store per URI in this process, and the module's client's
    # open connection still reads the store renamed above.
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/./mlflow.db")
    shown = run(["dvc", "exp", "show", "--json"], cwd=project).stdout
    assert '"abl-full-objective-flow"' in shown and '"q-seed"' in shown
    for name, stages in (
        ("abl-full-objective-flow", ["compare", "sample", "train-unet2d"]),
        ("q-seed", ["compare", "sample"]),
    ):
        runs = runs_named(client, f"tags.dvc_exp_name = '{name}'")
        assert sorted(r.info.run_name for r in runs) == stages, name
        assert all(r.info.status == "FINISHED" for r in runs)
        logs = run(["dvc", "queue", "logs", name], cwd=project).stdout
        ran = set(re.findall(r"Running stage '([\w-]+)'", logs))
        assert ran == {"check-params", *stages}, (name, logs[-3000:])
    (trained,) = runs_named(
        client, "tags.dvc_exp_name = 'abl-full-objective-flow' and tags.mlflow.runName = 'train-unet2d'"
    )
    assert trained.data.params["objective"] == "flow"
    assert "best_fid_unet2d" in run(["dvc", "exp", "show", "--md"], cwd=project).stdout
    assert not list((project / ".dvc/tmp/exps").rglob("mlflow.db"))  # no store left inside a temp copy

    run([sys.executable, "ablations/run.py", "collect"], cwd=project)
    row = json.loads((project / "ablations/results.json").read_text())["rows"]["abl-full-objective-flow"]
    assert row["params_diff"] == {"objective": "flow"} and row["change"] == "objective=flow" and row["budget"] == "full"
    (compare_run,) = runs_named(
        client, "tags.dvc_exp_name = 'abl-full-objective-flow' and tags.mlflow.runName = 'compare'"
    )
    assert row["fid"] == pytest.approx(compare_run.data.metrics["best_fid_unet2d"])
    assert row["recognised"] == pytest.approx(compare_run.data.metrics["best_recognised_unet2d"])
    assert row["train_wall_s"] > 0 and row["best_sampler"] in ("ddim-3", "heun-2", "dpmsolver++-3")
    table = (project / "docs/ablation/table.md").read_text()
    assert "| full | objective flow | `objective=flow` |" in table and (project / "docs/ablation.png").is_file()
