"""dvc.yaml lists, for every stage, each project file the stage's script imports, directly or through the library:
a change to an unlisted file would leave stale outputs that `dvc status` calls up to date."""

import sys
from pathlib import Path

import pytest
import yaml

from scratch_diffusion.identity import source_files
from tests.conftest import REPO, run

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_files(script: Path) -> set[str]:
    """The script and every project source file it reaches by imports (the walk that a run's identity uses)."""
    return {str(p.relative_to(REPO)) for p in source_files([script])}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency(stage):
    spec = STAGES[stage]
    script = REPO / spec["cmd"].split()[-1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(f for f in imported_files(script) if not covered(f))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} without listing them in its deps"


def test_the_import_walk_follows_the_library():
    # train-unet2d reaches models/unet2d.py only through the library (recipe -> models): the walk must see it.
    files = imported_files(REPO / "stages/train_unet2d.py")
    assert {"src/scratch_diffusion/models/unet2d.py", "src/scratch_diffusion/hardware.py"} <= files
    assert "src/scratch_diffusion/recipe.py" in files and "stages/train_unet2d.py" in files


def test_the_judge_does_not_depend_on_the_training_seed():
    """`dvc exp run -S seed=1` retrains the diffusion models, never the classifier that measures them."""
    spec = STAGES["train-classifier"]
    assert "seed" not in spec["params"], "train-classifier lists the training seed: -S seed=... would retrain the judge"
    assert "params.seed" not in (REPO / "stages/train_classifier.py").read_text()
    judged_by = {s for s, spec in STAGES.items() if "seed" in spec.get("params", [])}
    assert {"train-basic", "train-unet2d"} <= judged_by


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_imports_its_checkouts_library_first(stage):
    """A queued or --temp experiment runs in a copy of the repository: its stages must run the copy's src/ (which
    DVC hashed), not the workspace that an editable install points at."""
    script = REPO / STAGES[stage]["cmd"].split()[-1]
    lines = script.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("from scratch_diffusion"))
    assert any(line.startswith("import _src") for line in lines[:first]), f"{script.name} imports the library first"
    assert "stages/_src.py" in STAGES[stage]["deps"], f"dvc.yaml: stage {stage} does not list stages/_src.py"


def test_a_stage_runs_the_code_of_the_checkout_it_runs_in(tmp_path):
    """The copy's library, edited after the copy was made, is what its stage imports (the workspace's is not)."""
    import shutil

    copy = tmp_path / "copy"
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, copy / name)
    shutil.copy(REPO / "pyproject.toml", copy)
    marker = copy / "src/scratch_diffusion/__init__.py"
    marker.write_text(marker.read_text() + "\nprint('the copy\\'s library', flush=True)\n")
    probe = "import _src, scratch_diffusion; print(scratch_diffusion.__file__)"
    out = run([sys.executable, "-c", probe], cwd=copy / "stages").stdout
    assert out.splitlines() == ["the copy's library", str(marker)], out


def test_a_stage_run_by_an_interpreter_without_the_dependencies_is_one_line(tmp_path):
    """`python` on PATH is not the project's (no environment activated): one line naming what is missing and the way
    to run it, exit 2, before any import of the library; not a ModuleNotFoundError traceback."""
    import shutil

    for name in ("stages", "src", "pyproject.toml"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    bare = run([sys.executable, "-S", "stages/check_params.py"], cwd=tmp_path, check=False)  # -S: no site-packages
    assert bare.returncode == 2 and bare.stdout == "", bare
    (line,) = bare.stderr.splitlines()
    assert line.startswith(f"error: {sys.executable} lacks torch, torchvision, diffusers,") and "bash .ci/setup" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml", "src", "stages"]  # nothing written
