"""MLflow: where the store is, one run per stage, tags that link runs to DVC experiments and git commits.

The default store is SQLite `mlflow.db` at the repository root, as an absolute URI: `dvc exp run --temp` and
`--queue` run stages inside a copy under `.dvc/tmp/exps/`, and a relative URI would put their runs in a
database inside that copy, deleted with it. `MLFLOW_TRACKING_URI` overrides the default.
Only the main process logs; all calls here assume that.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

_EXPS_TMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
# Never let a credential reach a tag or a param, whatever the caller passes in.
_SECRET = re.compile(r"(PASSWORD|SECRET|TOKEN|AWS_|CREDENTIAL|API_KEY)", re.IGNORECASE)


def repo_root(start: str | Path | None = None) -> Path:
    """The DVC repository this process works in; for a temp/queued experiment, the repository it came from."""
    here = Path(start or os.getcwd()).resolve()
    s = str(here) + os.sep
    if _EXPS_TMP in s:
        return Path(s.split(_EXPS_TMP)[0])
    for p in (here, *here.parents):
        if (p / ".dvc").is_dir() or (p / "dvc.yaml").is_file():
            return p
    return here


def tracking_uri(start: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(start) / 'mlflow.db'}"


def _set_experiment(name: str, local_store: bool) -> None:
    """Select (or create) the experiment. With the default local store, artifacts go to `<repo>/mlartifacts`:
    MLflow's own default is relative to the working directory, which for a temp experiment is deleted."""
    import mlflow

    if local_store and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=(repo_root() / "mlartifacts").as_uri())
        except Exception as e:  # another process created it first
            if "already exists" not in str(e).lower() and "unique" not in str(e).lower():
                raise
    mlflow.set_experiment(name)


def ensure_store(uri: str) -> None:
    """Open a SQLite store once under an exclusive file lock (`<db>-lock`): MLflow creates or migrates the schema on
    a process's first call, and two processes doing that at once on a fresh store (`dvc queue start -j 2`) collide
    ('duplicate column', alembic errors). Later opens find the schema in place."""
    if not uri.startswith("sqlite:///"):
        return
    import mlflow

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as MLflow itself
        fcntl = None
    with open(f"{db}-lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _with_retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer: parallel queued experiments can hit 'database is locked'. Back off and retry."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.25 * 2**i)


def _clean(d: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in d.items() if not _SECRET.search(k)}


def check_reachable(uri: str) -> None:
    """Fail in seconds, before any work, when a remote store does not answer (MLflow itself retries for minutes).
    Credentials in the URI (user:password@) go in an Authorization header, as MLflow sends them; the message shows
    the URI without them."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    shown = parts._replace(netloc=netloc).geturl()
    health = parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health", query="", fragment="")
    request = urllib.request.Request(health.geturl())
    if parts.username is not None:
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError:
        return  # it answered: a server that lacks /health or wants other credentials is still there
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(
            f"MLFLOW_TRACKING_URI={shown}: the tracking server does not answer ({e}); "
            "start it, fix the URI, or unset it to use ./mlflow.db"
        ) from None


def last_logged_step(run_id: str, key: str = "loss") -> int:
    """The highest step of `key` in a run (-1 if none): a resumed run logs only what comes after it."""
    import mlflow

    history = _with_retry(mlflow.MlflowClient().get_metric_history, run_id, key)
    return max((m.step for m in history), default=-1)


@contextmanager
def start_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any], resume_run_id: str | None = None
) -> Iterator:
    """Open one MLflow run with the flattened params and the standard tags; yields the active run.

    With `resume_run_id` (training resumed from a checkpoint), that run is continued if the store has it;
    otherwise a new run is tagged `resumed_from_run`.
    """
    import mlflow

    # Decide before set_tracking_uri: MLflow exports the URI it is given to MLFLOW_TRACKING_URI.
    local_store = "MLFLOW_TRACKING_URI" not in os.environ
    check_reachable(tracking_uri())
    ensure_store(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    _with_retry(_set_experiment, experiment, local_store)
    all_tags = {
        "git_commit": git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": os.environ.get("DVC_STAGE", run_name),
        **tags,
    }
    run = None
    if resume_run_id:
        try:
            mlflow.MlflowClient().get_run(resume_run_id)
            run = _with_retry(mlflow.start_run, run_id=resume_run_id, tags=_clean(all_tags))
        except Exception:  # not in this store (another URI, deleted): start a new run, linked by a tag
            all_tags["resumed_from_run"] = resume_run_id
    if run is None:
        run = _with_retry(mlflow.start_run, run_name=run_name, tags=_clean(all_tags))
    try:
        _with_retry(mlflow.log_params, _clean(params))
        yield run
    except BaseException as e:
        mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    else:
        _with_retry(mlflow.end_run)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    _with_retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_image(picture: np.ndarray, key: str, step: int, caption: str | None = None) -> None:
    """A uint8 grid under `key` at `step`, upscaled and captioned (default: the step) so that the MLflow UI, which
    shows a slider over steps, shows the digits whole and readable."""
    import mlflow

    from scratch_diffusion.images import captioned

    _with_retry(mlflow.log_image, captioned(picture, caption or f"{key}, step {step}"), key=key, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    _with_retry(mlflow.log_artifact, str(path), artifact_path=artifact_path)


def pip_requirements() -> list[str]:
    """Explicit requirements: MLflow's inference of them wants network access and a version check. What unpickling
    a logged model imports: torch, and diffusers through the package source shipped with it (models/)."""
    import importlib.metadata as md

    return [f"{pkg}=={md.version(pkg)}" for pkg in ("torch", "diffusers", "numpy", "safetensors")]


def log_torch_model(
    model,
    name: str = "model",
    registered_name: str | None = None,
    tags: Mapping | None = None,
    extra_files: list[str | Path] | None = None,
):
    """Log a torch module with the package source shipped alongside, so loading needs no install of ours."""
    import mlflow

    package_dir = Path(__file__).resolve().parent
    info = _with_retry(
        mlflow.pytorch.log_model,
        pytorch_model=model,
        name=name,
        pip_requirements=pip_requirements(),
        code_paths=[str(package_dir)],
        # pickle (with our source in code_paths) rather than pt2 export: export needs example inputs and
        # cannot trace every model we log; load_model gives back the same nn.Module.
        serialization_format="pickle",
        # e.g. the scheduler config and metadata a sampler needs, so a registry URI alone can generate images
        extra_files=[str(f) for f in extra_files or []] or None,
        registered_model_name=registered_name,
        tags=_clean(tags or {}),
    )
    if registered_name and tags:
        # The registry shows version tags, not the logged model's: copy the params there too.
        client = mlflow.MlflowClient()
        for k, v in _clean(tags).items():
            _with_retry(client.set_model_version_tag, registered_name, info.registered_model_version, k, v)
    return info


CHAMPION = "champion"


def promote_champion(name: str, version: str, fid: float, n: int) -> bool:
    """Point the registry alias `champion` at this version when its FID beats the champion's, measured at the same
    sample count n (FID depends on n, so other counts never compare); records both as version tags. True if moved.
    `models:/<name>@champion` then always names the best model compare has seen, without looking up a version."""
    import mlflow

    client = mlflow.MlflowClient()
    _with_retry(client.set_model_version_tag, name, version, "compare.fid", f"{fid:.4f}")
    _with_retry(client.set_model_version_tag, name, version, "compare.n", str(n))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        current = None
    if current is not None and str(current.version) != str(version):
        held_n, held_fid = current.tags.get("compare.n"), current.tags.get("compare.fid")
        if held_fid is not None and (held_n != str(n) or float(held_fid) <= fid):
            return False  # the champion measured as good or better, or at another n (FIDs across n never compare)
    _with_retry(client.set_registered_model_alias, name, CHAMPION, version)
    return True
