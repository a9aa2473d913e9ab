"""A folder of the user's own images as the dataset (data.py's folder source, config's data rules, preflight's data
checks, the check-params stage): every bad input is one line naming the file or key, before anything is written."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from scratch_diffusion import data
from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.preflight import DataFacts, check_data, check_runnable
from tests.conftest import REPO, make_shapes, run

FOLDER = {"dataset": "folder", "resolution": 16, "channels": 3, "held_out": 0.25}


def _params(source, **over):
    return params_from_dict({"data": {**FOLDER, "source": str(source), **over.pop("data", {})}, **over})


def test_a_labelled_folder_becomes_shuffled_splits_of_its_shape(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=8)
    (src / "square" / "notes.txt").write_text("not an image")
    manifest = data.download("folder", str(src), tmp_path / "ds", resolution=16, channels=3, held_out=0.25)
    info = data.describe(tmp_path / "ds")
    assert info.shape == (3, 16, 16) and info.classes == ("circle", "square", "triangle")
    assert (info.n_train, info.n_test) == (18, 6)  # 2 of each 8 held out
    assert manifest["skipped"] == 1 and len(manifest["images"]) == 24
    x, y = data.load_split(tmp_path / "ds")
    assert x.shape == (18, 3, 16, 16) and x.dtype.is_floating_point is False
    assert sorted(np.bincount(y.numpy()).tolist()) == [6, 6, 6]
    assert len(set(y[:6].tolist())) > 1, "the training split is stored shuffled: a first-n subset holds every class"
    x_test, y_test = data.load_split(tmp_path / "ds", train=False)
    assert x_test.shape == (6, 3, 16, 16) and len(set(y_test[:3].tolist())) > 1
    # Resize of the short side and a centre crop: the 40 x 48 picture's colours survive in all three channels.
    assert x.float().std(dim=(0, 2, 3)).min() > 1


def test_grey_conversion_and_an_unlabelled_folder(tmp_path):
    src = make_shapes(tmp_path / "flat", per_class=10, classes=())
    data.download("folder", str(src), tmp_path / "ds", resolution=8, channels=1, held_out=0.2)
    info = data.describe(tmp_path / "ds")
    assert info.shape == (1, 8, 8) and info.num_classes == 0 and (info.n_train, info.n_test) == (8, 2)
    assert data.load_split(tmp_path / "ds")[0].shape == (8, 1, 8, 8)


def test_a_changed_image_is_another_dataset(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=4)
    listing = data.source_listing("folder", str(src), 3, 0.25)
    data.download("folder", str(src), tmp_path / "a", resolution=16, channels=3, held_out=0.25)
    Image.new("RGB", (40, 48), (255, 0, 0)).save(src / "circle" / "0000.png")
    assert data.source_listing("folder", str(src), 3, 0.25) != listing  # check-params' output: download reruns
    data.download("folder", str(src), tmp_path / "b", resolution=16, channels=3, held_out=0.25)
    assert data.dataset_digest(tmp_path / "a") != data.dataset_digest(tmp_path / "b")  # training restarts


@pytest.mark.parametrize(
    "damage, says",
    [
        ("empty", "no images"),
        ("truncated", "not a readable image"),
        ("garbage", "not a readable image"),
        ("too_few", "too few to hold out"),
        ("mixed", "both class folders"),
        ("missing", "no such folder"),
    ],
)
def test_bad_folders_are_one_line_naming_the_file(tmp_path, damage, says):
    src = make_shapes(tmp_path / "shapes", per_class=4)
    named = src
    if damage == "empty":
        shutil.rmtree(src / "square")
        (src / "square").mkdir()
        (src / "square" / "readme.md").write_text("x")
        named = src / "square"
    elif damage == "truncated":
        named = src / "circle" / "0001.png"
        named.write_bytes(named.read_bytes()[:-40])
    elif damage == "garbage":
        named = src / "triangle" / "0002.png"
        named.write_bytes(b"\x89PNG but not really")
    elif damage == "too_few":
        for p in sorted((src / "square").iterdir())[1:]:
            p.unlink()
        named = src / "square"
    elif damage == "mixed":
        shutil.copy(src / "circle" / "0000.png", src / "loose.png")
    else:
        named = tmp_path / "nowhere"
        src = named
    with pytest.raises(data.DataError) as e:
        data.source_listing("folder", str(src), 3, 0.25)
    message = str(e.value)
    assert says in message and str(named) in message and "\n" not in message
    with pytest.raises(data.DataError):  # the download stage refuses it as well, and leaves nothing
        data.download("folder", str(src), tmp_path / "ds", resolution=16, channels=3, held_out=0.25)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "over, key, allowed",
    [
        ({"data": {"channels": 2}}, "data.channels", "1 (grey) or 3 (RGB)"),
        ({"data": {"resolution": 0}}, "data.resolution", "4..1024"),
        ({"data": {"resolution": 30}}, "data.resolution divisible by 4", "e.g. 32"),
        ({"data": {"held_out": 0}}, "data.held_out", "(0, 0.5)"),
        ({"data": {"source": "auto"}}, "data.source", "no folder"),
        ({"data": {"dataset": "mnist", "resolution": 32}}, "data.resolution", "0 (as stored) or 28"),
        ({"data": {"dataset": "mnist", "resolution": 0, "channels": 3}}, "data.channels", "0 (as stored) or 1"),
    ],
)
def test_bad_conversion_params_are_refused_with_the_key(tmp_path, over, key, allowed):
    src = make_shapes(tmp_path / "shapes", per_class=4)
    if over["data"].get("dataset") == "mnist":
        over["data"]["source"] = "auto"
    with pytest.raises(ParamsError) as e:
        _params(src, **over)
    assert key in str(e.value) and allowed in str(e.value)


def test_a_resolution_the_unet_cannot_halve_is_refused_for_its_depth(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=4)
    _params(src, data={"resolution": 36})  # 3 blocks halve twice: 36 -> 18 -> 9
    with pytest.raises(ParamsError, match="divisible by 8"):
        _params(
            src,
            data={"resolution": 36},
            unet2d={
                "block_out_channels": [32, 32, 32, 32],
                "down_block_types": ["DownBlock2D"] * 4,
                "up_block_types": ["UpBlock2D"] * 4,
            },
        )


def test_data_checks_use_the_listed_size_and_classes(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=8)
    params = _params(src, sample={"n": 3, "digits": [0, 1, 2]}, basic={"batch_size": 8}, unet2d={"batch_size": 8})
    params = params_from_dict({**_raw(params), "classifier": {"batch_size": 8}})
    listing = data.source_listing("folder", str(src), 3, 0.25)
    facts = DataFacts.listed(params, listing)
    assert (facts.channels, facts.resolution, facts.num_classes, facts.n_train, facts.n_test) == (3, 16, 3, 18, 6)
    assert check_runnable(params, facts) == []  # the networks at 16 x 16 x 3 build and run on the meta device
    for over, key in (
        ({"sample": {"n": 4}}, "sample.n"),  # 2 * 4 > 6 test images
        ({"data": {"n_train": 19}}, "data.n_train"),
        ({"basic": {"batch_size": 19}}, "basic.batch_size"),
        ({"unet2d": {"class_conditional": True}, "sample": {"n": 3, "digits": [0, 3]}}, "sample.digits"),
    ):
        bad = params_from_dict(_merge(_raw(params), over))
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            check_data(bad, facts)


def test_an_unlabelled_folder_says_what_compare_cannot_measure_and_refuses_class_conditioning(tmp_path):
    src = make_shapes(tmp_path / "flat", per_class=16, classes=())
    params = _params(src, sample={"n": 2}, classifier={"batch_size": 8}, basic={"batch_size": 8})
    params = params_from_dict(_merge(_raw(params), {"unet2d": {"batch_size": 8}}))
    facts = DataFacts.listed(params, data.source_listing("folder", str(src), 3, 0.25))
    (note,) = check_data(params, facts)
    assert "unlabelled" in note and "no FID" in note and "memorisation" in note
    conditional = params_from_dict(_merge(_raw(params), {"unet2d": {"class_conditional": True}}))
    with pytest.raises(ParamsError, match="unet2d.class_conditional: got true, but .* is unlabelled"):
        check_data(conditional, facts)


def test_check_params_names_a_truncated_image_and_writes_nothing(tmp_path):
    """The stage as DVC runs it: a truncated image stops it with one line, and neither of its outputs is written."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "stages", project / "stages")
    src = make_shapes(tmp_path / "shapes", per_class=8)
    bad = src / "square" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    params = _raw(_params(src, sample={"n": 3}, basic={"batch_size": 8}, unet2d={"batch_size": 8}))
    params["classifier"] = {**params["classifier"], "batch_size": 8}
    (project / "params.yaml").write_text(json.dumps(params))
    proc = run(["python", "stages/check_params.py"], cwd=project, check=False)
    assert proc.returncode == 2  # run_stage's code for a refused value
    lines = [line for line in proc.stderr.splitlines() if str(bad) in line]
    assert len(lines) == 1 and "not a readable image" in lines[0], proc.stderr
    assert not (project / "checks").exists()
    bad.unlink()  # without the file: valid, and the listing names every image with its md5
    proc = run(["python", "stages/check_params.py"], cwd=project)
    listing = json.loads((project / "checks/source.json").read_text())
    assert len(listing["images"]) == 23 and listing["classes"] == ["circle", "square", "triangle"]


def _raw(params) -> dict:
    import dataclasses

    raw = dataclasses.asdict(params)
    raw["sample"]["settings"] = [dataclasses.asdict(s) for s in params.sample.settings]
    return json.loads(json.dumps(raw))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out
