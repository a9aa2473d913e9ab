"""dvc.yaml lists, for every stage, each project file the stage's script imports, directly or through the library:
a change to an unlisted file would leave stale outputs that `dvc status` calls up to date."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def project_modules(path: Path) -> set[str]:
    """The scratch_diffusion modules `path` imports anywhere in it (function-level imports too: they run when the
    function does), with their parent packages."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "scratch_diffusion":
            out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def module_file(module: str) -> Path | None:
    base = REPO / "src" / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module (a function or class), not a module itself


def imported_files(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for m in project_modules(path) if (f := module_file(m)) is not None]
    return {str(p.relative_to(REPO)) for p in seen}


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
