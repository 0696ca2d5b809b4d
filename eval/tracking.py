"""MLflow helpers shared by the trainer and the evaluator.

Everything goes through an explicit `mlflow.MlflowClient` and a run id, never through mlflow's
global active run, so a trainer and an evaluator (or two evaluators) in one process cannot log
into each other's runs. `import mlflow` takes seconds, so it happens inside the functions.

Metric names: MLflow accepts only letters, digits, '_', '-', '.', ' ', ':' and '/' in a metric
name, so '@' in our score names (kNN's 'knn/top1@20') is written as '_k' ('knn/top1_k20') when
logged; `mlflow_metric_name` is the one place that maps a score name to its MLflow name.

Params never hold secrets: `log_params` passes every value through `redact` (data.redact), which
masks credentials in shard URLs and commands (user:password@, ?token=, X-Amz-Signature=,
Authorization headers) and leaves plain paths as they are.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from data.redact import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
PRETRAIN_EXPERIMENT = "vit-ssl"  # pretraining runs (pretrain.tracking.RunLog)
EVAL_EXPERIMENT = "vit-ssl-eval"  # evaluation runs not logged into their pretraining run
PARENT_TAG = "mlflow.parentRunId"  # links an evaluation run to its pretraining run (the UI nests it)
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc")
_INVALID = re.compile(r"[^/\w.\- :]")


def tracking_uri(runs_root: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI if set, else a sqlite store at <abs runs_root>/mlflow.db (folder created)."""
    return os.environ.get(ENV_URI) or local_uri(runs_root)


def local_uri(runs_root: str | os.PathLike) -> str:
    """The sqlite store at <abs runs_root>/mlflow.db (folder created)."""
    root = Path(runs_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / DB_NAME}"


def is_server(uri: str) -> bool:
    """True when a tracking server owns the artifact store (http, https, databricks); False for a
    store this process writes itself (sqlite or another database, a file store)."""
    scheme = urlparse(uri).scheme.lower()
    return scheme in _SERVER_SCHEMES or uri.lower().startswith("databricks")


def client(uri: str) -> "MlflowClient":
    """An MlflowClient bound to `uri` (no global state touched)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_experiment_id(name: str, runs_root: str | os.PathLike, uri: str | None = None) -> str:
    """Id of experiment `name` in tracking_uri(runs_root) (or `uri`), created if missing.

    Unless a tracking server owns the artifact store, the experiment's artifacts go to
    <abs runs_root>/mlartifacts, never to the working directory's ./mlruns (MLflow's default for a
    database store). Two processes creating it at once both get the one id.
    """
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri(runs_root)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: its name stays taken, so bring it back
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if not is_server(uri):
        location = (Path(runs_root).expanduser().resolve() / ARTIFACTS_DIR).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    experiment: str,
    runs_root: str | os.PathLike,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> tuple[str, str]:
    """Create a run in `experiment`; returns (run_id, tracking uri). End it with end_run()."""
    uri = uri or tracking_uri(runs_root)
    exp_id = get_experiment_id(experiment, runs_root, uri)
    run = client(uri).create_run(exp_id, run_name=run_name, tags=tags or {})
    return run.info.run_id, uri


def end_run(run_id: str, uri: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED (or FAILED / KILLED)."""
    client(uri).set_terminated(run_id, status=status)


def mlflow_metric_name(name: str) -> str:
    """A score name as MLflow accepts it: '@' -> '_k' ('knn/top1@20' -> 'knn/top1_k20'), other bad characters -> '_'."""
    return _INVALID.sub("_", name.replace("@", "_k"))


def log_metrics(run_id: str, metrics: dict[str, float], step: int, uri: str) -> None:
    """Log a dict of scalar metrics at `step` in one batch (names mapped by mlflow_metric_name)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(mlflow_metric_name(k), float(v), now, int(step)) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch call
        client(uri).log_batch(run_id, metrics=batch[i : i + 1000])


def log_artifact(run_id: str, local_path: str | os.PathLike, uri: str, artifact_path: str | None = None) -> None:
    """Upload a file (e.g. a PNG of attention maps) to the run's artifact store."""
    client(uri).log_artifact(run_id, str(local_path), artifact_path)


RUN_JSON = "run.json"


def write_run_json(run_dir: str | os.PathLike, run_id: str, uri: str, experiment: str) -> Path:
    """RUN_DIR/run.json = {"mlflow_run_id", "tracking_uri", "experiment"}: how `eval.run` finds the pretraining run."""
    path = Path(run_dir) / RUN_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{RUN_JSON}")
    tmp.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri, "experiment": experiment}, indent=2))
    os.replace(tmp, path)
    return path


def read_run_json(run_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The run.json of a run folder, or {} when there is none."""
    if run_dir is None or not (Path(run_dir) / RUN_JSON).is_file():
        return {}
    path = Path(run_dir) / RUN_JSON
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}): fix or delete it") from exn


def pretraining_run(run_dir: str | os.PathLike | None) -> tuple[str, str] | None:
    """(run id, tracking uri) of the pretraining run named in RUN_DIR/run.json, or None when there
    is no run.json (or it names no run); ValueError, naming the fix, when the named run cannot be read."""
    from mlflow.exceptions import MlflowException

    info = read_run_json(run_dir)
    run_id = info.get("mlflow_run_id")
    if not run_id:
        return None
    uri = info.get("tracking_uri") or tracking_uri(Path(run_dir).parent)
    try:
        client(uri).get_run(run_id)
    except MlflowException as exn:
        raise ValueError(
            f"{Path(run_dir) / RUN_JSON} names MLflow run {run_id} in {redact(uri)}, which cannot be read ({exn.message}): "
            "fix tracking_uri there, or delete run.json to log into a new evaluation run"
        ) from exn
    return run_id, uri


def evaluation_run(run_dir: str | os.PathLike | None, target: str | os.PathLike, runs_root: str | os.PathLike,
                   experiment: str, run_name: str, new_run: bool = False, tags: dict[str, str] | None = None
                   ) -> tuple[str, str, bool]:
    """Where an evaluation of `target` logs: (run id, tracking uri, whether it was created here).

    The pretraining run named in RUN_DIR/run.json, unless `new_run`; otherwise (or when there is
    none) a new run of `experiment`, tagged with the pretraining run as its parent (mlflow.parentRunId)
    when there is one, and then kept in that run's store. End a created run with end_run()."""
    parent = pretraining_run(run_dir)
    if parent is not None and not new_run:
        return parent[0], parent[1], False
    tags = {"target": str(Path(target).resolve()), **(tags or {})}
    if parent is not None:
        tags[PARENT_TAG] = parent[0]
        run_id, uri = start_run(experiment, Path(run_dir).parent, run_name=run_name, tags=tags, uri=parent[1])
    else:
        run_id, uri = start_run(experiment, runs_root, run_name=run_name, tags=tags)
    return run_id, uri, True


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested config as flat MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def log_params(run_id: str, params: dict[str, Any], uri: str) -> None:
    """Log a (possibly nested) dict as params; values are stringified, credentials in them (tokens
    and passwords in shard URLs and pipe: commands) masked by `redact`, and cut to MLflow's 6,000
    characters. A param is visible to everyone who can read the tracking server, and cannot be
    deleted from a run."""
    from mlflow.entities import Param

    items = [Param(mlflow_metric_name(k), redact(str(v))[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow's limit per log_batch call
        client(uri).log_batch(run_id, params=items[i : i + 100])
