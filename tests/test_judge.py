"""The judge for any dataset: a classifier shaped by the data (channels, resolution, classes) and standardised by its
training split, its config beside the weights (refused for other data), RGB samples measured as the samplers write
them (n, H, W, 3), and an unlabelled dataset's judge-less path through train-classifier and compare."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from scratch_diffusion.data import download, load_split, make_shapes
from scratch_diffusion.metrics import Judge, JudgeError, as_nchw, features
from scratch_diffusion.models.classifier import CONFIG, Classifier, channel_stats
from tests.conftest import REPO, write_params

SIZE = 16  # the converted side: small, so that each test takes about a second on a slow CPU
N = 6  # sample-set size: the judge takes 2 * N of the 12 held-out test images
PARAMS = {"classifier": {"batch_size": 8, "max_steps": 4, "epochs": 1}}


def run_stage_main(stage: str, project: Path, monkeypatch) -> list[str]:
    """stages/<stage>.py's main() in `project`, logging to a real MLflow store there; returns the names of the runs
    the store then holds."""
    from accelerate.state import AcceleratorState
    from mlflow import MlflowClient

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process: earlier tests chose theirs
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(project)
    runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="stage_under_test")["main"]()
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_name for r in client.search_runs(experiments)] if experiments else []


def project_with(tmp_path: Path, classes, per_class: int = 16) -> Path:
    """A working directory holding params.yaml (tiny classifier) and data/dataset converted from a shapes folder."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_params(project, PARAMS)
    source = make_shapes(tmp_path / "shapes", per_class, classes=classes)
    dataset = project / "data/dataset"
    download("folder", str(source), dataset, lambda *a: None, resolution=SIZE, channels=3, held_out=0.25)
    return project


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A 3-class RGB folder dataset with a classifier trained on it by train-classifier (a few steps)."""
    tmp_path = tmp_path_factory.mktemp("labelled")
    project = project_with(tmp_path, ("circle", "square", "triangle"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_stage_main("train_classifier", project, monkeypatch)
    return project


def rgb_samples(project: Path) -> torch.Tensor:
    """Held-out test images as the samplers write 3-channel samples: uint8 (n, H, W, 3)."""
    test_x, _ = load_split(project / "data/dataset", train=False)
    return test_x[N : 2 * N].permute(0, 2, 3, 1).contiguous()


def write_samples(project: Path, images: torch.Tensor) -> None:
    """One sample set as the sample stage leaves it (samples/, metrics/sample.json), and a loss curve."""
    (project / "samples/basic").mkdir(parents=True, exist_ok=True)
    np.savez(project / "samples/basic/toy-3.npz", images=images.numpy())
    timing = {"n": len(images), "nfe": 3, "seconds_per_image": 0.002, "guidance_scale": None}
    (project / "metrics/sample.json").write_text(json.dumps({"basic/toy-3": timing}))
    (project / "plots/train_basic").mkdir(parents=True, exist_ok=True)
    (project / "plots/train_basic/loss.tsv").write_text("step\tloss\n1\t0.5\n2\t0.4\n")


def test_mnist_training_split_standardises_with_the_classic_constants(mnist_raw):
    """The whole MNIST training split's mean and std, rounded to 4 decimals, are the 0.1307 and 0.3081 that the MNIST
    classifier always used, and the classifier standardises with them bit for bit as it did (Python scalars, in float32
    and float64): MNIST's weights, features and FIDs are unchanged. Its weights file holds its weights alone."""
    train_x, _ = load_split(mnist_raw.parents[1], train=True)
    assert channel_stats(train_x) == ((0.1307,), (0.3081,))
    net = Classifier(1, 28, 10, *channel_stats(train_x))
    x = train_x[:64].float() / 255
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(net.standardise(x.to(dtype)), (x.to(dtype) - 0.1307) / 0.3081), dtype
    # The MNIST classifier's tensors, as model.safetensors has always held them: no mean or std among them.
    state = net.state_dict()
    assert len(state) == 28 and {k.split(".")[0] for k in state} == {"body", "head", "logits"}
    assert state["body.0.0.weight"].shape == (32, 1, 3, 3) and state["head.0.weight"].shape == (128, 64 * 7 * 7)


def test_channel_stats_per_channel_and_refuses_a_flat_channel():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    images[:, 0] = 255
    images[0, 1] = 255  # half the pixels white: mean 0.5, std 0.5
    images[:, 2, :, :2] = 51
    with pytest.raises(ValueError, match="channel 0 has std 0"):
        channel_stats(images)
    images[0, 0] = 0
    assert channel_stats(images) == ((0.5, 0.5, 0.1), (0.5, 0.5, 0.1))


def test_a_classifier_for_a_3_channel_folder_judges_rgb_samples(labelled, monkeypatch):
    """train-classifier builds the classifier from the data (3 channels, 16 px, 3 classes, the split's statistics)
    and stores what rebuilds it; the judge reads it and measures channel-last RGB samples exactly as the same images
    in (N, C, H, W): its FID is the floor, the real-data set it was taken from."""
    config = json.loads((labelled / "models/classifier" / CONFIG).read_text())
    assert config["judge"] is True
    assert {k: config[k] for k in ("channels", "resolution", "num_classes")} == {
        "channels": 3,
        "resolution": SIZE,
        "num_classes": 3,
    }
    assert len(config["mean"]) == len(config["std"]) == 3
    assert json.loads((labelled / "metrics/classifier.json").read_text())["test_accuracy"] is not None
    monkeypatch.chdir(labelled)
    judge = Judge.from_files("models/classifier/model.safetensors", "data/dataset", N, resamples=20)
    assert judge.classifier.num_classes == 3 and judge.classifier.mean == tuple(config["mean"])
    samples = rgb_samples(labelled)
    assert samples.shape == (N, SIZE, SIZE, 3)
    assert torch.equal(as_nchw(samples), samples.permute(0, 3, 1, 2))
    assert features(judge.classifier, samples).shape == (N, 128)
    m = judge.measure(samples)
    assert m["fid"] == pytest.approx(judge.floor, abs=1e-9)  # the held-out set itself, whatever its layout
    assert 0 <= m["coverage_kl"] <= np.log(3) + 1e-9  # three classes, not ten
    for key in ("fid", "kid", "recognised", "coverage_kl", "memorised"):  # (a constant's interval: within rounding)
        assert m[f"{key}_lo"] - 1e-12 <= m[key] <= m[f"{key}_hi"] + 1e-12, key


def test_a_config_for_other_data_is_refused_in_one_line(labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(labelled)
    folder = tmp_path / "classifier"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((labelled / "models/classifier/model.safetensors").read_bytes())
    with pytest.raises(JudgeError, match=r"config.json: missing .* run `dvc repro train-classifier`"):
        Judge.from_files(folder / "model.safetensors", "data/dataset", N)
    config = json.loads((labelled / "models/classifier" / CONFIG).read_text())
    for key, other in (("num_classes", 10), ("resolution", 28), ("dataset_digest", "0123456789abcdef")):
        (folder / CONFIG).write_text(json.dumps({**config, key: other}))
        with pytest.raises(JudgeError, match=f"written for {key} {other!r}, but data/dataset has {key}") as e:
            Judge.from_files(folder / "model.safetensors", "data/dataset", N)
        assert "\n" not in str(e.value)


def test_an_unlabelled_dataset_has_no_judge_and_compare_still_measures_memorisation(tmp_path, monkeypatch, capsys):
    """train-classifier on a flat folder trains nothing and says why (config.json, a null accuracy, one line, no
    MLflow run); compare then measures memorisation and cost with intervals, FID and the rest are null in
    metrics/compare.json and n/a in the report, and it says what it cannot measure."""
    project = project_with(tmp_path, classes=(), per_class=48)  # as many images as the 3 classes hold
    calls = run_stage_main("train_classifier", project, monkeypatch)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("train-classifier: no judge: the dataset is unlabelled")
    assert "train-classifier" not in calls  # no MLflow run, no model
    config = json.loads((project / "models/classifier" / CONFIG).read_text())
    assert config["judge"] is False and "unlabelled" in config["reason"] and config["num_classes"] == 0
    assert json.loads((project / "metrics/classifier.json").read_text()) == {"test_accuracy": None}
    assert not (project / "models/classifier/model.safetensors").exists()

    judge = Judge.from_files("models/classifier/model.safetensors", "data/dataset", N, resamples=20)
    assert judge.classifier is None and judge.floor is None and "unlabelled" in judge.no_classifier
    train_x, _ = load_split("data/dataset", train=True)
    copies = judge.measure(train_x[:N].permute(0, 2, 3, 1))  # training images, channel-last: every one a copy
    assert copies["memorised"] == copies["memorised_lo"] == copies["memorised_hi"] == 1.0
    assert all(copies[key] is None for key in ("fid", "kid", "recognised", "coverage_kl"))
    with pytest.raises(ValueError, match="FID needs a classifier, and this judge has none: the dataset is unlabelled"):
        judge.fid(train_x[:N])

    write_samples(project, rgb_samples(project))
    calls = run_stage_main("compare", project, monkeypatch)
    out = capsys.readouterr().out
    assert "compare: FID, KID, recognised and coverage not measured: the dataset is unlabelled" in out
    compare = json.loads((project / "metrics/compare.json").read_text())
    assert compare["real_floor_fid"] is None and compare["best_fid_basic"] is None
    assert set(compare["settings"]["basic/toy-3"]) == {"nfe", "memorised", "seconds_per_image"}
    report = (project / "reports/compare.md").read_text()
    assert "| n/a |" in report and "not measured: the dataset is unlabelled" in report
    assert "No setting is named best" in report and "figures/montage.png" in report and "fid_vs_nfe" not in report
    assert (project / "plots/compare/fid_vs_nfe.tsv").read_text().count("\n") == 1  # the header alone
    assert calls.count("compare") == 1


def test_the_judge_trains_through_the_one_owner_and_a_rerun_resumes_its_own_run(tmp_path, monkeypatch, capsys):
    """train-classifier is recipe.train_model's run, as the diffusion models' are: checkpoints of its own identity,
    which a rerun resumes (the same MLflow run, the same weights), and weights that do not depend on having been
    checkpointed."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from scratch_diffusion.config import load_params
    from scratch_diffusion.recipe import train_model

    project = project_with(tmp_path, ("circle", "square"))
    write_params(project, {"classifier": {"checkpoint_every": 2}})
    assert run_stage_main("train_classifier", project, monkeypatch) == ["train-classifier"]
    weights = project / "models/classifier/model.safetensors"
    first, run_id = load_file(weights), json.loads((project / "models/classifier/run.json").read_text())["run_id"]
    assert list((project / "checkpoints/train-classifier").glob("*/step-*/complete.json"))
    params = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).data.params
    assert params["classifier.checkpoint_every"] == "2" and params["resolved.precision"] == "fp32"

    weights.unlink()
    capsys.readouterr()
    assert run_stage_main("train_classifier", project, monkeypatch) == ["train-classifier"]  # continued, not new
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((project / "models/classifier/run.json").read_text())["run_id"] == run_id
    again = load_file(weights)
    assert all(torch.equal(first[k], again[k]) for k in first)

    write_params(project, {"classifier": {"checkpoint_every": 0}})
    plain = train_model("classifier", load_params(project / "params.yaml"), data_root=project / "data/dataset")
    held = plain.model.state_dict()
    assert all(torch.equal(first[k], held[k].cpu()) for k in first)
    assert Judge.from_files(weights, project / "data/dataset", n=4).classifier is not None
