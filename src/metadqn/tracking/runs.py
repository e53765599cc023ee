"""MLflow runs for the stages: tracking URI, experiments per family, tags, batched step metrics.

Default store: ``sqlite:///mlflow.db`` with artifacts under ``./mlruns`` (MLflow 3 no longer accepts a
bare file store); ``MLFLOW_TRACKING_URI`` overrides it (e.g. an ``mlflow server`` with PostgreSQL).
MLflow is imported lazily: it costs seconds, and stages with tracking off never pay them.

A dead or hung tracking server must cost seconds, not MLflow's default of minutes of retries per request:
:func:`configure_tracking` bounds MLflow's HTTP timeout and retries (the user's own settings of those
variables win), and :func:`check_tracking` lets a command find out, before any training, that the store
does not answer, with one line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from metadqn.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_ROOT = Path("mlruns")
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",  # seconds per request (MLflow's default: 120)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow's default, 7 with backoff, retries for about 15 minutes
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits 0 s then 2 s between the tries
}
"""MLflow's HTTP client settings unless the environment sets them: a dead server fails in about 3 s, a
hung one in about 20 s, instead of 15 minutes."""
CHECK_TIMEOUT_S = 5.0
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class TrackingUnavailable(UserError, ValueError):
    """The MLflow tracking store does not answer; the message is one line, ready to print."""


def git_commit() -> str:
    """HEAD's commit, with ``-dirty`` if tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def bound_http() -> None:
    """Sets MLflow's HTTP timeout and retry budget to :data:`HTTP_DEFAULTS` where the user has not."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def configure_tracking() -> str:
    """Points MLflow at the tracking URI (default sqlite:///mlflow.db) with a bounded HTTP budget; returns it."""
    import mlflow

    bound_http()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def redact_uri(uri: str) -> str:
    """The URI without a password, which must never reach a log or a terminal."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def check_tracking(uri: str | None = None, timeout: float = CHECK_TIMEOUT_S, disable_hint: bool = True) -> str:
    """Checks within about ``timeout`` seconds that the tracking store answers; returns the URI.

    http(s): one experiments search (what every command does first) with no retries; sqlite: the
    database file is readable and its folder writable; a database server: its port accepts a connection.
    Raises :class:`TrackingUnavailable` with one line: the URI, what failed, how to fix it.
    """
    bound_http()
    uri = uri or tracking_uri()
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if base in ("http", "https", *_DB_PORTS):
        fixes = "start the server or point MLFLOW_TRACKING_URI at a running one (default sqlite:///mlflow.db)"
    else:
        fixes = "point MLFLOW_TRACKING_URI at a usable store (default sqlite:///mlflow.db)"
    if disable_hint:
        fixes += ", or set tracking.enabled: false in params"
    try:
        if base in ("http", "https"):
            _check_http(uri, timeout)
        elif base == "sqlite":
            _check_sqlite(uri, timeout)
        elif base in _DB_PORTS:
            _check_port(uri, _DB_PORTS[base], timeout)
        elif base in ("", "file"):
            _check_file_store(uri)
        elif base in ("databricks", "databricks-uc", "uc"):
            pass  # a hosted workspace: nothing to probe offline; the bounded HTTP budget still applies
        else:
            raise _Failed(f"unknown scheme {scheme!r} (use sqlite:///<file>, http(s)://<host>:<port>, "
                          "postgresql://, mysql:// or mssql://)")
    except _Failed as exc:
        raise TrackingUnavailable(f"MLflow tracking store {redact_uri(uri)} is unavailable: {exc}; {fixes}") from None
    return uri


class _Failed(Exception):
    """What a probe found wrong (one short clause)."""


def _check_http(uri: str, timeout: float) -> None:
    import base64
    import json
    import ssl
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers={"User-Agent": "metadqn"})
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    context = None
    if uri.lower().startswith("https"):
        # the same TLS settings MLflow's own client honours
        context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            body = answer.read(1_000_000)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _Failed(f"it refused the credentials (HTTP {exc.code}; set MLFLOW_TRACKING_TOKEN or "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        raise _Failed(f"it answered HTTP {exc.code} to an experiments search") from None
    except TimeoutError:
        raise _Failed(f"no answer within {timeout:g} s (a hung server?)") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise _Failed(f"no answer within {timeout:g} s (a hung server?)") from None
        raise _Failed(f"cannot connect ({_clause(reason)})") from None
    except (OSError, ValueError) as exc:  # a reset connection, a malformed URL
        raise _Failed(f"cannot connect ({_clause(exc)})") from None
    try:
        json.loads(body or b"{}")
    except ValueError:
        raise _Failed("it answered, but not as an MLflow tracking server (no JSON from the REST API)") from None


def _clause(reason: object) -> str:
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return (str(text).strip().splitlines() or ["unknown error"])[0]


def _check_sqlite(uri: str, timeout: float) -> None:
    import sqlite3

    path = uri.split("://", 1)[1]
    path = path[1:] if path.startswith("/") else path  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return
    db = Path(path)
    folder = db.resolve().parent
    if not folder.is_dir():
        raise _Failed(f"its folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise _Failed(f"its folder {folder} is not writable")
    if not db.exists():
        return  # MLflow creates it
    if db.is_dir():
        raise _Failed(f"{db} is a folder, not a database file")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=timeout)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise _Failed(f"{db} cannot be read as a database ({_clause(exc)})") from None


def _check_port(uri: str, default_port: int, timeout: float) -> None:
    parts = urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise _Failed(f"no answer from {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise _Failed(f"cannot connect to {host}:{port} ({_clause(exc)})") from None


def _check_file_store(uri: str) -> None:
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise _Failed("MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true "
                      "(migrate it to sqlite:///mlflow.db)")
    parts = urlsplit(uri)
    folder = Path(parts.path if parts.scheme else uri).resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise _Failed(f"{folder} is not a writable folder")


def experiment_name(family: str) -> str:
    return f"metadqn-{family}"


def _ensure_experiment(name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        # keep artifacts inside the project, whatever the working directory of a later reader
        location = (ARTIFACT_ROOT / name).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


PARENT_RUN_ENV = "METADQN_PARENT_RUN_ID"
"""A stage run started with this set becomes a child of that MLflow run (``metadqn replicate`` sets it)."""
REPLICATE_ENV = "METADQN_REPLICATE"
"""The replicate index a stage run is tagged with."""


def replicate_tags() -> dict[str, str]:
    """Tags that make a stage run of a replicate (``metadqn replicate``) a child of the replicates' parent run."""
    tags = {}
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(REPLICATE_ENV):
        tags["replicate"] = os.environ[REPLICATE_ENV]
    return tags


def absolute_tracking_uri(uri: str, root: Path) -> str:
    """A relative ``sqlite:///x.db`` made absolute against ``root`` (a process elsewhere, e.g. a replicate's
    clone, must write to the same store); other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def start_parent_run(name: str, family: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> tuple[str, str]:
    """A run in the family's experiment that other processes' stage runs join as children (they get
    :data:`PARENT_RUN_ENV` and the returned absolute tracking URI); returns (run id, URI). It stays open
    until :func:`finish_parent_run`."""
    import mlflow

    uri = absolute_tracking_uri(configure_tracking(), Path.cwd())
    client = mlflow.MlflowClient()
    run = client.create_run(_ensure_experiment(experiment_name(family)), run_name=name, tags={**tags, "family": family})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id, uri


def finish_parent_run(run_id: str, metrics: Mapping[str, float], artifact: Path | None, status: str) -> None:
    """Logs ``metrics`` (step 0) and ``artifact`` (if it exists) to a parent run and ends it with ``status``."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    rows = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
    for i in range(0, len(rows), 500):
        client.log_batch(run_id, metrics=rows[i:i + 500])
    if artifact is not None and artifact.is_file():
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_run(stage: str, family: str, params: Mapping[str, Any], digest: str, enabled: bool = True,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage (``None`` when tracking is off), with flattened params and tags."""
    if not enabled:
        yield None
        return
    import mlflow

    configure_tracking()
    exp_id = _ensure_experiment(experiment_name(family))
    # the active experiment, not only this run's: a nested run or a logged model created inside it without
    # an experiment id (meta_train's per-learner runs, every log_model) would otherwise land in `Default`
    mlflow.set_experiment(experiment_id=exp_id)
    all_tags = {"stage": stage, "git_commit": git_commit(), "params_digest": digest, "family": family,
                **replicate_tags(), **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=all_tags) as run:
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        client = mlflow.MlflowClient()
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        yield run


def log_step_metrics(run: Any, frame: pd.DataFrame, key_col: str, step_col: str, value_col: str,
                     prefix: str) -> None:
    """Logs one step metric per row (e.g. a learning curve per task), in batches of 1000."""
    if run is None or frame.empty:
        return
    import time

    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{row[key_col]}", float(row[value_col]), ts, int(row[step_col]))
               for row in frame.to_dict("records")]
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])


def log_dataset(run: Any, frame: pd.DataFrame, name: str, source: str, digest: str, context: str) -> None:
    """Records ``frame`` as the run's dataset input, with the DVC hash as its digest."""
    if run is None:
        return
    import warnings

    import mlflow

    # the same function as mlflow.data.from_pandas, which mlflow.data sets at import time (invisible to mypy)
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources; neither applies to a DVC path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=source, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context)
