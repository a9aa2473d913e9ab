"""A folder of the user's own images as the dataset (data.py's folder source, config's data rules, preflight's data
checks, the check-params stage): every bad input is one line naming the file or key, before anything is written."""

import json
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from scratch_diffusion import data
from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.preflight import DataFacts, check_data, check_runnable
from tests.conftest import REPO, make_shapes, run_in_process

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
    assert manifest["skipped"] == {"not an image": ["square/notes.txt"]} and len(manifest["images"]) == 24
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
        ({"data": {"held_out": 0}}, "data.held_out", "allowed range (0.0, 0.5)"),
        ({"data": {"channels": 0}}, "data.channels", "1 (grey) or 3 (RGB)"),
        ({"data": {"resolution": 2000}}, "data.resolution", "4..1024"),
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
        ({"unet2d": {"class_conditional": True}, "sample": {"n": 3, "digits": [0, 3]}}, "sample.digits[1]: got 3"),
        ({"sample": {"n": 3, "digits": "all", "classes": ["circle", "hexagon"]}}, "sample.classes[1]: got 'hexagon'"),
    ):
        bad = params_from_dict(_merge(_raw(params), over))
        with pytest.raises(ParamsError, match=re.escape(key)):
            check_data(bad, facts)


def test_the_readme_command_runs_on_a_folder_smaller_than_a_batch(tmp_path):
    """About 100 pictures with the README's own-images params: the default batch of 128 is more than the training
    split, so each step takes all of it (said in the budget line) and the lesson's images-seen budget sets the
    steps; nothing is refused."""
    from scratch_diffusion.config import training_epochs
    from scratch_diffusion.training import budget_line, planned_steps

    src = make_shapes(tmp_path / "shapes", per_class=33)  # 99 pictures, three classes
    params = params_from_dict({"data": {"dataset": "folder", "source": str(src), "resolution": 32, "channels": 3}})
    listing = data.source_listing("folder", str(src), 3, params.data.held_out)
    facts = DataFacts.listed(params, listing)
    n = facts.n_train
    assert params.unet2d.batch_size == 128 > n > 80 and facts.n_test >= 6
    notes = check_runnable(params, facts)
    assert notes[0].startswith(f"sample.n auto: {facts.n_test // 2} images per setting"), notes
    epochs = training_epochs(params.unet2d.epochs, "folder", n)
    assert planned_steps(params.unet2d, epochs, n) == epochs == round(180_000 / n)  # one step per epoch
    assert budget_line("train-unet2d", params.unet2d, epochs, n).startswith(
        f"train-unet2d: {epochs} steps ({epochs} epochs of {n} images at batch {n}, all of them (128 asked))"
    )


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
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, project / name)
    shutil.copy(REPO / "pyproject.toml", project)
    src = make_shapes(tmp_path / "shapes", per_class=8)
    bad = src / "square" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    params = _raw(_params(src, sample={"n": 3}, basic={"batch_size": 8}, unet2d={"batch_size": 8}))
    params["classifier"] = {**params["classifier"], "batch_size": 8}
    (project / "params.yaml").write_text(json.dumps(params))
    proc = run_in_process([sys.executable, "stages/check_params.py"], cwd=project)
    assert proc.returncode == 2  # run_stage's code for a refused value
    lines = [line for line in proc.stderr.splitlines() if str(bad) in line]
    assert len(lines) == 1 and "not a readable image" in lines[0], proc.stderr
    assert not (project / "checks").exists()
    bad.unlink()  # without the file: valid, and the listing names every image with its md5
    proc = run_in_process([sys.executable, "stages/check_params.py"], cwd=project)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads((project / "checks/source.json").read_text())
    assert len(listing["images"]) == 23 and listing["classes"] == ["circle", "square", "triangle"]
    from scratch_diffusion.identity import library_versions  # what every computing stage depends on

    assert json.loads((project / "checks/versions.json").read_text()) == library_versions()


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


# Real pictures nobody here made, shipped by a package the project installs: matplotlib's toolbar icons (RGBA, drawn
# on a transparent ground) and its sample photograph.
MPL = Path(matplotlib.get_data_path())
ICONS = sorted((MPL / "images").glob("*_large.png"))
PHOTO = MPL / "sample_data" / "grace_hopper.jpg"


def test_transparent_pixels_show_the_background_not_the_colour_stored_under_them(tmp_path, recwarn):
    icon = Image.open(ICONS[0])
    rgba = np.asarray(icon.convert("RGBA"))
    clear = rgba[..., 3] == 0
    # Dropping the alpha (PIL's convert) shows the colour stored under the transparent pixels, whatever it is.
    assert clear.any() and (np.asarray(icon.convert("RGB"))[clear] == rgba[clear][:, :3]).all()
    for background, rgb in (("white", 255), ("black", 0), ("#336699", (0x33, 0x66, 0x99))):
        picture, steps = data.decode_image(ICONS[0], 3, background)
        assert (np.asarray(picture)[clear] == rgb).all() and steps == ("transparency flattened",)
    # A palette picture with a transparent index (PNG tRNS), from the photograph: flattened too, and PIL's palette
    # warning is not printed.
    palette = Image.open(PHOTO).resize((40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    key = palette.getpixel((0, 0))
    palette.save(tmp_path / "p.png", transparency=key)
    picture, steps = data.decode_image(tmp_path / "p.png", 3, "white")
    assert steps == ("transparency flattened",) and np.asarray(picture)[0, 0].tolist() == [255, 255, 255]
    assert not [w for w in recwarn if "PIL" in w.filename or "Palette" in str(w.message)]


def test_orientation_bit_depth_and_animation_are_decoded_as_a_viewer_shows_them(tmp_path):
    photo = Image.open(PHOTO).resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    photo.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    picture, steps = data.decode_image(tmp_path / "turned.jpg", 3)
    assert picture.size == (40, 60) and steps == ("EXIF orientation applied",)

    grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey PNG
    assert np.asarray(Image.open(tmp_path / "deep.png").convert("L")).mean() > 250  # PIL alone: nearly all white
    picture, steps = data.decode_image(tmp_path / "deep.png", 1)
    assert steps == ("16-bit scaled to 8",) and np.abs(np.asarray(picture).astype(int) - grey).max() <= 1

    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    picture, steps = data.decode_image(tmp_path / "moving.gif", 3)
    assert steps == ("first frame of an animation",)
    first = np.asarray(Image.open(tmp_path / "moving.gif").convert("RGB")).astype(int)
    assert np.abs(np.asarray(picture).astype(int) - first).max() == 0


def test_an_oversized_picture_is_one_line_before_it_is_decoded(tmp_path):
    # A PNG header that claims 12000 x 12000 pixels: refused from the header, nothing decoded, no PIL warning.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    for side in (12000, 20000):  # above PIL's warning, and above its own refusal
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
        size = f"{side} x {side} pixels" if side == 12000 else "over 178,956,970 pixels"
        with pytest.raises(data.DataError, match=rf"huge.png: {size}; allowed: at most 50,000,000 pixels \(resize"):
            data.decode_image(tmp_path / "huge.png", 3)


def test_a_folder_of_real_icons_records_how_its_pictures_were_decoded(tmp_path):
    """Class names with spaces and '&'; every icon has a transparent ground, flattened on the background."""
    src = tmp_path / "icons"
    for i, icon in enumerate(ICONS[:8]):
        target = src / ("arrows & moves" if i % 2 else "file ops") / icon.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(icon, target)
    listing = data.source_listing("folder", str(src), 3, 0.25, "black")
    assert listing["background"] == "black" and listing["decoding"] == {"transparency flattened": 8}
    manifest = data.download("folder", str(src), tmp_path / "ds", resolution=16, channels=3, held_out=0.25)
    assert manifest["background"] == "white" and manifest["decoding"] == {"transparency flattened": 8}
    x, _ = data.load_split(tmp_path / "ds")
    assert (x[:, :, 0, 0] == 255).all()  # the corners of the icons are transparent: white now
    assert data.describe(tmp_path / "ds").classes == ("arrows & moves", "file ops")


@pytest.mark.parametrize("background", ["pink", "#12345", "#gg0000", ""])
def test_a_background_that_is_no_colour_is_refused_with_the_key(tmp_path, background):
    with pytest.raises(ParamsError, match=rf"^data.background: got '{background}', allowed: 'white', 'black' or a"):
        _params(make_shapes(tmp_path / "s", per_class=4), data={"background": background})


def test_every_skipped_file_is_named_with_its_reason(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=4)
    (src / "README.txt").write_text("about these pictures")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "circle" / ".thumbs.db").write_bytes(b"\0")
    (src / "circle" / ".cache").mkdir()
    (src / "circle" / ".cache" / "index.json").write_text("{}")  # a non-image in a hidden folder: skipped too
    (src / "square" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "triangle" / "loop").symlink_to(src)  # a link back up the tree: listed once, never walked in circles
    listing = data.source_listing("folder", str(src), 3, 0.25)
    assert listing["skipped"] == {
        "hidden": [".DS_Store", "circle/.cache/index.json", "circle/.thumbs.db"],
        "not an image": ["README.txt"],
        "dangling link": ["square/gone.png"],
    }
    assert len(listing["images"]) == 12 and listing["classes"] == ["circle", "square", "triangle"]
    said = []
    data.download("folder", str(src), tmp_path / "ds", resolution=8, channels=3, held_out=0.25, log=said.append)
    skipped = "skipped: 3 hidden (.DS_Store, ...), 1 not an image (README.txt), 1 dangling link (square/gone.png)"
    assert said[-1].endswith(f"(12 images; {skipped})"), said
    with pytest.raises(data.DataError, match=r"README.txt: cannot be read \(Not a directory\); allowed: folders you"):
        data._entries(src / "README.txt")


def test_class_sizes_and_one_class_folders_follow_the_stated_rules(tmp_path):
    src = make_shapes(tmp_path / "shapes", per_class=2)  # 2 images per class: one to test, one to train on
    assert data.source_listing("folder", str(src), 3, 0.1)["n_test"] == 3
    for extra in sorted((src / "circle").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(data.DataError, match=r"circle: 1 image, too few .* allowed: at least 2 images per class"):
        data.source_listing("folder", str(src), 3, 0.1)
    one = make_shapes(tmp_path / "one", per_class=6, classes=("leaf",))
    listing = data.source_listing("folder", str(one), 3, 0.25)
    assert listing["classes"] == [] and listing["note"].startswith("one class folder (leaf): read as unlabelled")
    manifest = data.download("folder", str(one), tmp_path / "ds", resolution=8, channels=3, held_out=0.25)
    assert data.describe(tmp_path / "ds").num_classes == 0 and len(manifest["images"]) == 6


def test_a_relative_source_that_is_not_there_says_where_it_was_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"which is no folder under .* \(a relative path is read from where the"):
        _params("pictures")


def test_sample_n_auto_fits_a_small_test_split_and_says_so_first(tmp_path):
    """The README's own-images command on a folder whose test split holds 24 images: n auto is 12, said in
    check-params' first line; an explicit n that does not fit is refused as before."""
    src = make_shapes(tmp_path / "shapes", per_class=32)
    listing = data.source_listing("folder", str(src), 3, 0.25)
    small = {f: {"batch_size": 8} for f in ("basic", "unet2d", "classifier")}
    params = _params(src, **small)
    assert params.sample.n == "auto" and params.sample.size(listing["n_test"]) == 12
    notes = check_runnable(params, DataFacts.listed(params, listing))
    assert notes[0].startswith("sample.n auto: 12 images per setting, half the 24 test images"), notes
    big = _params(src, sample={"n": 13}, **small)
    with pytest.raises(ParamsError, match=r"^sample.n: got 13; compare needs 2 \* n .* \(allowed: auto or 2..12"):
        check_runnable(big, DataFacts.listed(big, listing))
    assert params_from_dict({}).sample.size(10000) == 1000  # MNIST's 10000 test images: n as before
    for bad, says in (("many", "allowed: auto or an integer >= 2"), (1, "allowed range [2, inf]")):
        with pytest.raises(ParamsError, match=re.escape(f"sample.n: got {bad!r}, {says}")):
            _params(src, sample={"n": bad})
