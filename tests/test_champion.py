"""The registry alias `champion`, on a real SQLite store with real registered versions (each a BasicUNet's
safetensors logged as a run artifact): it is earned on one judge's scale (classifier weights, reference set, n),
never by a judge below the accuracy bound, and stays right when compares finish at once; and a deleted MLflow
experiment is one line with the way back."""

import contextlib
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from scratch_diffusion import tracking
from scratch_diffusion.cli import main as cli_main
from scratch_diffusion.model_files import save_basic
from scratch_diffusion.models import BasicUNet
from scratch_diffusion.stage import StageError
from scratch_diffusion.tracking import CHAMPION, MIN_JUDGE_ACCURACY, promote_champion

REPO = Path(__file__).resolve().parents[1]
JUDGE = {"classifier": "c1a551f1e4a1b0c3", "reference": "d47a5e7d16e57000", "n": 1000}
RANDOM_JUDGE = {**JUDGE, "classifier": "0bad0bad0bad0bad"}  # another classifier: another FID scale


def promote(version, fid, judge=JUDGE, accuracy=0.99, name="m"):
    return promote_champion(name, version, fid, (max(0.0, fid - 2), fid + 2), judge, accuracy)


def champion(name="m") -> str | None:
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def register(tmp_path: Path, names: dict[str, int]) -> None:
    """Register `count` versions of each name, each from a run that logged a real BasicUNet's folder as the training
    stages of earlier versions did (<model>/extra_files/: model.safetensors and its shape, beside a pickle not logged
    here), which `generate` still loads (serving.logged_model_folder); a pyfunc model per version would cost more."""
    folder = tmp_path / "weights"
    if not folder.is_dir():  # the weights and the shape record, as train-basic saves and logs them
        save_basic(folder, BasicUNet(1, 1, 28), {"resolution": 28, "channels": 1})
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("e")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    )
    for name, count in names.items():
        client.create_registered_model(name)
        for _ in range(count):
            with mlflow.start_run(experiment_id=experiment_id) as run:
                for file in sorted(folder.iterdir()):
                    mlflow.log_artifact(str(file), "model/extra_files")
            client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test (set_tracking_uri exports it too)
    mlflow.set_tracking_uri(uri)
    tracking.ensure_store(uri)
    return uri


def test_a_version_from_another_store_is_never_measured_or_promoted(store, tmp_path):
    """run.json names the version its training registered in the store it trained with: in another store (a clone
    without its mlflow.db) that version is missing or another model's, and compare records nothing on it."""
    register(tmp_path, {"m": 1})
    made_by = mlflow.MlflowClient().get_model_version("m", "1").run_id
    for version, run_id, here in (("1", "0" * 32, f"holds one made by run {made_by}"), ("2", made_by, "has none")):
        said = promote_champion("m", version, 50.0, (48.0, 52.0), JUDGE, 0.99, run_id=run_id)
        assert said.startswith(f"version {version} not promoted, nothing recorded") and here in said, said
    assert champion() is None and "compare.fid" not in mlflow.MlflowClient().get_model_version("m", "1").tags
    assert "is now version 1" in promote_champion("m", "1", 50.0, (48.0, 52.0), JUDGE, 0.99, run_id=made_by)


def test_the_champion_moves_only_to_a_better_fid_by_the_same_judge(store, tmp_path):
    register(tmp_path, {"m": 5})
    assert "is now version 1" in promote("1", 60.0) and champion() == "1"  # nothing to beat
    assert "stays version 1" in promote("2", 70.0) and champion() == "1"  # worse
    assert "is now version 3" in promote("3", 50.0) and champion() == "3"  # better
    assert "stays version 3, re-measured" in promote("3", 50.0) and champion() == "3"
    tags = mlflow.MlflowClient().get_model_version("m", "3").tags
    assert tags == {
        "compare.fid": "50.0000",
        "compare.fid_lo": "48.0000",
        "compare.fid_hi": "52.0000",
        "compare.n": "1000",
        "compare.judge.classifier": JUDGE["classifier"],
        "compare.judge.reference": JUDGE["reference"],
        "compare.judge.accuracy": "0.9900",
    }
    # The champion is the lowest latest FID on its judge's scale: re-measured worse, it hands the alias back.
    assert "is now version 1" in promote("3", 65.0) and champion() == "1"


def test_two_judges_never_compare(store, tmp_path):
    """The issue's case: a version measured by another classifier (FID 0.02 on its own scale) must not displace a
    champion measured by the pipeline's; later versions of the champion's judge still compete."""
    register(tmp_path, {"m": 3})
    promote("1", 60.0)
    said = promote("2", 0.02, judge=RANDOM_JUDGE)
    assert champion() == "1", said
    assert said == (
        f"models:/m@{CHAMPION} stays version 1: it was measured by another judge (its vs this one: classifier "
        f"{JUDGE['classifier']} vs {RANDOM_JUDGE['classifier']}), so version 2's FID 0.02 does not compare with its "
        "FID 60.00 [58.00, 62.00]; to adopt this judge, move the alias by hand (MLflow UI: Models > m > version 2)"
    )
    assert mlflow.MlflowClient().get_model_version("m", "2").tags["compare.judge.classifier"] == "0bad0bad0bad0bad"
    assert "is now version 3" in promote("3", 59.0) and champion() == "3"  # version 2's 0.02 is on another scale


def test_fids_at_another_n_or_on_other_reference_images_never_compare(store, tmp_path):
    register(tmp_path, {"m": 3})
    promote("1", 60.0)
    assert "(its vs this one: n 1000 vs 500)" in promote("2", 20.0, judge={**JUDGE, "n": 500}) and champion() == "1"
    other_data = {**JUDGE, "reference": "fa5410a0fa5410a0"}  # e.g. data.dataset=fashion_mnist
    assert "reference" in promote("3", 10.0, judge=other_data) and champion() == "1"


@pytest.mark.parametrize("accuracy", [0.11, MIN_JUDGE_ACCURACY - 0.001])
def test_a_judge_below_the_accuracy_bound_never_promotes(store, tmp_path, accuracy):
    register(tmp_path, {"m": 2})
    said = promote("1", 0.02, accuracy=accuracy)  # even with no champion to beat
    assert champion() is None and said == (
        f"version 1 not promoted, nothing recorded: the judge's test accuracy {accuracy:.3f} is below "
        f"{MIN_JUDGE_ACCURACY} (its FIDs rank nothing); train the classifier longer (classifier.max_steps)"
    )
    assert mlflow.MlflowClient().get_model_version("m", "1").tags == {}
    promote("2", 60.0)
    assert "not promoted" in promote("1", 0.02, accuracy=accuracy) and champion() == "2"


def test_a_champion_from_before_judges_were_recorded_is_replaced_by_a_judged_version(store, tmp_path):
    """A champion promoted by the old compare carries an FID but no judge: it may be the issue's near-random-judge
    model (FID 0.02), so its FID compares with nothing. The best version of a qualified judge replaces it."""
    register(tmp_path, {"m": 2})
    client = mlflow.MlflowClient()
    client.set_model_version_tag("m", "1", "compare.fid", "0.0200")
    client.set_model_version_tag("m", "1", "compare.n", "1000")
    client.set_registered_model_alias("m", CHAMPION, "1")
    said = promote("2", 60.0)
    assert champion() == "2" and said.endswith("replacing version 1 (FID 0.02), whose judge was never recorded")


def test_generate_says_which_version_the_alias_named(store, tmp_path, capsys):
    register(tmp_path, {"m": 2})
    promote("2", 42.0)
    assert tracking.resolve_alias("models:/m@champion") == (
        "models:/m/2",
        "models:/m@champion is version 2 (FID 42.00 [40.00, 44.00] at n 1000)",
    )
    assert tracking.resolve_alias("models:/m/1") == ("models:/m/1", None)
    out = tmp_path / "out"
    cli_main(["generate", "--model", "models:/m@champion", "--sampler", "toy", "--steps", "1", "--out", str(out)])
    said = [line for line in capsys.readouterr().out.splitlines() if "@champion" in line]
    assert said == ["generate: models:/m@champion is version 2 (FID 42.00 [40.00, 44.00] at n 1000)"]
    assert (out / "toy-1-seed0.npz").is_file()


# Compares finishing at once: every racer promotes its own version of each model in the same instant; the FIDs
# are dealt so that the best version is a different racer's each round.
RACERS, ROUNDS = 4, 4
FIDS = [[10.0 * (1 + (i + r) % RACERS) for i in range(RACERS)] for r in range(ROUNDS)]


def _race(uri: str, racer: int, barrier, locked: bool) -> None:
    mlflow.set_tracking_uri(uri)
    if not locked:  # as on a remote server, where only the re-read after each move guards the alias
        tracking._champion_lock = contextlib.nullcontext
    for r in range(ROUNDS):
        barrier.wait(timeout=120)
        promote(str(racer + 1), FIDS[r][racer], name=f"m{r}")


@pytest.mark.parametrize("locked", [True, False], ids=["sqlite-lock", "re-read-only"])
def test_compares_finishing_at_once_leave_the_best_version_champion(store, tmp_path, locked):
    register(tmp_path, {f"m{r}": RACERS for r in range(ROUNDS)})
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each, as two queue workers
    barrier = spawn.Barrier(RACERS)
    racers = [spawn.Process(target=_race, args=(store, i, barrier, locked)) for i in range(RACERS)]
    for p in racers:
        p.start()
    for p in racers:
        p.join(timeout=300)
    assert [p.exitcode for p in racers] == [0] * RACERS
    best = [str(1 + min(range(RACERS), key=lambda i: FIDS[r][i])) for r in range(ROUNDS)]
    assert [champion(f"m{r}") for r in range(ROUNDS)] == best


def _deleted_experiment(name: str) -> str:
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment(name)
    client.delete_experiment(experiment_id)
    return experiment_id


def test_a_deleted_experiment_is_one_line_with_the_way_back(store, tmp_path):
    experiment_id = _deleted_experiment("gone")
    way_back = f"mlflow experiments restore --experiment-id {experiment_id}"
    for opening in (
        lambda: tracking.check_experiment("gone"),
        lambda: tracking.start_run("gone", "compare", {}, {}).__enter__(),
    ):
        with pytest.raises(StageError) as e:
            opening()
        assert "'gone' is deleted" in str(e.value) and way_back in str(e.value)
        assert "another `mlflow.experiment` in params.yaml" in str(e.value)


def test_a_stage_on_a_deleted_experiment_says_so_before_any_work(store, tmp_path):
    """The real compare stage on the default store (./mlflow.db, here tmp_path's), in a folder with the project's
    params naming the deleted experiment and none of the stage's inputs: the experiment is refused first, in one
    line on stderr, no traceback, and the restore command names the store (the CLI's default is the working
    directory's, which for a queued experiment is not the repository's)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mlflow"]["experiment"] = "gone"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    experiment_id = _deleted_experiment("gone")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/compare.py")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: mlflow.experiment 'gone' is deleted in the MLflow store (experiment id {experiment_id}): restore "
        f"it (MLflow UI, or `MLFLOW_TRACKING_URI={store} mlflow experiments restore --experiment-id "
        f"{experiment_id}`), or set another `mlflow.experiment` in params.yaml"
    ], proc.stderr


@pytest.mark.parametrize("fid, interval", [(math.nan, (1.0, 2.0)), (-1.0, (0.0, 2.0)), (5.0, (4.0, math.inf))])
def test_an_fid_that_is_no_distance_is_never_recorded(store, tmp_path, fid, interval):
    register(tmp_path, {"m": 1})
    said = promote_champion("m", "1", fid, interval, JUDGE, 0.99)
    assert said.startswith("version 1 not promoted, nothing recorded: its FID") and "not a finite number >= 0" in said
    assert champion() is None and mlflow.MlflowClient().get_model_version("m", "1").tags == {}


DEFAULT_SCALE = (1000, 180_000)  # what params.yaml's defaults give on MNIST: n, and the judge's 3 x 60,000 images
SMOKE = {**JUDGE, "classifier": "5e0ce5e0ce5e0ce5", "n": 100}  # the README's smoke run: n 100, 100 judge steps


def scaled(version, fid, judge=JUDGE, images=180_000):
    return promote_champion(
        "m", version, fid, (max(0.0, fid - 2), fid + 2), judge, 0.99, judge_images=images, default_scale=DEFAULT_SCALE
    )


def test_a_smoke_run_records_its_fid_but_never_holds_the_alias(store, tmp_path):
    """The README's smoke command first on a fresh clone: its FID is recorded on the version, no champion is made;
    the default pipeline's measurement then takes the alias, and a later smoke run's lower FID never moves it."""
    register(tmp_path, {"m": 3})
    said = scaled("1", 304.29, judge=SMOKE, images=12_800)
    assert said == (
        "version 1 measured FID 304.29 [302.29, 306.29] by a smaller judge than the default pipeline's (n 100 < 1000, "
        f"judge trained on 12,800 images < 180,000): recorded, not promoted; {tracking.SCALE_RULE}"
    )
    assert champion() is None
    assert mlflow.MlflowClient().get_model_version("m", "1").tags["compare.judge.images"] == "12800"
    assert "is now version 2" in scaled("2", 60.0) and champion() == "2"
    assert "not promoted" in scaled("3", 5.0, judge={**JUDGE, "classifier": "0ddba11"}, images=9000)
    assert champion() == "2"


def test_a_judge_at_the_default_scale_supersedes_a_smaller_champion(store, tmp_path):
    """A registry whose alias a smoke run took before the rule: the default pipeline's judge replaces it and says
    the rule; two judges at the default scale still never compare."""
    register(tmp_path, {"m": 3})
    promote("1", 304.29, judge=SMOKE)  # as compare promoted before the scale was known
    said = scaled("2", 60.0)
    assert champion() == "2" and said == (
        f"models:/m@{CHAMPION} is now version 2 (FID 60.00 [58.00, 62.00]), replacing version 1 (FID 304.29 "
        f"[302.29, 306.29]), measured by a smaller judge (n 100 < 1000); {tracking.SCALE_RULE}"
    )
    assert "stays version 2: it was measured by another judge" in scaled("3", 1.0, judge=RANDOM_JUDGE)
