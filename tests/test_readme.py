"""The README's commands run as written: blocks marked `<!-- runnable -->` are executed in a fresh copy of the
project, every `dvc exp run -S key=value` it shows is a valid override, and the error it quotes is the real one."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from scratch_diffusion.config import ParamsError, params_from_dict
from tests.conftest import REPO, run

README = (REPO / "README.md").read_text()
FENCE = re.compile(r"(?P<mark><!-- runnable -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(lang: str = "bash", runnable: bool | None = None) -> list[str]:
    out = []
    for m in FENCE.finditer(README):
        if m["lang"] == lang and (runnable is None or bool(m["mark"]) == runnable):
            out.append(m["body"])
    return out


def commands(body: str) -> list[str]:
    """One command per logical line (backslash continuations joined); bash drops the `# comments` itself."""
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def overrides(body: str) -> list[list[str]]:
    """The `-S key=value` arguments of each `dvc exp run` in a block."""
    out = []
    for line in commands(body):
        words = shlex.split(line, comments=True)
        while words:
            cmd, words = (words[: words.index("&&")], words[words.index("&&") + 1 :]) if "&&" in words else (words, [])
            if cmd[:3] == ["dvc", "exp", "run"]:
                found = [cmd[i + 1] for i, w in enumerate(cmd) if w == "-S"]
                if "--queue" in cmd:  # `-S key=a,b,c` queues one experiment per value (DVC's grid syntax)
                    for i, a in enumerate(found):
                        key, _, values = a.partition("=")
                        if "," in values and not values.startswith("["):
                            out += [[*found[:i], f"{key}={v}", *found[i + 1 :]] for v in values.split(",")]
                            break
                    else:
                        out.append(found)
                else:
                    out.append(found)
    return out


def apply(params: dict, assignment: str) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml: the value is parsed as YAML."""
    key, _, value = assignment.partition("=")
    node = params
    *parents, leaf = key.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = yaml.safe_load(value)
    return params


def test_some_blocks_are_marked_runnable():
    runnable = blocks(runnable=True)
    assert runnable, "mark the cheap command blocks with <!-- runnable -->"
    joined = "\n".join(runnable)
    for cmd in ("dvc dag", "dvc exp show", "scratch-diffusion generate --help"):
        assert cmd in joined


@pytest.mark.slow
def test_runnable_blocks_run_as_written(project):
    env = {"PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    for body in blocks(runnable=True):
        for cmd in commands(body):
            proc = run(["bash", "-c", cmd], cwd=project, env=env, check=False)
            assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            assert proc.stdout.strip(), f"README command printed nothing: {cmd}"


def test_every_experiment_override_in_the_readme_is_valid(tmp_path):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    found = [o for body in blocks() for o in overrides(body) if o]
    assert len(found) >= 4
    own_images = str(tmp_path)  # the README's placeholder for the user's folder: a folder that exists
    for assignments in found:
        params = yaml.safe_load(yaml.safe_dump(base))
        for a in assignments:
            apply(params, a.replace("/path/to/images", own_images))
        params_from_dict(params)  # raises ParamsError naming the key if the README has drifted from params.yaml


def test_the_quoted_error_is_the_real_one():
    quoted = re.search(r"\$ dvc exp run -S (\S+)\nerror: (.*)\n", README)
    assert quoted, "the README quotes a bad override and its error"
    params = apply(yaml.safe_load((REPO / "params.yaml").read_text()), quoted[1])
    with pytest.raises(ParamsError) as err:
        params_from_dict(params)
    assert str(err.value) == quoted[2]
