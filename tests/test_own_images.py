"""End to end on the user's own pictures: `dvc repro` on a labelled 32 x 32 RGB folder (coloured shapes of three
classes, made here), then a changed image, which DVC and the training stages see."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_project, make_shapes, run, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, mnist_raw):
    base = tmp_path_factory.mktemp("own")
    shapes = make_shapes(base / "shapes", per_class=24)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        project = make_project(base / "project", mnist_raw)
        # As a user would: -S data.dataset=folder -S data.source=PATH -S data.resolution=32 -S data.channels=3.
        write_params(
            project,
            {
                "data": {"dataset": "folder", "source": str(shapes), "resolution": 32, "channels": 3, "n_train": 0},
                "classifier": {"batch_size": 16, "max_steps": 20},
                "sample": {"n": 3},
            },
        )
        yield project, shapes, run(["dvc", "repro"], cwd=project).stdout


def test_every_stage_runs_at_the_folders_shape(reproduced):
    project, _, out = reproduced
    manifest = json.loads((project / "data/dataset/manifest.json").read_text())
    assert manifest["classes"] == ["circle", "square", "triangle"] and len(manifest["images"]) == 72
    for name in ("basic/toy-3", "unet2d/ddim-3", "unet2d/heun-2", "unet2d/dpmsolver++-3"):
        images = np.load(project / f"samples/{name}.npz")["images"]
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8, name
    for png in ("plots/train_unet2d/samples.png", "plots/sample/unet2d-heun-2.png", "plots/train_basic/samples.png"):
        assert Image.open(project / png).mode == "RGB", png
    judge = json.loads((project / "metrics/classifier.json").read_text())
    assert 0 <= judge["test_accuracy"] <= 1
    compare = json.loads((project / "metrics/compare.json").read_text())
    assert np.isfinite(compare["best_fid_unet2d"])
    report = (project / "reports/compare.md").read_text()
    # The judge's accuracy, so that a reader knows how far to trust the FIDs.
    assert f"test accuracy {judge['test_accuracy']:.2%}" in report


def test_plain_diffusers_draws_rgb_images_of_the_trained_resolution(reproduced):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(reproduced[0] / "models/unet2d")
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_a_changed_image_reruns_download_and_training(reproduced):
    project, shapes, _ = reproduced
    before = (project / "models/unet2d/unet/diffusion_pytorch_model.safetensors").read_bytes()
    Image.new("RGB", (40, 48), (250, 10, 10)).save(shapes / "square" / "0005.png")
    out = run(["dvc", "repro", "train-unet2d"], cwd=project).stdout
    assert "Running stage 'download'" in out and "Running stage 'train-unet2d'" in out, out
    after = (project / "models/unet2d/unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert after != before
