"""A finished training's checkpoint is never handed back for other inputs: a code edit or other data retrains."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run, run_in_process, write_params

# A completed training leaves its final checkpoint behind. Whatever else changes, a
# code edit or other data, the rerun must train anew, never hand back the old model.
STAGES = {
    "basic": ("stages/train_basic.py", "models/basic/model.safetensors", "train-basic"),
    "unet2d": ("stages/train_unet2d.py", "models/unet2d/unet/diffusion_pytorch_model.safetensors", "train-unet2d"),
}
SHORT = {
    "basic": {"max_steps": 6, "checkpoint_every": 3, "sample_every": 0, "log_every": 2},
    "unet2d": {"max_steps": 4, "checkpoint_every": 2, "sample_every": 0},
    "mlflow": {"log_model": False},
}


def _train(project, network, store, env=None):
    script, _, _ = STAGES[network]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", **(env or {})}
    return run([sys.executable, script], cwd=project, env=env).stdout


def _markers(project, network):
    folder = project / "checkpoints" / STAGES[network][2]
    return [json.loads(m.read_text()) for m in sorted(folder.glob("*/step-*/complete.json"))]


@pytest.mark.parametrize("network", ["basic", "unet2d"])
def test_a_code_edit_that_changes_training_retrains(project, tmp_path, network):
    """The issue's case: the loss multiplied by 0 after a completed run. The project's own src/ is imported (as in a
    clone), the edit is seen, the run starts fresh and saves other weights, and no checkpoint of the old code stays."""
    write_params(project, SHORT)
    assert run_in_process([sys.executable, "stages/download.py"], cwd=project).returncode == 0
    env = {"PYTHONPATH": str(project / "src")}
    _train(project, network, tmp_path / "a.db", env)
    before = load_file(project / STAGES[network][1])
    old = {json.dumps(m["identity"], sort_keys=True) for m in _markers(project, network)}
    assert len(old) == 1

    objectives = project / "src/scratch_diffusion/objectives.py"
    loss = "return F.mse_loss(model(x_t, amount)" if network == "basic" else "return per_img.mean()"
    assert objectives.read_text().count(loss) == 1
    objectives.write_text(objectives.read_text().replace(loss, loss.replace("return ", "return 0 * ")))
    out = _train(project, network, tmp_path / "a.db", env)

    assert "checkpoints of other inputs (objectives.py changed): starting fresh, cleared" in out, out
    assert "resumed from" not in out
    after = load_file(project / STAGES[network][1])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    new = {json.dumps(m["identity"], sort_keys=True) for m in _markers(project, network)}
    assert len(new) == 1 and new != old  # only the new run's checkpoints remain


def test_other_data_under_another_name_retrains(project, tmp_path, mnist_raw, network="basic"):
    """`-S data.dataset=fashion_mnist` (here from a local folder of other images, as there is no network): the
    download stage writes other bytes, the training stage sees them and starts fresh. One network: the data's part
    of a run's identity is the same for both (recipe.training_identity), while a code edit reaches each network
    through its own loss, above."""
    from scratch_diffusion.data import FILES, read_idx, write_idx

    write_params(project, SHORT)
    assert run_in_process([sys.executable, "stages/download.py"], cwd=project).returncode == 0
    _train(project, network, tmp_path / "a.db")
    before = load_file(project / STAGES[network][1])

    other = tmp_path / "other-images"
    other.mkdir()
    for key, name in FILES.items():
        array = read_idx((mnist_raw / name).read_bytes(), name)
        write_idx(other / name, 255 - array if key.endswith("images") else array)  # negatives, as other pictures
    write_params(project, {"data": {"dataset": "fashion_mnist", "source": str(other)}})
    assert run_in_process([sys.executable, "stages/download.py"], cwd=project).returncode == 0
    out = _train(project, network, tmp_path / "a.db")

    assert "checkpoints of other inputs (the data changed): starting fresh, cleared" in out, out
    after = load_file(project / STAGES[network][1])
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len({json.dumps(m["identity"], sort_keys=True) for m in _markers(project, network)}) == 1
