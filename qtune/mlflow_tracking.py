"""MLflow tracking (`tracking.backend: mlflow`): the store's URI, its check before any weight loads, and the run qtune
opens (a --resume continues it), with the resolved recipe as params; transformers' MLflowCallback logs the figures
into that run, as WandbCallback does into the W&B run.

    tracking.uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db   (MLflow 3's own default; artifacts in ./mlruns)
    check(recipe)        prepare(): MLflow installed, the store writable / the server answering, fast
    MlflowRun.start()    main process: experiment = tracking.project, run name, tags, params = the recipe (flattened
                         like `lora.r`, secrets redacted); run id kept in run_dir/mlflow_run_id for --resume
    report_final()       summary figures, summary.json and recipe.yaml, the adapter with tracking.log_model

MLflow's file store (a plain folder) is in maintenance mode: MLflow 3.7+ refuses it unless MLFLOW_ALLOW_FILE_STORE
is true, so the default is MLflow's own sqlite file, which mlflow-skinny serves with SQLAlchemy and Alembic
(`pip install 'qtune[mlflow]'`); the UI (`mlflow ui`) is in the full `mlflow` package.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from qtune.config import Recipe, mlflow_name_ok, recipe_to_dict
from qtune.errors import QtuneError
from qtune.rundir import RunDir, write_text_atomic

INSTALL = "pip install 'qtune[mlflow]'"
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's default (mlflow.store.tracking.DEFAULT_TRACKING_URI)
CHECK_TIMEOUT_S = 5  # the server check: one try, this long at most (MLflow's defaults: 7 retries, 120 s each)
# Recipe keys that say how this command was started, not what the run is: a --resume changes them.
SESSION_KEYS = ("training.resume", "training.overwrite")


# --------------------------------------------------------------------------- the store


def tracking_uri(recipe: Recipe) -> str:
    """The store this run logs to, with a local path made absolute (the UI and a resume find the same one)."""
    uri = recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    parts = urlsplit(uri)
    if parts.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = unquote(uri[len("sqlite:///") :])
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(os.path.expanduser(path)).absolute())
        return uri
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):  # a plain path: MLflow's file store
        return Path(os.path.expanduser(uri)).absolute().as_uri()
    return uri


def shown(uri: str) -> str:
    """A URI as it may be printed: a password (from MLFLOW_TRACKING_URI; recipes refuse them) masked."""
    parts = urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise QtuneError("tracking.backend: mlflow is not installed", INSTALL + " (or use wandb / tensorboard / none)")


def check(recipe: Recipe) -> None:
    """Before any weight loads: MLflow is there and the store takes a run (a local store writable, a server
    answering within CHECK_TIMEOUT_S). Writes nothing: a new local store is created by the run itself."""
    check_installed()
    import mlflow

    uri = tracking_uri(recipe)
    scheme = urlsplit(uri).scheme
    where = f"tracking.uri {shown(uri)}" if recipe.tracking.uri else f"MLflow tracking URI {shown(uri)}"
    if not recipe.tracking.uri:
        where += " (from MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") else " (the default)"
    if scheme == "sqlite":
        _check_sqlite(uri, where)
    elif scheme == "file":
        allow = getattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
        if allow is not None and not allow.get():
            raise QtuneError(
                f"{where}: MLflow {mlflow.__version__} refuses its file store (a folder) unless "
                "MLFLOW_ALLOW_FILE_STORE=true: it is in maintenance mode",
                "use a database, e.g. tracking.uri: sqlite:///mlflow.db (artifacts go to ./mlruns), or set "
                "MLFLOW_ALLOW_FILE_STORE=true",
            )
        _check_writable(Path(_file_path(uri)), where, folder=True)
    else:
        _check_server(uri, where, recipe.tracking.project)


def _file_path(uri: str) -> str:
    from urllib.request import url2pathname

    return url2pathname(urlsplit(uri).path)


def _check_sqlite(uri: str, where: str) -> None:
    path = unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        raise QtuneError(f"{where}: an in-memory database keeps nothing", "give a file: sqlite:///path/to/mlflow.db")
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise QtuneError(
            f"{where}: MLflow's database store needs SQLAlchemy and Alembic, which are not installed", INSTALL
        ) from None
    _check_writable(Path(path), where, folder=False)


def _check_writable(path: Path, where: str, folder: bool) -> None:
    """The store (a folder, or a database file) can be written, or created by MLflow: its folder must exist for a
    database (SQLite creates no folders), any existing ancestor for a file store (MLflow creates the rest)."""
    if path.exists():
        if folder != path.is_dir():
            raise QtuneError(f"{where}: {path} is {'not a folder' if folder else 'a folder, not a database file'}")
        if not os.access(path, os.W_OK):
            raise QtuneError(f"{where}: {path} is not writable", "give a store you can write to")
        if folder:
            return
    parent = path.parent
    if not folder and not parent.exists():
        raise QtuneError(f"{where}: the folder {parent} does not exist", "create it, or give another path")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QtuneError(f"{where}: {parent} is not a folder", "give a store path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QtuneError(f"{where}: {parent} is not writable", "give a store you can write to")


def _check_server(uri: str, where: str, experiment: str) -> None:
    """One request (the experiment by name: reachability and credentials), no retries, a short timeout."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in fast}
    os.environ.update(fast)
    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except UnsupportedModelRegistryStoreURIException:
        raise QtuneError(
            f"{where}: MLflow has no store for '{urlsplit(uri).scheme}:' URIs",
            "give http(s)://host:port (a tracking server), databricks, sqlite:///path.db or a database URL",
        ) from None
    except Exception as exc:  # MLflow's own and requests' errors: any of them means no run could start
        raise QtuneError(
            f"{where}: the MLflow tracking server cannot be used: {_reason(exc, CHECK_TIMEOUT_S)}",
            "start the server (mlflow server …) or fix the URI; credentials come from MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD; or tracking.backend: none",
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(exc: Exception, timeout: int | None = None) -> str:
    """The telling part of an MLflow / requests error: urllib3's messages lead with the URL and pool details."""
    import re

    text = " ".join(str(exc).split())
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if errno:
        return errno.group(0).strip()
    if "timed out" in text.lower():
        return f"no answer within {timeout} s" if timeout else "timed out"
    return text[:300] or type(exc).__name__


# --------------------------------------------------------------------------- params


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe (secrets redacted) as MLflow params: one per leaf, named by its key path as overrides
    name it (`lora.r`, `data.datasets.0.path`); lists of plain values as JSON, values past MLflow's length limit
    cut (the whole recipe is the run's recipe.yaml artifact). Unused method sections (null) are left out."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    params: dict[str, str] = {}

    def name(part: str) -> str:
        import re

        return re.sub(r"[^\w\-. :]", "_", part)

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{name(str(k))}" if key else name(str(k)))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                cut = f"… [{len(text)} characters: see recipe.yaml]"
                text = text[: MAX_PARAM_VAL_LENGTH - len(cut)] + cut
            if mlflow_name_ok(key):
                params[key] = text

    walk({k: v for k, v in recipe_to_dict(recipe).items() if v is not None}, "")
    return params


def run_tags(recipe: Recipe, run: RunDir) -> dict[str, str]:
    """tracking.tags (`key=value`, or a bare name with an empty value) and where the run dir is."""
    tags = {"qtune.run_dir": str(run.path.absolute()), "qtune.method": recipe.method}
    for tag in recipe.tracking.tags:
        key, _, value = tag.partition("=")
        tags[key] = value
    return tags


def callback_env(recipe: Recipe) -> dict[str, str]:
    """transformers' MLflowCallback settings (its documented environment variables): the run qtune opened is the
    active one, so the callback logs the figures into it; the params are qtune's (the recipe: the callback's
    TrainingArguments dump would repeat output_dir under another value, and params cannot change on --resume);
    never the pickled checkpoints as artifacts; no nested run."""
    return {
        "MLFLOW_TRACKING_URI": tracking_uri(recipe),
        "MLFLOW_MAX_LOG_PARAMS": "0",
        "HF_MLFLOW_LOG_ARTIFACTS": "false",
        "MLFLOW_NESTED_RUN": "false",
    }


# --------------------------------------------------------------------------- the run


class MlflowRun:
    """The MLflow run of a training session: opened on the main process before training, ended after it."""

    def __init__(self, client, run_id: str, experiment: str, experiment_id: str, uri: str):
        self.client, self.run_id, self.experiment, self.experiment_id, self.uri = (
            client,
            run_id,
            experiment,
            experiment_id,
            uri,
        )

    @classmethod
    def start(cls, recipe: Recipe, run: RunDir, resuming: bool) -> MlflowRun:
        """A new run in experiment tracking.project, or, resuming, the run this run dir logged to (its id in
        run_dir/mlflow_run_id; one that no longer exists in the store is named and a new run started)."""
        import warnings

        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(recipe)
        # SQLAlchemy 2.1 deprecates a loader option MLflow's store still sets: not the user's to act on.
        warnings.filterwarnings("ignore", message=".*noload.*", category=DeprecationWarning)
        try:
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(tracking_uri=uri)
            previous = _previous_run(client, run, uri) if resuming else None
            if previous is not None:
                os.environ.pop("MLFLOW_RUN_ID", None)  # the callback would start that run a second time
                mlflow.set_experiment(experiment_id=previous.info.experiment_id)
                active = mlflow.start_run(run_id=previous.info.run_id, tags=run_tags(recipe, run))
            else:
                mlflow.set_experiment(recipe.tracking.project)
                active = mlflow.start_run(run_name=recipe.tracking.run_name, tags=run_tags(recipe, run))
            experiment = client.get_experiment(active.info.experiment_id)
            tracker = cls(client, active.info.run_id, experiment.name, experiment.experiment_id, uri)
            write_text_atomic(run.mlflow_run_id, tracker.run_id + "\n")
            tracker._log_params(recipe, existing=previous.data.params if previous is not None else {})
            tracker.client.log_artifact(tracker.run_id, str(run.recipe_file))
        except MlflowException as exc:
            if mlflow.active_run() is not None:
                mlflow.end_run("FAILED")
            raise QtuneError(f"MLflow ({shown(uri)}) refused the run: {_reason(exc)}") from None
        return tracker

    def _log_params(self, recipe: Recipe, existing: dict[str, str]) -> None:
        """The recipe's params; on a resume only those not logged yet: MLflow never changes a logged param, so a
        changed value is said once here and recipe.yaml (artifact and run dir) holds the current recipe."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        params = recipe_params(recipe)
        changed = [k for k, v in params.items() if k in existing and existing[k] != v and k not in SESSION_KEYS]
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            first = changed[0]
            print(
                f"qtune: note: MLflow keeps a run's params as first logged: {first} stays {existing[first]} in run "
                f"{self.run_id} (now {params[first]})"
                + (f", and {len(changed) - 1} more" if len(changed) > 1 else "")
                + "; the run's recipe.yaml artifact is this session's recipe",
                file=sys.stderr,
                flush=True,
            )

    def report_final(self, summary: dict, recipe: Recipe, run: RunDir) -> None:
        """The summary's figures as `summary/…` metrics (the per-step ones keep their names), summary.json, and with
        tracking.log_model the adapter folder as the run's adapter/ artifacts."""
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), summary.get("steps") or 0
        figures = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(f"summary/{k}", float(v), now, step) for k, v in figures.items()]
            )
            self.client.log_artifact(self.run_id, str(run.summary_file))
            if recipe.tracking.log_model:
                self.client.log_artifacts(self.run_id, str(run.adapter), artifact_path="adapter")
        except Exception as exc:
            raise QtuneError(
                f"MLflow ({shown(self.uri)}): the final figures or the adapter could not be logged to run "
                f"{self.run_id}: {_reason(exc)}",
                f"the adapter is saved in {run.adapter}; summary.json and metrics.jsonl are beside it",
            ) from None

    def end(self, status: str = "FINISHED") -> None:
        """End the run (waits for the callback's asynchronous metric logging); FAILED or KILLED when training
        did not finish (a --resume sets it running again)."""
        import mlflow

        try:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status)
            else:
                self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # the adapter is saved (or the real failure is on its way): say it, don't mask it
            print(
                f"qtune: warning: MLflow run {self.run_id} could not be marked {status} in {shown(self.uri)}: "
                f"{_reason(exc)}",
                file=sys.stderr,
                flush=True,
            )

    def where(self) -> list[str]:
        """Lines for the end-of-training summary: how to look at the run."""
        scheme = urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            base = shown(self.uri).rstrip("/")
            return [f"  MLflow       {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"]
        env = "MLFLOW_ALLOW_FILE_STORE=true " if scheme == "file" else ""
        lines = [f"  MLflow       experiment '{self.experiment}', run {self.run_id} in {shown(self.uri)}"]
        if scheme in ("sqlite", "file"):
            lines.append(
                f"               view: {env}mlflow ui --backend-store-uri {shlex.quote(self.uri)}   "
                "(the UI is in the full package: pip install mlflow)"
            )
        return lines


def _previous_run(client, run: RunDir, uri: str):
    """The run a resumed run dir logged to, if the store still has it (not deleted)."""
    from mlflow.exceptions import MlflowException

    id_file = run.mlflow_run_id
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    try:
        previous = client.get_run(run_id)
    except MlflowException:
        previous = None
    if previous is None or previous.info.lifecycle_stage == "deleted":
        print(
            f"qtune: note: MLflow run {run_id} (from {id_file}) is not in {shown(uri)}"
            + (" (deleted)" if previous is not None else "")
            + "; logging to a new run",
            file=sys.stderr,
            flush=True,
        )
        return None
    return previous
