"""A model folder whose files disagree with each other or with its scratch_diffusion.json is refused in one line
naming the file and what disagrees, by the one loader behind generate, the sample stage and the registry model;
diffusers alone would warn (weights its config has no place for) or draw wrong images without a word."""

import json

import pytest

from scratch_diffusion import recipe, serving
from scratch_diffusion.config import params_from_dict
from scratch_diffusion.data import DatasetInfo
from scratch_diffusion.model_files import META, ModelFileError, load_unet2d, save_unet2d

ATTENTION = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    params = params_from_dict(
        {
            "data": {"dataset": "folder", "source": "/", "resolution": 16, "channels": 3},
            "unet2d": {**ATTENTION, "class_conditional": True},
        }
    )
    info = DatasetInfo("folder", 16, 3, ("a b", "c&d"), 10, 4)
    unet, scheduler, *_ = recipe._parts("unet2d", params, info)
    folder = tmp_path_factory.mktemp("model") / "unet2d"
    save_unet2d(folder, unet, scheduler, {**recipe.unet2d_meta(params), **recipe.dataset_meta(info), "run_id": ""})
    return folder


def _edit(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "file, changes, says",
    [
        (
            "unet/config.json",
            {"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]},
            "unet/config.json: disagrees with diffusion_pytorch_model.safetensors: 50 of its weights have no place "
            "in the network the config builds (first: down_blocks.1.attentions.0.group_norm.bias)",
        ),
        (
            "unet/config.json",
            {"down_block_types": ["AttnDownBlock2D"] * 2, "up_block_types": ["AttnUpBlock2D"] * 2},
            "unet/config.json: disagrees with diffusion_pytorch_model.safetensors: the network the config builds "
            "needs 50 weights it lacks",
        ),
        (
            "scheduler/scheduler_config.json",
            {"prediction_type": "epsilon"},
            "scheduler/scheduler_config.json: prediction_type 'epsilon', but scratch_diffusion.json says objective "
            "'x0' (prediction_type 'sample'); sampled with it, every image would be wrong",
        ),
        (META, {"channels": 1}, "unet/config.json: in_channels 3, but scratch_diffusion.json says channels 1"),
        (META, {"resolution": 32}, "unet/config.json: sample_size 16, but scratch_diffusion.json says resolution 32"),
        (
            META,
            {"classes": ["a b", "c&d", "e"]},
            "unet/config.json: num_class_embeds 3, but scratch_diffusion.json says class_conditional true with 3 "
            "classes (allowed: 4)",
        ),
        (
            META,
            {"class_conditional": False},
            "unet/config.json: num_class_embeds 3, but scratch_diffusion.json says class_conditional false",
        ),
    ],
)
def test_files_that_disagree_are_refused_in_one_line_naming_the_file(saved, tmp_path, capfd, file, changes, says):
    import shutil

    folder = shutil.copytree(saved, tmp_path / "unet2d")
    load_unet2d(folder)  # as saved: one model
    _edit(folder / file, **changes)
    capfd.readouterr()
    for load in (load_unet2d, lambda f: serving.load(f, "cpu", "unet2d")):  # generate, sample, the registry model
        with pytest.raises(ModelFileError) as e:
            load(folder)
        assert str(e.value).startswith(f"{folder}/{says}") and "\n" not in str(e.value), str(e.value)
    assert "Some weights" not in capfd.readouterr().err  # diffusers' own list of names is not printed
