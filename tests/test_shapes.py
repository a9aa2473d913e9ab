"""Every image's shape comes from the data: a labelled RGB folder (16 px), an unlabelled grey one (12 px) and MNIST
(1 channel, 28 px, ten classes) flow through both networks as the recipe builds them, the training grids, the
samplers, the image writers and the model folders, into plain diffusers."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from scratch_diffusion import recipe
from scratch_diffusion.config import ParamsError, params_from_dict
from scratch_diffusion.data import DatasetInfo, describe, download, make_shapes
from scratch_diffusion.images import captioned, class_columns, grid, save_png, to_uint8
from scratch_diffusion.model_files import ModelFileError, load_basic, load_unet2d, save_basic, save_unet2d
from scratch_diffusion.models import BasicUNet, UNet2DDenoiser, build_unet
from scratch_diffusion.samplers import fixed_noise, generate
from tests.conftest import REPO, TINY, merge

MNIST = DatasetInfo("mnist", 28, 1, tuple("0123456789"), 60000, 10000)
# A grid of 4 images in 2 steps: each network call is a few milliseconds at these sizes.
FAST = {"basic": {"sample_n": 4, "sample_steps": 2}, "unet2d": {**TINY["unet2d"], "sample_n": 4, "sample_steps": 2}}


def params(class_conditional: bool = False):
    raw = merge(yaml.safe_load((REPO / "params.yaml").read_text()), FAST)
    return params_from_dict(merge(raw, {"unet2d": {"class_conditional": class_conditional}}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, DatasetInfo]:
    """Two folders converted by the download code: labelled RGB shapes at 16 px, unlabelled grey ones at 12 px."""
    base = tmp_path_factory.mktemp("folders")
    quiet = {"log": lambda *a: None, "held_out": 0.25}
    download(
        "folder", make_shapes(base / "rgb", per_class=4, size=20), base / "rgb-data", resolution=16, channels=3, **quiet
    )
    download(
        "folder",
        make_shapes(base / "grey", per_class=4, size=20, classes=()),
        base / "grey-data",
        resolution=12,
        channels=1,
        **quiet,
    )
    return {"rgb": describe(base / "rgb-data"), "grey": describe(base / "grey-data")}


@pytest.fixture(params=["rgb", "grey", "mnist"])
def info(request, folders) -> DatasetInfo:
    return MNIST if request.param == "mnist" else folders[request.param]


def test_the_folders_describe_themselves(folders):
    assert folders["rgb"].shape == (3, 16, 16) and folders["rgb"].classes == ("circle", "square", "triangle")
    assert folders["grey"].shape == (1, 12, 12) and folders["grey"].num_classes == 0


@pytest.mark.parametrize("network", ["basic", "unet2d"])
def test_each_network_is_built_for_the_datasets_shape(info, network):
    conditional = network == "unet2d" and info.num_classes > 0
    model, *_ = recipe._parts(network, params(conditional), info)
    assert model.image_shape == info.shape
    x = torch.rand(2, *info.shape)
    with torch.no_grad():
        assert model(x, torch.tensor([1, 500])).shape == (2, *info.shape)
    if network == "unet2d":
        config = model.unet.config
        assert (config.sample_size, config.in_channels, config.out_channels) == (info.resolution, *info.shape[:1] * 2)
        assert model.null_label == (info.num_classes if conditional else None)


def test_mnist_networks_have_the_weights_they_had_before():
    """Shaping the networks from the data draws nothing more from the RNG: the same seed, the same initial weights."""
    p = params(class_conditional=True)
    basic, *_ = recipe._parts("basic", p, MNIST)
    torch.manual_seed(p.seed)
    lesson = BasicUNet(1, 1, 28)
    assert all(
        torch.equal(a, b) for a, b in zip(basic.state_dict().values(), lesson.state_dict().values(), strict=True)
    )
    unet2d, *_ = recipe._parts("unet2d", p, MNIST)
    u = p.unet2d
    torch.manual_seed(p.seed)
    before = build_unet(
        u.block_out_channels,
        u.layers_per_block,
        u.down_block_types,
        u.up_block_types,
        sample_size=28,
        channels=1,
        num_classes=10,
    )
    ours, theirs = unet2d.unet.state_dict(), before.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_class_conditional_on_unlabelled_data_is_refused(folders):
    with pytest.raises(ParamsError, match="unet2d.class_conditional: got true, but the folder dataset is unlabelled"):
        recipe._parts("unet2d", params(class_conditional=True), folders["grey"])


@pytest.mark.parametrize("network", ["basic", "unet2d"])
def test_training_grids_are_drawn_at_the_datasets_shape(info, network):
    """The grid maker's start noise is of the data's shape, and a class-conditional grid cycles through the data's
    classes (three here: label 3 and up would be out of the embedding)."""
    conditional = network == "unet2d" and info.num_classes > 0
    p = params(conditional)
    model, scheduler, *_ = recipe._parts(network, p, info)
    picture = recipe._grid_maker(network, p, scheduler, "cpu", info)(model)
    side = 2 * (info.resolution + 2) + 2  # 4 images: 2 x 2, padding 2
    assert picture.shape == ((side, side) if info.channels == 1 else (side, side, 3)) and picture.dtype == np.uint8


def test_fixed_noise_needs_the_shape():
    with pytest.raises(TypeError):
        fixed_noise(2, "ddpm", 0)  # no default shape: a forgotten one would be MNIST's
    assert fixed_noise(2, "toy", 0, (3, 8, 8)).shape == (2, 3, 8, 8)
    torch.testing.assert_close(
        fixed_noise(2, "ddpm", 5, (1, 4, 4)), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    )


@pytest.mark.parametrize("sampler", ["toy", "ddim", "dpmsolver++"])
def test_generate_draws_the_models_shape(info, sampler):
    network = "basic" if sampler == "toy" else "unet2d"
    conditional = network == "unet2d" and info.num_classes > 0
    model, scheduler, *_ = recipe._parts(network, params(conditional), info)
    guidance = {"labels": torch.arange(3) % info.num_classes, "guidance_scale": 2.0} if conditional else {}
    images, _ = generate(
        model.eval(),
        sampler,
        2,
        3,
        batch_size=3,
        seed=0,
        corruption="toy" if sampler == "toy" else "ddpm",
        trained_config=scheduler.config if scheduler else None,
        **guidance,
    )
    c, h, w = info.shape
    assert images.shape == ((3, h, w) if c == 1 else (3, h, w, 3)) and images.dtype == np.uint8


def test_image_writers_keep_grey_and_rgb(tmp_path):
    x = torch.zeros(5, 3, 6, 4)
    x[:, 0] = 1  # red
    x[0, 2, 1, 1] = 0.5
    rgb = to_uint8(x)
    assert rgb.shape == (5, 6, 4, 3) and rgb[0, 1, 1].tolist() == [255, 0, 128] and rgb[1, 0, 0].tolist() == [255, 0, 0]
    grey = to_uint8(torch.full((5, 1, 6, 4), 0.2))
    assert grey.shape == (5, 6, 4) and int(grey[0, 0, 0]) == 51
    with pytest.raises(ValueError, match=r"allowed: \(N, 1, H, W\) or \(N, 3, H, W\)"):
        to_uint8(torch.zeros(2, 2, 4, 4))

    picture = grid(rgb, nrow=3)  # 2 rows of 3, the sixth cell empty
    assert picture.shape == (2 * 8 + 2, 3 * 6 + 2, 3)
    assert picture[0, 0].tolist() == [128] * 3 and picture[-3, -3].tolist() == [128] * 3  # grey padding, empty cell
    assert picture[2, 2].tolist() == [255, 0, 0]
    assert grid(grey, nrow=3).shape == (18, 20)

    for pic, mode in ((picture, "RGB"), (grid(grey), "L")):
        shown = captioned(pic, "step 3", scale=2)
        assert Image.fromarray(shown).mode == mode and shown.shape[1] == 2 * pic.shape[1]
        save_png(tmp_path / f"{mode}.png", pic, scale=2)
        with Image.open(tmp_path / f"{mode}.png") as img:
            assert img.mode == mode and img.size == (2 * pic.shape[1], 2 * pic.shape[0])
    with Image.open(tmp_path / "RGB.png") as img:
        assert img.getpixel((4, 4)) == (255, 0, 0)


def test_class_grids_put_one_class_in_each_column():
    assert [class_columns(k, 64) for k in (10, 3, 2, 1, 7, 12)] == [10, 9, 10, 10, 7, 12]
    assert class_columns(10, 4) == 4 and class_columns(3, 4) == 3


def test_model_folders_say_their_shape(folders, tmp_path):
    """The BasicUNet's folder records the data; the UNet2DModel's config holds it; loading gives the same shape."""
    info = folders["rgb"]
    p = params(class_conditional=True)
    basic, *_ = recipe._parts("basic", p, info)
    save_basic(tmp_path / "basic", basic, recipe.dataset_meta(info))
    loaded = load_basic(tmp_path / "basic")
    assert loaded.image_shape == (3, 16, 16)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), basic.state_dict().values(), strict=True)
    )

    unet, scheduler, *_ = recipe._parts("unet2d", p, info)
    meta = {**recipe.unet2d_meta(p), **recipe.dataset_meta(info), "run_id": ""}
    save_unet2d(tmp_path / "unet2d", unet, scheduler, meta)
    model, _, saved = load_unet2d(tmp_path / "unet2d")
    assert model.image_shape == (3, 16, 16) and model.null_label == 3
    assert saved["classes"] == ["circle", "square", "triangle"]
    card = (tmp_path / "unet2d/README.md").read_text()
    assert (
        "`folder` images, 16 x 16, 3 channels (RGB)" in card
        and "labels 0 `circle`, 1 `square`, 2 `triangle`; label 3 = no label" in card
    )
    assert "--class triangle" in card


def test_a_basic_folder_without_its_shape_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "basic").mkdir()
    save_file(BasicUNet(1, 1, 28).state_dict(), str(tmp_path / "basic/model.safetensors"))
    with pytest.raises(ModelFileError, match=r"scratch_diffusion.json: missing; rerun `dvc repro train-basic`"):
        load_basic(tmp_path / "basic")


def test_plain_diffusers_draws_rgb_images_of_the_trained_resolution(tmp_path):
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    unet = build_unet(
        (32, 32), 1, ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D"), sample_size=8, channels=3
    )
    p = params()
    meta = {**recipe.unet2d_meta(p), "run_id": ""}
    save_unet2d(tmp_path / "unet2d", UNet2DDenoiser(unet), recipe.noise_schedule(p), meta)
    pipe = DDPMPipeline.from_pretrained(tmp_path / "unet2d")
    images = pipe(
        batch_size=1, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 8, 8, 3)
    assert "Images, 8 x 8, 3 channels (RGB)" in (tmp_path / "unet2d/README.md").read_text()


def test_generate_command_draws_the_models_shape_and_classes(folders, tmp_path, monkeypatch, capsys):
    """`generate` on an RGB model of three classes: npz (n, H, W, 3) cycling its classes, an RGB grid with one class
    per column, and --digit checked against the model's classes."""
    from scratch_diffusion.cli import main as cli_main

    info = folders["rgb"]
    p = params(class_conditional=True)
    unet, scheduler, *_ = recipe._parts("unet2d", p, info)
    save_unet2d(tmp_path / "models/unet2d", unet, scheduler, {**recipe.unet2d_meta(p), **recipe.dataset_meta(info)})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = ["generate", "--sampler", "ddim", "--steps", "2", "--precision", "fp32"]
    cli_main([*common, "--n", "4"])
    with np.load(tmp_path / "generated/ddim-2-seed0-digits012-g2.npz") as npz:
        assert npz["images"].shape == (4, 16, 16, 3) and npz["labels"].tolist() == [0, 1, 2, 0]
    with Image.open(tmp_path / "generated/ddim-2-seed0-digits012-g2.png") as img:
        assert img.mode == "RGB" and img.width == 3 * (3 * 18 + 2)  # one class per column, upscaled 3 times
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*common, "--digit", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines()[-1].endswith(
        "--digit: got 3, allowed: a class name ('circle', 'square', 'triangle') or an index 0..2"
    ), err
