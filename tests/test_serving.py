"""The logged MLflow model and its request: one check and one drawing for `generate` and pyfunc predict, a real
model logged from code into a real SQLite store, no pickle in it, and loaded by a Python that has only the
model's own requirements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from scratch_diffusion import serving, tracking
from scratch_diffusion.cli import main as cli_main
from scratch_diffusion.corruption import ddpm_scheduler
from scratch_diffusion.model_files import save_basic, save_unet2d
from scratch_diffusion.models import BasicUNet, UNet2DDenoiser, build_unet

CLASSES = ("a b", "c&d", "été")  # names as folders have them: spaces, '&', unicode
DEFAULTS = {"n": 4, "seed": 0, "sampler": "ddim", "steps": 3, "eta": 1.0, "guidance_scale": 2.0}


def unet_folder(path: Path, channels: int = 3, side: int = 8, classes: tuple[str, ...] = CLASSES) -> Path:
    """A small untrained UNet2DModel in the folder layout train-unet2d writes (drawing costs what training did not)."""
    torch.manual_seed(0)
    unet = build_unet(
        (32, 32),
        1,
        ("DownBlock2D", "AttnDownBlock2D"),
        ("AttnUpBlock2D", "UpBlock2D"),
        sample_size=side,
        channels=channels,
        num_classes=len(classes),
    )
    meta = {
        "objective": "x0",
        "corruption": "ddpm",
        "conditioning": "timestep",
        "ema_decay": 0.0,
        "class_conditional": bool(classes),
        "dataset": "folder",
        "resolution": side,
        "channels": channels,
        "classes": list(classes),
    }
    save_unet2d(path, UNet2DDenoiser(unet, "timestep"), ddpm_scheduler(100, "linear", 1e-4, 0.02, "sample"), meta)
    return path


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> serving.Drawable:
    return serving.load(unet_folder(tmp_path_factory.mktemp("unet") / "unet2d"))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"n": 0}, "n: got 0, allowed: 1..8 (the model's max_images)"),
        ({"n": 9}, "n: got 9, allowed: 1..8 (the model's max_images)"),
        ({"n": 2.5}, "n: got 2.5, allowed: an integer 1..8 (the model's max_images)"),
        ({"n": "4"}, "n: got '4', allowed: an integer 1..8 (the model's max_images)"),
        ({"n": True}, "n: got True, allowed: an integer 1..8"),
        ({"seed": -1}, "seed: got -1, allowed: 0..4294967295"),
        ({"sampler": "toy"}, "sampler: got 'toy', allowed: ddpm, ddim, dpmsolver++, euler, heun, unipc (the model"),
        ({"sampler": "bogus"}, "sampler: got 'bogus', allowed: ddpm, ddim"),
        ({"steps": 0}, "steps: got 0, allowed: 1..100 for this model"),
        ({"sampler": "dpmsolver++", "steps": 100}, "steps: got 100, allowed: 1..99 for this model (dpmsolver++ fails"),
        ({"eta": 2}, "eta: got 2, allowed: a number 0..1"),
        ({"sampler": "heun", "eta": 0.5}, "eta: got 0.5, allowed: 0 with sampler 'heun' (eta is for ddim only)"),
        ({"class": "zebra"}, "class: got 'zebra', allowed: a class name ('a b', 'c&d', 'été') or an index 0..2"),
        ({"class": 3}, "class: got 3, allowed: a class name ('a b', 'c&d', 'été') or an index 0..2"),
        ({"class": ["a b", 7]}, "class: got 7, allowed: a class name ('a b', 'c&d', 'été') or an index 0..2"),
        ({"guidance_scale": 51}, "guidance_scale: got 51, allowed: a number 0..50"),
        ({"guidance_scale": "high"}, "guidance_scale: got 'high', allowed: a number 0..50"),
        (
            {"size": 3},
            "request: got 'size', allowed: the fields n, seed, sampler, steps, eta, shift, class, guidance_scale",
        ),
    ],
)
def test_each_bad_field_is_one_line_naming_it(conditional, raw, message):
    with pytest.raises(serving.RequestError) as e:
        serving.check_request(conditional, raw, DEFAULTS, max_images=8)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_a_request_takes_the_defaults_and_classes_by_name_or_index(conditional):
    check = lambda raw: serving.check_request(conditional, raw, DEFAULTS, max_images=8)  # noqa: E731
    assert check({}) == serving.Request(4, 0, "ddim", 3, 1.0, (0, 1, 2), 2.0)
    # numpy scalars and the NaN of a column a row lacks, as a DataFrame hands them over
    assert check({"n": np.int64(2), "eta": float("nan"), "class": "c&d"}) == serving.Request(
        2, 0, "ddim", 3, 1.0, (1,), 2.0
    )
    assert check({"class": ["été", 0, "1"]}).classes == (2, 0, 1)
    # The default eta belongs to the default sampler: another sampler takes none.
    assert check({"sampler": "heun"}).eta == 0.0 and check({"n": 8.0}).n == 8


def test_an_unconditional_model_refuses_class_and_guidance(tmp_path):
    model = serving.load(unet_folder(tmp_path / "unet2d", channels=1, classes=()))
    for field in ("class", "guidance_scale"):
        with pytest.raises(serving.RequestError, match=f"^{field}: got 1, allowed: none: this model is not class"):
            serving.check_request(model, {field: 1}, DEFAULTS)
    assert serving.check_request(model, {}, DEFAULTS).classes is None


def assert_no_pickle(model_uri: str) -> None:
    """Every file of a logged model is text, safetensors or the package's source; MLflow builds it from code."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    allowed = {".safetensors", ".json", ".md", ".py", ".yaml", ".txt", ""}
    assert files and not [f for f in files if f.suffix not in allowed], [f.name for f in files]
    (mlmodel,) = [f for f in files if f.name == "MLmodel"]
    import yaml

    flavors = yaml.safe_load(mlmodel.read_text())["flavors"]
    assert list(flavors) == ["python_function"], flavors
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavors["python_function"]  # the pickled-object form has this key
    from safetensors import safe_open

    for weights in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert list(f.keys())


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A real SQLite store for this test; returns the id of its experiment `e`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    tracking.ensure_store(uri)
    # Runs name their experiment: an active one set here would outlive the test in this worker's MLflow.
    return mlflow.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())


def log(folder: Path, name: str, defaults: dict, shape: tuple[int, int, int]):
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e").experiment_id):
        return serving.log_model(
            folder, image_shape=shape, defaults=defaults, max_images=8, registered_name=name, tags={"k": "v"}
        )


def test_a_logged_model_has_no_pickle_and_predicts_what_generate_draws(store, tmp_path, monkeypatch, capsys):
    """Class-conditional RGB: predict by class name draws, bit for bit, what `generate --class` draws from the same
    registry version; a bad request is MLflow's INVALID_PARAMETER_VALUE (the server's HTTP 400) with our line."""
    info = log(unet_folder(tmp_path / "unet2d"), "rgb", DEFAULTS, (3, 8, 8))
    err = capsys.readouterr().err
    assert "Created version" not in err and "Downloading artifacts" not in err and "pickle" not in err.lower(), err
    assert_no_pickle("models:/rgb/1")
    version = mlflow.MlflowClient().get_model_version("rgb", "1")
    assert version.tags["k"] == "v"
    logged = mlflow.get_logged_model(info.model_id)
    assert logged.params["max_images"] == "8" and logged.params["default.sampler"] == "ddim"
    signature = mlflow.models.get_model_info("models:/rgb/1").signature
    assert signature.inputs.input_names() == list(serving.FIELDS) and signature.outputs.inputs[0].shape == (-1, 8, 8, 3)

    model = mlflow.pyfunc.load_model("models:/rgb/1")
    request = {"n": 5, "seed": 3, "steps": 4, "eta": 0.5, "class": "c&d", "guidance_scale": 1.5}
    images = model.predict(request)
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    monkeypatch.chdir(tmp_path)
    cli_main(["generate", "--model", "models:/rgb/1", "--n", "5", "--seed", "3", "--steps", "4", "--eta", "0.5"])
    cli_main(
        ["generate", "--model", "models:/rgb/1", "--n", "5", "--seed", "3", "--steps", "4", "--eta", "0.5"]
        + ["--class", "c&d", "--guidance-scale", "1.5", "--out", "named"]
    )
    with np.load(tmp_path / "named/ddim-4-seed3-digits1-g1.5.npz") as drawn:
        assert np.array_equal(drawn["images"], images) and drawn["labels"].tolist() == [1] * 5
    # The model's own defaults: n 4, DDIM-3 with eta 1, every class in turn, guidance 2.
    assert model.predict({}).shape == (4, 8, 8, 3)
    assert np.array_equal(model.predict({"n": 2}), model.predict({"n": 2, "eta": 1.0, "steps": 3, "seed": 0}))
    for bad, line in (
        ({"n": 9}, "n: got 9, allowed: 1..8 (the model's max_images)"),
        ({"class": "zebra"}, "class: got 'zebra', allowed: a class name"),
    ):
        with pytest.raises(MlflowException) as e:
            model.predict(bad)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and str(e.value.message).startswith(line)
    with pytest.raises(MlflowException, match="request: got 2 rows, allowed: one request"):
        model.predict([{"n": 1}, {"n": 2}])


def test_a_basic_unet_is_logged_the_same_way_with_the_toy_sampler(store, tmp_path, capsys):
    torch.manual_seed(0)
    save_basic(tmp_path / "basic", BasicUNet(1, 1, 12), {"dataset": "folder", "resolution": 12, "channels": 1})
    for version in (1, 2):  # a second version of a registered name: MLflow's lines on it are not printed either
        info = log(tmp_path / "basic", "basic", {"n": 3, "seed": 0, "sampler": "toy", "steps": 5}, (1, 12, 12))
        assert info.registered_model_version == version
    err = capsys.readouterr().err
    assert "Registered model" not in err and "Created version" not in err, err
    assert_no_pickle("models:/basic/1")
    model = mlflow.pyfunc.load_model("models:/basic/1")
    images = model.predict({"seed": 7})
    drawn, _, _ = serving.draw(serving.load(tmp_path / "basic"), serving.Request(3, 7, "toy", 5, 0.0, None, None))
    assert images.shape == (3, 12, 12) and np.array_equal(images, drawn)
    with pytest.raises(MlflowException, match="sampler: got 'ddim', allowed: toy"):
        model.predict({"sampler": "ddim"})


def requirement_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that `requirements` name, and everything they require (their markers evaluated
    here, no extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = {}, [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen[name] = dist = metadata.distribution(req.name)
        todo += [Requirement(r) for r in dist.requires or []]
    return list(seen.values())


def test_a_python_with_only_the_models_requirements_loads_it_and_predicts(store, tmp_path):
    """A new virtual environment whose site-packages holds only the distributions of the model's requirements.txt
    (linked from this one, with what they require): no scratch-diffusion installed, so the model runs the source
    it was logged with."""
    log(unet_folder(tmp_path / "unet2d", channels=1, classes=()), "grey", DEFAULTS, (1, 8, 8))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/grey/1"))
    requirements = (local / "requirements.txt").read_text().split()
    for package in ("mlflow", "torch", "diffusers", "numpy", "safetensors"):
        assert f"{package}=={metadata.version(package)}" in requirements, requirements
    env = tmp_path / "env"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(env)], check=True)
    (site,) = env.glob("lib/python*/site-packages")
    for dist in requirement_closure(requirements):
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    code = (
        "import sys, mlflow, numpy as np; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "import scratch_diffusion; print(scratch_diffusion.__file__); np.save(sys.argv[2], m.predict({'n': 3}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [str(env / "bin/python"), "-c", code, str(local), str(tmp_path / "out.npy")],
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith(str(local / "code")), proc.stdout  # the logged source, not an install
    expected = mlflow.pyfunc.load_model("models:/grey/1").predict({"n": 3})
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected)


def test_generate_takes_classes_by_name_and_leaves_nothing_on_a_bad_request(tmp_path, monkeypatch, capsys):
    unet_folder(tmp_path / "models/unet2d")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--class", "zebra", "--steps", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines()[-1].endswith(
        "--class: got 'zebra', allowed: a class name ('a b', 'c&d', 'été') or an index 0..2"
    ), err
    assert not (tmp_path / "generated").exists()
    cli_main(["generate", "--class", "été", "--class", "a b", "--steps", "2", "--n", "4", "--precision", "fp32"])
    with np.load(tmp_path / "generated/ddim-2-seed0-digits20-g2.npz") as npz:
        assert npz["labels"].tolist() == [2, 0, 2, 0]
    assert json.loads((tmp_path / "models/unet2d/scratch_diffusion.json").read_text())["classes"] == list(CLASSES)
