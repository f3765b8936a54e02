"""MLflow's runs: one per pipeline execution, shared by the stages (the registry: registry.py).

`train` creates the run (before Ray starts) and records its id in models/mlflow_run.json;
its rank-0 worker logs per-epoch metrics into it; `evaluate` and `export` reopen it.
Tracking URI: $MLFLOW_TRACKING_URI, else an absolute sqlite:/// file in the repository
(MLflow 3 refuses the old ./mlruns file store), with artifacts beside it.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from filelock import FileLock

from pipeline import compat, environment
from pipeline.files import Layout, read_json, write_json

log = logging.getLogger(__name__)
EXPERIMENT = "vae-mnist"
# Set by `dvc exp run` in the stage's environment.
DVC_EXPERIMENT_ENV = {"DVC_EXP_NAME": "dvc.experiment", "DVC_EXP_BASELINE_REV": "dvc.baseline"}
# MLflow's client retries an unreachable server for minutes by default (7 retries, doubling
# waits, 120 s timeouts); a server that goes away mid-run must not stall training that long.
# Set for this process and its children unless the user chose otherwise.
for _name, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}.items():
    os.environ.setdefault(_name, _value)
# Why this process stopped logging to MLflow, once a call has failed (see best_effort).
_gave_up: str | None = None


def tracking_uri(layout: Layout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.mlflow_db}"


def hide_credentials(text: str, uri: str | None = None) -> str:
    """text with the credentials a tracking URI may carry (`https://user:password@host`, which
    MLflow's client sends as basic auth) replaced by ***, for what is printed, tagged or written
    to files; uri: $MLFLOW_TRACKING_URI unless given."""
    userinfo = urllib.parse.urlsplit(uri or os.environ.get("MLFLOW_TRACKING_URI", "")).netloc.rpartition("@")[0]
    return text.replace(f"{userinfo}@", "***@") if userinfo else text


def require_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when an HTTP tracking server does not answer: before
    any training starts, rather than after MLflow's minutes of retries. Through requests, as
    MLflow's client goes: credentials in the URI are sent as basic auth."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(hide_credentials(
            f"MLflow tracking server {uri} is unreachable ({e}); start it, or unset MLFLOW_TRACKING_URI to log "
            f"into this repository's mlflow.db", uri)) from None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def lineage_tags(layout: Layout) -> dict[str, str]:
    """The git commit (and whether the tree was dirty), the environment (uv.lock's sha256)
    and the data version from dvc.lock."""
    commit = _git(layout.root, "rev-parse", "HEAD")
    status = _git(layout.root, "status", "--porcelain", "--untracked-files=no")
    tags = {"git.commit": commit or "unknown", "git.dirty": str(bool(status)).lower(),
            "env.uv_lock_sha256": environment.lock_sha256()}
    tags |= {tag: os.environ[env] for env, tag in DVC_EXPERIMENT_ENV.items() if os.environ.get(env)}
    if "dvc.experiment" in tags:  # a sweep: $VAE_SWEEP, else the experiments of one baseline commit
        tags["sweep"] = os.environ.get("VAE_SWEEP") or f"baseline-{tags.get('dvc.baseline', 'unknown')[:7]}"
    lock = layout.root / "dvc.lock"
    if lock.is_file():
        outs = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("fetch", {}).get("outs", [])
        if outs:
            tags["data.md5"] = outs[0].get("md5", "unknown")
    return tags


# What a tracking server's refusal of a stage's first request most likely means, by HTTP status.
REFUSALS = {
    401: "not authenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that "
         "server (for `make up`'s stack, `source .stack/env`)",
    403: "the account lacks permission, or the server does not allow this host name (`mlflow server "
         "--allowed-hosts`)",
    404: "it does not answer MLflow's API: is MLFLOW_TRACKING_URI a tracking server's address?",
}


def _experiment_id(client, layout: Layout) -> str:
    """The pipeline's experiment, created if need be: the first request every stage makes of
    the store, so a server that refuses it is named here, in one line, not in MLflow's traceback."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(EXPERIMENT)
    except MlflowException as e:
        status = e.get_http_status_code()
        if status not in REFUSALS or not client.tracking_uri.startswith(("http://", "https://")):
            raise
        raise ConnectionError(hide_credentials(f"MLflow tracking server {client.tracking_uri} refused the pipeline's "
                                               f"request (HTTP {status}): {REFUSALS[status]}")) from None
    if found:
        return found.experiment_id
    # With the default local store, keep artifacts in the repository; a server decides its own.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else layout.mlflow_artifacts.as_uri()
    # The kind makes the UI open on the runs table and their charts, not on GenAI traces.
    return client.create_experiment(EXPERIMENT, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def start_run(layout: Layout, params: dict[str, object], tags: dict[str, str]) -> str:
    """Create this pipeline execution's run, log params and lineage, and record its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = tracking_uri(layout)
    client = MlflowClient(uri)
    # Experiments started at once (`dvc queue start -j N`) would race to create the SQLite
    # store's tables and the MLflow experiment: one at a time.
    with FileLock(layout.registry_lock):
        run = client.create_run(_experiment_id(client, layout), tags={**lineage_tags(layout), **tags})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    write_json(layout.mlflow_run, {"run_id": run_id, "tracking_uri": hide_credentials(uri, uri),
                                   "experiment": EXPERIMENT})
    return run_id


def open_run(layout: Layout) -> tuple["MlflowClient", str]:  # noqa: F821
    """The client and run recorded by `train`. If that run is not in the current tracking
    store (say DVC restored `train` from its cache against a fresh mlflow.db, or only
    evaluate and export ran in an experiment's copy), the stages log into a run that names
    the model's original run: the newest such run of this experiment, else a new one, so
    that evaluate and export of one execution share it, rather than logging nowhere."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    recorded = read_json(layout.mlflow_run, "run_id")["run_id"]
    uri = tracking_uri(layout)
    require_reachable(uri)  # a server still gone fails in seconds, naming it
    client = MlflowClient(uri)
    try:
        client.get_run(recorded)
        return client, recorded
    except MlflowException:
        pass
    tags = {**lineage_tags(layout), "model.origin_run": recorded}
    experiment = _experiment_id(client, layout)
    same = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in ("model.origin_run", "dvc.experiment") if k in tags)
    found = client.search_runs([experiment], filter_string=same, order_by=["attributes.start_time DESC"],
                               max_results=1)
    if found:
        return client, found[0].info.run_id
    log.warning("MLflow run %s not found at %s; logging into a new run", recorded,
                hide_credentials(client.tracking_uri))
    return client, client.create_run(experiment, tags=tags).info.run_id


def best_effort(what: str, call, *args, **kwargs):
    """call(*args, **kwargs), for logging that must not cost the training it records. When
    the tracking server stops answering (after MLflow's bounded retries), warn once, naming
    what was lost, and skip MLflow for the rest of this process: the training goes on and
    its outputs are still written."""
    global _gave_up
    if _gave_up:
        return None
    try:
        return call(*args, **kwargs)
    except Exception as e:  # MlflowException or a requests error, whichever the client raised
        _gave_up = what
        print(hide_credentials(
            f"WARNING: MLflow stopped answering while logging {what} ({type(e).__name__}: {e}). This process "
            f"goes on without it, logging nothing more, so the run there is incomplete."), file=sys.stderr, flush=True)
        return None


ERROR_CHARS = 5000  # of a failed stage's error, in its run's `error` tag (MLflow takes 8,000)


@contextmanager
def failing_marks(client, run_id: str) -> Iterator[None]:
    """A stage that raises marks the pipeline's run FAILED (KILLED when interrupted: Ctrl-C,
    SIGTERM, SIGHUP), so the UI never shows a dead run as RUNNING, and tags it `error` with what it
    raised, so the UI says why; the stage's error still propagates (even when the server is gone
    too)."""
    try:
        yield
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        error = "interrupted" if status == "KILLED" else f"{type(e).__name__}: {e}"
        best_effort("the run's error", client.set_tag, run_id, "error", hide_credentials(error)[:ERROR_CHARS])
        best_effort(f"the run's {status} status", client.set_terminated, run_id, status=status)
        raise


@contextmanager
def system_metrics(run_id: str, layout: Layout, interval_s: float = 5.0) -> Iterator[None]:
    """MLflow's CPU, memory, disk and network metrics for the run, sampled while the block runs
    (by MLflow's own sampler: see compat.mlflow_system_metrics_monitor for why not its switch)."""
    monitor_class = compat.mlflow_system_metrics_monitor()
    monitor = monitor_class(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri(layout))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # catches its own errors: a server gone away costs one bounded retry


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def browse_hint(layout: Layout) -> str:
    uri = tracking_uri(layout)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"  # a shell command: the path may have a space
    return f"open {hide_credentials(uri, uri)} in a browser"
