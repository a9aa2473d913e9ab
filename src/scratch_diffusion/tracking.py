"""MLflow: where the store is, one run per stage, tags that link runs to DVC experiments and git commits.

The default store is SQLite `mlflow.db` at the repository root, as an absolute URI: `dvc exp run --temp` and
`--queue` run stages inside a copy under `.dvc/tmp/exps/`, and a relative URI would put their runs in a
database inside that copy, deleted with it. `MLFLOW_TRACKING_URI` overrides the default.
Only the main process logs; all calls here assume that.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

_EXPS_TMP = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
# Never let a credential reach a tag or a param, whatever the caller passes in.
_SECRET = re.compile(r"(PASSWORD|SECRET|TOKEN|AWS_|CREDENTIAL|API_KEY)", re.IGNORECASE)
# The user:password@ (or token@) of a URL inside any text.
_USERINFO = re.compile(r"(?<=://)[^\s/?#@]+@")
# Database stores MLflow can use directly, and their servers' default ports: probed like a tracking server.
_DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


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
    """The store's URI as given, credentials included: print it only through shown_uri()."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(start) / 'mlflow.db'}"


def _without_userinfo(uri: str) -> str:
    netloc = urllib.parse.urlsplit(uri).netloc
    # String edits, not urlunsplit: that would rewrite sqlite:////abs/path.
    return uri.replace(f"//{netloc}", f"//{netloc.rpartition('@')[2]}", 1) if "@" in netloc else uri


def shown_uri(uri: str) -> str:
    """`uri` as a message, a log line or a tag may show it: without user:password@ (or a token in its place) and with
    every query value masked (`?token=***`). A string that is not a URL comes back as it is."""
    query = urllib.parse.urlsplit(uri).query
    uri = _without_userinfo(uri)
    if query:
        masked = "&".join(f"{k}=***" for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True))
        uri = uri.replace(f"?{query}", f"?{masked}", 1)
    return uri


def scrubbed(text: str) -> str:
    """`text` with the user:password@ of every URL in it removed."""
    return _USERINFO.sub("", text)


def _credentials(uri: str) -> tuple[str, str | None, str | None]:
    """For a tracking server's URI: (the URI without user:password@, the Basic-auth user and password MLflow sends to
    it), the URI's own (they win, as `requests` lets them) or else MLFLOW_TRACKING_USERNAME / _PASSWORD."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    user, password = (urllib.parse.unquote(v or "") for v in (parts.username, parts.password))
    return _without_userinfo(uri), user, password


def _move_credentials(uri: str) -> str:
    """Credentials in a tracking server's URI moved to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which
    MLflow sends as the same Basic Authorization header; returns the URI without them. Given that URI, MLflow never
    holds them in a URL, so none of its own messages (the '🏃 View run ... at: <url>' line on every end_run, 'API
    request to <url> failed') can print them; child processes inherit them the same way. A database URI keeps its
    password: its driver masks it."""
    bare, user, password = _credentials(uri)
    if bare != uri:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
        if password or "MLFLOW_TRACKING_PASSWORD" not in os.environ:  # a user alone keeps the password already set
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return bare


def no_progress_bars() -> None:
    """A stage's output says what it did: no progress bar per artifact downloaded (generate, logging a model)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def connect() -> str:
    """Point MLflow at the tracking store once it answers and takes our credentials; returns the URI MLflow now holds
    (credentials moved out of it: see _move_credentials)."""
    import mlflow

    no_progress_bars()
    uri = tracking_uri()
    check_reachable(uri)
    bare = _move_credentials(uri)
    ensure_store(bare)
    mlflow.set_tracking_uri(bare)
    return bare


def _set_experiment(name: str, local_store: bool) -> None:
    """Select (or create) the experiment. With the default local store, artifacts go to `<repo>/mlartifacts`:
    MLflow's own default is relative to the working directory, which for a temp experiment is deleted."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    _refuse_deleted(found, local_store)
    if local_store and found is None:
        try:
            mlflow.create_experiment(name, artifact_location=(repo_root() / "mlartifacts").as_uri())
        except Exception as e:  # another process created it first
            if "already exists" not in str(e).lower() and "unique" not in str(e).lower():
                raise
    experiment = mlflow.set_experiment(name)
    # The MLflow UI lays an experiment out by its kind (model training or a GenAI app): say which this one is.
    if experiment.tags.get(_EXPERIMENT_KIND) != "custom_model_development":
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, _EXPERIMENT_KIND, "custom_model_development")


_EXPERIMENT_KIND = "mlflow.experimentKind"


def _refuse_deleted(experiment, local_store: bool) -> None:
    """An experiment deleted in the MLflow UI keeps its name (until `mlflow gc`), and MLflow refuses to log into it
    with a traceback; say so in one line, with the way back."""
    if experiment is None or experiment.lifecycle_stage != "deleted":
        return
    from scratch_diffusion.stage import StageError

    # The CLI's own default store is ./mlflow.db in the working directory: name ours (a path, no secret in it).
    # A remote store is the one MLFLOW_TRACKING_URI already names.
    env = f"MLFLOW_TRACKING_URI={tracking_uri()} " if local_store else ""
    raise StageError(
        f"mlflow.experiment {experiment.name!r} is deleted in the MLflow store (experiment id "
        f"{experiment.experiment_id}): restore it (MLflow UI, or `{env}mlflow experiments restore --experiment-id "
        f"{experiment.experiment_id}`), or set another `mlflow.experiment` in params.yaml"
    )


def check_experiment(name: str) -> None:
    """Fail before any work, in one line, when the store cannot take this experiment's runs: a remote store that
    does not answer, or the experiment deleted in the UI. Creates nothing: a local store not made yet is fine."""
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    uri = _move_credentials(uri)  # MLflow never holds a password in a URL it may print
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    ensure_store(uri)
    found = with_retry(mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name, name)
    _refuse_deleted(found, "MLFLOW_TRACKING_URI" not in os.environ)


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
        if db.resolve() == (repo_root() / "mlflow.db").resolve():
            _follow_the_project(db)


# Where MLflow keeps absolute artifact paths (file:// URIs, or a bare path for the Default experiment): they name the
# project folder the store was made in.
_PATH_COLUMNS = {
    "experiments": ("artifact_location",),
    "runs": ("artifact_uri",),
    "logged_models": ("artifact_location",),
    "model_versions": ("source", "storage_location"),
}


def _follow_the_project(db: Path) -> None:
    """The project's own store (<repo>/mlflow.db) after the project folder was moved or copied: MLflow recorded every
    artifact path under the folder the store was made in, so each registry version would be `No such artifact`
    and the next run would log into the old folder. Rewrite the paths under that folder to this one, once, and say
    so in one line. Paths outside the old project folder (a team server's, an artifact store's) are left as they
    are. Runs under ensure_store's lock, before this process uses the store."""
    import sqlite3

    root = db.resolve().parent
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        # The folders our experiments were made in: <project>/mlartifacts (tracking._set_experiment).
        old = {
            Path(urllib.parse.unquote(urllib.parse.urlsplit(loc).path)).parent
            for (loc,) in rows
            if loc and loc.startswith("file://") and loc.rstrip("/").endswith("/mlartifacts")
        } - {root}
        if not old:
            return
        changed = 0
        with con:
            for before in sorted(old):
                pairs = [(before.as_uri() + "/", root.as_uri() + "/"), (f"{before}/", f"{root}/")]
                for table, columns in _PATH_COLUMNS.items():
                    present = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                    for column in (c for c in columns if c in present):
                        prefix = f"UPDATE {table} SET {column} = ? || substr({column}, ?)"
                        for was, now in pairs:
                            changed += con.execute(
                                f"{prefix} WHERE substr({column}, 1, ?) = ?", (now, len(was) + 1, len(was), was)
                            ).rowcount
    moved = ", ".join(map(str, sorted(old)))
    print(
        f"mlflow.db: the project was made in {moved}; {changed} artifact paths now point into {root}", file=sys.stderr
    )


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def with_retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer: parallel queued experiments can hit 'database is locked'. Back off and retry."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # mlflow wraps sqlalchemy's OperationalError in MlflowException
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.25 * 2**i)


def clean(d: Mapping[str, Any]) -> dict[str, str]:
    return {k: scrubbed(str(v)) for k, v in d.items() if not _SECRET.search(k)}


def _connects(host: str, port: int, shown: str, what: str = "tracking server") -> None:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise ConnectionError(
            f"MLFLOW_TRACKING_URI={shown}: the {what} does not answer ({e}); "
            "start it, fix the URI, or unset it to use ./mlflow.db"
        ) from None


def check_reachable(uri: str) -> None:
    """Fail in seconds, before any work, in one line without the password, when a remote store does not answer (MLflow
    itself retries for minutes) or refuses our credentials (MLflow would end in a traceback).

    A tracking server is asked what any stage asks first, to search experiments, with the credentials MLflow will
    send: the API, unlike /health, wants them where the server has auth (`mlflow server --app-name basic-auth`).
    Any answer but 401/403 counts as there: a 404 or 5xx is MLflow's to report. A database store is probed with a
    TCP connection to its server."""
    import base64
    import urllib.error
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    shown = shown_uri(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg://
    if scheme in _DATABASE_PORTS and parts.hostname:
        _connects(parts.hostname, parts.port or _DATABASE_PORTS[scheme], shown, "database server")
    if scheme not in ("http", "https"):
        return
    if parts.query:
        raise ConnectionError(
            f"MLFLOW_TRACKING_URI={shown}: MLflow appends its API paths to the URI, so a query string breaks every "
            "call; give a token as MLFLOW_TRACKING_TOKEN, or user and password as MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    if parts.hostname:
        _connects(parts.hostname, parts.port or (443 if scheme == "https" else 80), shown)
    bare, user, password = _credentials(uri)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    request = urllib.request.Request(bare.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user and password:  # as MLflow: Basic with both, else a bearer token, else nothing
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        # It took the connection: a server that hashes passwords on 2 busy cores may take seconds to answer.
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            return
        sent = f"user {user!r}" if user and password else "the token" if token else "a request without credentials"
        permission = " or ask its admin for permission," if e.code == 403 else ""
        raise ConnectionError(
            f"MLFLOW_TRACKING_URI={shown}: the tracking server refused {sent} ({e.code} {e.reason});{permission} set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or put user:password@ in the URI"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(
            f"MLFLOW_TRACKING_URI={shown}: the tracking server does not answer ({e}); "
            "start it, fix the URI, or unset it to use ./mlflow.db"
        ) from None


def last_logged_step(run_id: str, key: str = "loss") -> int:
    """The highest step of `key` in a run (-1 if none): a resumed run logs only what comes after it."""
    import mlflow

    history = with_retry(mlflow.MlflowClient().get_metric_history, run_id, key)
    return max((m.step for m in history), default=-1)


@contextmanager
def start_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any], resume_run_id: str | None = None
) -> Iterator:
    """Open one MLflow run with the flattened params and the standard tags; yields the active run.

    With `resume_run_id` (training resumed from a checkpoint), that run is continued if the store has it;
    otherwise a new run is tagged `resumed_from_run`. An experiment deleted in the UI is a StageError, one line.
    """
    import mlflow

    # Decide before set_tracking_uri: MLflow exports the URI it is given to MLFLOW_TRACKING_URI.
    local_store = "MLFLOW_TRACKING_URI" not in os.environ
    connect()
    with_retry(_set_experiment, experiment, local_store)
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
            run = with_retry(mlflow.start_run, run_id=resume_run_id, tags=clean(all_tags))
        except Exception:  # not in this store (another URI, deleted): start a new run, linked by a tag
            all_tags["resumed_from_run"] = resume_run_id
    logged = clean(params)
    if run is None:
        run = with_retry(mlflow.start_run, run_name=run_name, tags=clean(all_tags))
    else:
        # A continued run keeps the params it started with (MLflow refuses a changed value): the checkpoint's
        # identity holds the training's own equal; how `auto` was resolved may differ (timed then, cached now).
        logged = {k: v for k, v in logged.items() if k not in run.data.params}
    try:
        with_retry(mlflow.log_params, logged)
        yield run
    except BaseException as e:
        mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    else:
        with_retry(mlflow.end_run)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    with_retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_image(picture: np.ndarray, key: str, step: int, caption: str | None = None) -> None:
    """A uint8 grid under `key` at `step`, upscaled and captioned (default: the step) so that the MLflow UI, which
    shows a slider over steps, shows the digits whole and readable."""
    import mlflow

    from scratch_diffusion.images import captioned

    with_retry(mlflow.log_image, captioned(picture, caption or f"{key}, step {step}"), key=key, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    with_retry(mlflow.log_artifact, str(path), artifact_path=artifact_path)


CHAMPION = "champion"
# A judge is the classifier whose features FID uses. One whose own test accuracy is below this has not learned what
# sets the digits apart, so its features barely tell any two image sets apart: a 2-step classifier (accuracy 0.11)
# gave a 2-step diffusion model an FID of 0.02. The pipeline's classifier reaches 0.99 on MNIST (0.81 after only 20
# steps, 0.95 after 60). Small CNNs reach about 0.9 on Fashion-MNIST: there, more `classifier.epochs` may be needed.
MIN_JUDGE_ACCURACY = 0.9
# What makes one FID scale: the classifier's weights, the reference images (the first n test images of the dataset,
# named by its digest) and n. FIDs measured with different values of any of them never compare.
JUDGE_TAGS = {"classifier": "compare.judge.classifier", "reference": "compare.judge.reference", "n": "compare.n"}
# The scale a champion is decided at, stated once (promote_champion prints it where it applies): a quick try (the
# README's smoke run: a small n, a judge trained briefly) must never take the alias from, or leave it before, the
# default pipeline's judge.
SCALE_RULE = (
    "the champion is decided at the default pipeline's scale or above (n and the judge's training images at least "
    "what params.yaml's defaults give on this data): a smaller measurement records its FID but never holds the "
    "alias, and a judge at that scale supersedes a smaller one"
)
JUDGE_IMAGES_TAG = "compare.judge.images"


@contextmanager
def _champion_lock() -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (`<db>-champion-lock`), over the whole read-decide-move of
    the alias: two compares finishing at once (two queue workers) would otherwise each move it on what they read.
    A remote store has no lock to take; promote_champion re-reads after each move instead."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    with open(f"{uri.removeprefix('sqlite:///')}-champion-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _judge_of(version) -> tuple[str, ...] | None:
    """The judge a version was measured by, or None (unmeasured, or measured before judges were recorded)."""
    judge = tuple(version.tags.get(tag) for tag in JUDGE_TAGS.values())
    return None if None in judge or "compare.fid" not in version.tags else judge


def _fid_line(version) -> str:
    t = version.tags
    if "compare.fid_lo" in t and "compare.fid_hi" in t:
        return f"FID {float(t['compare.fid']):.2f} [{float(t['compare.fid_lo']):.2f}, {float(t['compare.fid_hi']):.2f}]"
    return f"FID {float(t['compare.fid']):.2f}" if "compare.fid" in t else "no FID recorded"


def promote_champion(
    name: str,
    version: str | int,
    fid: float,
    fid_interval: tuple[float, float],
    judge: Mapping[str, str | int],
    judge_accuracy: float,
    judge_images: int | None = None,
    default_scale: tuple[int, int] | None = None,
    run_id: str | None = None,
) -> str:
    """Record compare's measurement of a registered version and move the alias `champion` to the best version
    measured by the same judge; returns one line saying what happened.

    With `run_id` (the training run that made the model measured, as its run.json says), the version must be that
    run's: a model registered in another store (a clone without its mlflow.db, an experiment's outputs restored
    against a fresh store) names a version this store lacks or holds for another model, and nothing is recorded.

    `judge` names the scale: {"classifier": weights digest, "reference": dataset digest, "n": sample count}
    (JUDGE_TAGS). The version gets the judge, its accuracy and the FID with its 95% interval as tags (the registry
    shows version tags). Then, under a lock:
    - a judge below MIN_JUDGE_ACCURACY records and promotes nothing: its FIDs rank nothing;
    - the champion measured by another judge stays: FIDs on two scales never compare (move the alias by hand to
      adopt the new judge, or re-measure the champion with it: the version then carries the new judge);
    - a champion with no judge recorded (promoted before judges were) is replaced by the best version of this judge;
    - otherwise the alias goes to the lowest FID among the versions measured by this judge (a tie keeps it).
    With `judge_images` (the images the classifier trained on) and `default_scale` (the n and judge images that
    params.yaml's defaults give on this data), SCALE_RULE applies first: a measurement below that scale is recorded
    and promotes nothing, and one at that scale supersedes a champion recorded below it.
    """
    import mlflow

    if set(judge) != set(JUDGE_TAGS):
        raise ValueError(f"judge: got keys {sorted(judge)}, allowed: exactly {sorted(JUDGE_TAGS)}")
    if judge_accuracy < MIN_JUDGE_ACCURACY:
        return (
            f"version {version} not promoted, nothing recorded: the judge's test accuracy {judge_accuracy:.3f} is "
            f"below {MIN_JUDGE_ACCURACY} (its FIDs rank nothing); train the classifier longer (classifier.max_steps)"
        )
    if not all(math.isfinite(v) and v >= 0 for v in (fid, *fid_interval)):  # an FID is a distance: 0 or more
        return (
            f"version {version} not promoted, nothing recorded: its FID {fid} [{fid_interval[0]}, {fid_interval[1]}] "
            "is not a finite number >= 0 (a failed measurement ranks nothing)"
        )
    version, key = str(version), tuple(str(judge[k]) for k in JUDGE_TAGS)
    client = mlflow.MlflowClient()
    if run_id is not None:
        try:
            made_by = with_retry(client.get_model_version, name, version).run_id
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            made_by = None
        if made_by != run_id:
            here = "has none" if made_by is None else f"holds one made by run {made_by}"
            store = shown_uri(mlflow.get_tracking_uri())
            return (
                f"version {version} not promoted, nothing recorded: the model measured is version {version} of "
                f"{name!r} made by run {run_id}, and this store ({store}) {here}: it was "
                "registered in another store (a clone without its mlflow.db, or one moved aside); its FIDs stay in "
                "the report, and `dvc repro -f train-unet2d` registers a model here"
            )
    tags = {
        **{tag: str(judge[k]) for k, tag in JUDGE_TAGS.items()},
        "compare.judge.accuracy": f"{judge_accuracy:.4f}",
        "compare.fid_lo": f"{fid_interval[0]:.4f}",
        "compare.fid_hi": f"{fid_interval[1]:.4f}",
        **({JUDGE_IMAGES_TAG: str(judge_images)} if judge_images is not None else {}),
        "compare.fid": f"{fid:.4f}",  # last: a version counts as measured once it has it (see _judge_of)
    }
    measured = f"FID {fid:.2f} [{fid_interval[0]:.2f}, {fid_interval[1]:.2f}]"
    scaled = judge_images is not None and default_scale is not None
    smaller = scaled and _below(int(judge["n"]), judge_images, default_scale)
    with _champion_lock():
        # Tags are set one by one; without a lock (remote store) another compare may read between them. Dropping the
        # old FID first makes a half-written version read as unmeasured, never as one judge's FID under another's.
        if "compare.fid" in with_retry(client.get_model_version, name, version).tags:
            with_retry(client.delete_model_version_tag, name, version, "compare.fid")
        for tag, value in tags.items():
            with_retry(client.set_model_version_tag, name, version, tag, value)
        if smaller:
            return (
                f"version {version} measured {measured} by a smaller judge than the default pipeline's ({smaller}): "
                f"recorded, not promoted; {SCALE_RULE}"
            )
        first = _champion(client, name)
        held_smaller = (
            scaled
            and first is not None
            and _below(
                int(first.tags.get(JUDGE_TAGS["n"], 0)), int(first.tags.get(JUDGE_IMAGES_TAG, 0) or 0), default_scale
            )
        )
        if first is not None and _judge_of(first) not in (None, key) and not held_smaller:
            differs = ", ".join(
                f"{k} {held} vs {here}"
                for k, held, here in zip(JUDGE_TAGS, _judge_of(first), key, strict=True)
                if held != here
            )
            return (
                f"models:/{name}@{CHAMPION} stays version {first.version}: it was measured by another judge (its vs "
                f"this one: {differs}), so version {version}'s FID {fid:.2f} does not compare with its "
                f"{_fid_line(first)}; to adopt this judge, move the alias by hand (MLflow UI: Models > {name} > "
                f"version {version})"
            )
        held = first
        # With the lock this loop moves the alias at most once. On a remote server (no lock, and MLflow has no
        # compare-and-set for aliases) another compare may move it between our read and our move: re-reading after
        # each move lets the last compare to finish put it right.
        for _ in range(5):  # then give up: the alias names a version this judge measured, if not the best
            held_id = None if held is None else str(held.version)
            peers = [v for v in with_retry(client.search_model_versions, f"name='{name}'") if _judge_of(v) == key]
            # the lowest FID; on a tie the current champion, then the older version
            best = min(peers, key=lambda v: (float(v.tags["compare.fid"]), str(v.version) != held_id, int(v.version)))
            if str(best.version) == held_id:
                break
            try:
                with_retry(client.set_registered_model_alias, name, CHAMPION, str(best.version))
            except mlflow.exceptions.MlflowException as e:  # two first moves at once: one insert loses; read again
                if "unique" not in str(e).lower():
                    raise
            held = _champion(client, name)
    first_id = None if first is None else str(first.version)
    if str(best.version) == first_id:
        if first_id == version:
            return f"models:/{name}@{CHAMPION} stays version {version}, re-measured: {measured}"
        return (
            f"models:/{name}@{CHAMPION} stays version {first_id} ({_fid_line(best)}); version {version} measured "
            f"{measured} by the same judge"
        )
    replaced = "" if first is None else f", replacing version {first_id} ({_fid_line(first)})"
    if first is not None and _judge_of(first) is None:
        replaced += ", whose judge was never recorded"
    elif held_smaller and _judge_of(first) != key:
        replaced += f", measured by a smaller judge ({held_smaller}); {SCALE_RULE}"
    return f"models:/{name}@{CHAMPION} is now version {best.version} ({_fid_line(best)}){replaced}"


def _below(n: int, judge_images: int, default_scale: tuple[int, int]) -> str:
    """What falls short of the default scale (n, judge images), said as 'n 100 < 1000, ...'; '' when nothing does.
    A version recorded without its judge's images (0) is judged by its n alone."""
    default_n, default_images = default_scale
    short = [f"n {n} < {default_n}"] if n < default_n else []
    if 0 < judge_images < default_images:
        short.append(f"judge trained on {judge_images:,} images < {default_images:,}")
    return ", ".join(short)


def _champion(client, name: str):
    """The version the alias names, or None (no champion yet, or its version was deleted)."""
    import mlflow

    try:
        return with_retry(client.get_model_version_by_alias, name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def resolve_alias(model_uri: str) -> tuple[str, str | None]:
    """`models:/<name>@<alias>` pinned to the version the alias names now, with one line saying which (and compare's
    FID, if recorded), so what is loaded is what is said even if a compare moves the alias meanwhile. Other URIs
    come back unchanged, with no line."""
    import mlflow

    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri, None
    name, alias = model_uri.removeprefix("models:/").rstrip("/").rsplit("@", 1)
    held = with_retry(mlflow.MlflowClient().get_model_version_by_alias, name, alias)
    measured = _fid_line(held)
    if "compare.n" in held.tags:
        measured += f" at n {held.tags['compare.n']}"
    return f"models:/{name}/{held.version}", f"{model_uri} is version {held.version} ({measured})"
