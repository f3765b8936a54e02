"""Sweeps against the infra/ topology brought up by `make up` on 127.0.0.1: an MLflow server
whose store is PostgreSQL and whose artifacts are in S3 (SeaweedFS), and a 2-node Ray cluster
checkpointing to S3. A queued grid runs two experiments at
once; each is one complete run tagged with its name and the sweep, stored in PostgreSQL;
a bad cell fails alone, naming the key; champion ends on the sweep's best model; an
experiment that DVC restores from its run-cache adds nothing to MLflow."""
import json
import os
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from mlflow import MlflowClient

from helpers import (
    SMALL_MODEL,
    bucket_keys,
    check_pipeline_run,
    copy_project,
    git_env,
    logged_model,
    run,
    set_params,
    stack,
)

GRID = ("0.002", "0.003")  # train.lr of the cells that run
BAD = "-1"  # a cell that must fail, naming train.lr
SWEEP = "lr-sweep"


def queue_status(repo, env) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    lines = run(["dvc", "queue", "status"], repo, env=env).stdout.splitlines()
    return {words[1]: words[-1] for words in (line.split() for line in lines[1:])
            if len(words) >= 4 and words[-1] in ("Queued", "Running", "Success", "Failed")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_dir, local_stack):
    """The grid queued from one committed baseline and run two at a time (`vae sweep -j 2`);
    the project, its environment, and each experiment's final queue status."""
    repo = copy_project(tmp_path_factory.mktemp("experiments") / "project")
    set_params(repo, {"data": {"source": str(mnist_dir), "val_size": 200, "max_train_images": 300},
                      # One worker each: the two experiments train at once, one per node.
                      "model": SMALL_MODEL, "train": {"epochs": 1, "num_workers": 1, "batch_size": 64,
                                                      "storage_path": f"s3://ray/{SWEEP}"},
                      "eval": {"max_test_images": 100, "iwae_k": 2, "grid_images": 8}})
    env = git_env(**local_stack, VAE_SWEEP=SWEEP)
    run(["git", "commit", "-qam", "small params"], repo, env=env)
    run(["dvc", "exp", "run", "--queue", "-S", f"train.lr={','.join(GRID)}"], repo, env=env)
    run(["dvc", "exp", "run", "--queue", "-S", f"train.lr={BAD}"], repo, env=env)
    result = run(["vae", "sweep", "-j", "2"], repo, env=env, check=False, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr  # one experiment failed
    assert "vae sweep: 2 workers started" in result.stdout and "vae sweep: failed: " in result.stdout
    status = queue_status(repo, env)
    logs = result.stdout + result.stderr + "".join(
        run(["dvc", "queue", "logs", name], repo, env=env, check=False).stdout for name in status)
    # This process's MlflowClient reads the stack's credentials from the environment too.
    credentials = {k: env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    try:
        yield repo, env, status, logs
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sweep_runs(env) -> list:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])


def test_the_good_cells_succeed_and_the_bad_one_fails_alone_naming_the_key(sweep):
    repo, env, status, _ = sweep
    assert sorted(status.values()) == ["Failed", "Success", "Success"], status
    (failed,) = [name for name, state in status.items() if state == "Failed"]
    logs = run(["dvc", "queue", "logs", failed], repo, env=env, check=False)
    assert "train.lr: Input should be greater than 0" in logs.stdout + logs.stderr
    shown = run(["dvc", "exp", "show", "--json"], repo, env=env).stdout
    assert all(name in shown for name in status), shown[:2000]


def test_each_experiment_is_one_run_tagged_with_its_name_and_the_sweep(sweep):
    repo, env, status, _ = sweep
    runs = sweep_runs(env)
    succeeded = sorted(name for name, state in status.items() if state == "Success")
    assert sorted(r.data.tags["dvc.experiment"] for r in runs) == succeeded  # the failed cell made no run
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert {r.data.tags["sweep"] for r in runs} == {SWEEP} and {r.data.tags["dvc.baseline"] for r in runs} == {baseline}
    assert sorted(r.data.params["train.lr"] for r in runs) == sorted(GRID)
    assert all(r.info.status == "FINISHED" for r in runs)
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # two at a time: the runs overlapped


def test_every_run_registered_a_version_and_champion_is_the_best(sweep):
    _, env, _, _ = sweep
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_id: r for r in sweep_runs(env)}
    versions = client.search_model_versions("name = 'vae-decoder'")
    assert sorted(v.run_id for v in versions) == sorted(runs)
    for version in versions:  # no registry entry points at a model that was not logged
        assert logged_model(client, version).source_run_id == version.run_id
    best = min(runs.values(), key=lambda r: r.data.metrics["test_neg_elbo"])
    assert client.get_model_version_by_alias("vae-decoder", "champion").run_id == best.info.run_id


def test_runs_and_models_are_stored_in_postgresql(sweep):
    _, env, _, _ = sweep
    run_ids = [r.info.run_id for r in sweep_runs(env)]
    engine = sqlalchemy.create_engine(env["VAE_STACK_POSTGRES"])
    try:
        with engine.connect() as db:
            rows = db.execute(sqlalchemy.text("SELECT run_uuid, status FROM runs")).all()
            versions = db.execute(sqlalchemy.text("SELECT run_id FROM model_versions WHERE name = 'vae-decoder'")).all()
    finally:
        engine.dispose()
    assert sorted(rows) == sorted((run_id, "FINISHED") for run_id in run_ids)
    assert sorted(v.run_id for v in versions) == sorted(run_ids)


def test_a_cell_run_again_in_the_workspace_is_restored_and_adds_nothing_to_mlflow(sweep):
    """A cell of the grid again, in the workspace: DVC restores every stage from the run-cache
    the queued experiment filled, adding nothing to MLflow, and the restored
    models/mlflow_run.json names the queued run that logged and registered that model."""
    repo, env, _, _ = sweep
    before = {r.info.run_id: r for r in sweep_runs(env)}
    out = run(["dvc", "exp", "run", "-S", f"train.lr={GRID[0]}"], repo, env=env).stdout
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run" in out
    assert "Running stage" not in out
    assert len(sweep_runs(env)) == len(before)  # no new run, no new version
    assert len(MlflowClient(env["MLFLOW_TRACKING_URI"]).search_model_versions("name = 'vae-decoder'")) == len(before)
    restored = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    assert restored in before and before[restored].data.params["train.lr"] == GRID[0]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert client.get_run(restored).data.metrics["test_neg_elbo"] == pytest.approx(evaluation["neg_elbo"])
    check_pipeline_run(client, client.get_run(restored), repo)


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_checkpoints_and_artifacts_are_in_the_stacks_s3_buckets(sweep):
    """Each experiment's Ray Train run, named for its params, checkpointed into the bucket
    `ray`; MLflow stored each run's artifacts and registered ONNX model in the bucket `mlflow`."""
    _, env, _, _ = sweep
    s3 = {name: env[name] for name in S3_ENV}
    checkpoints = [key for key in bucket_keys(s3, "ray", SWEEP) if "/checkpoint_" in key]
    run_names = {key.split("/")[1] for key in checkpoints if key.endswith("/state.pt")}
    assert len(run_names) == len(GRID), checkpoints
    artifacts = bucket_keys(s3, "mlflow")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run_ in sweep_runs(env):
        assert any(f"/{run_.info.run_id}/artifacts/evaluation/eval.json" in key for key in artifacts)
        (version,) = client.search_model_versions(f"run_id = '{run_.info.run_id}'")
        model_id = logged_model(client, version).model_id
        assert any(f"/models/{model_id}/artifacts/" in key and key.endswith(".onnx") for key in artifacts)


def test_the_stacks_mlflow_asks_for_its_password_and_nothing_logs_it(sweep, monkeypatch):
    """`make up`'s MLflow runs its basic-auth app: no credentials or a wrong password get 401,
    also right after the right one (MLflow caches good credentials for the stack, and those
    alone). The sweep logged with the password from .stack/env (owner-only), the rank-0 Ray
    workers with the one their nodes were started with; it appears in no run and no log, and
    no more does the S3 secret key."""
    from mlflow.server.auth.config import read_auth_config

    _, env, _, logs = sweep
    password = env["MLFLOW_TRACKING_PASSWORD"]
    api = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(api).status_code == 401
    assert httpx.get(api, auth=(env["MLFLOW_TRACKING_USERNAME"], password + "x")).status_code == 401
    assert httpx.get(api, auth=(env["MLFLOW_TRACKING_USERNAME"], password)).status_code == 200
    assert httpx.get(api, auth=(env["MLFLOW_TRACKING_USERNAME"], password[:-1])).status_code == 401
    # The cache as MLflow reads the stack's config: without it, 0.36 s of the server's CPU a request.
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(Path(env["VAE_STACK_STATE"]) / "basic_auth.ini"))
    assert read_auth_config().auth_cache_ttl_seconds == stack.AUTH_CACHE_S > 0
    assert os.stat(Path(env["VAE_STACK_STATE"]) / "env").st_mode & 0o777 == 0o600
    for run_ in sweep_runs(env):
        assert run_.data.metrics["val_neg_elbo"]  # rank 0 on a stack node logged it, authenticated
        assert password not in json.dumps([run_.data.params, run_.data.tags])
    assert password not in logs
    logged = json.dumps([[r.data.params, r.data.tags] for r in sweep_runs(env)])
    assert env["AWS_SECRET_ACCESS_KEY"] not in logs + logged  # nor the S3 key


def test_a_wrong_password_is_named_in_one_line_before_training(sweep):
    """The stack's MLflow refuses a wrong password: `vae train` says so, and which variables to
    set, before Ray starts, rather than in MLflow's traceback; and logs nothing."""
    repo, env, _, _ = sweep
    before = len(sweep_runs(env))
    wrong = {**env, "MLFLOW_TRACKING_PASSWORD": "not-" + env["MLFLOW_TRACKING_PASSWORD"]}
    result = run(["vae", "train"], repo, env=wrong, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"vae train: error: MLflow tracking server {env['MLFLOW_TRACKING_URI']} "
                                    "refused the pipeline's request (HTTP 401): not authenticated: set "
                                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), result.stderr
    assert wrong["MLFLOW_TRACKING_PASSWORD"] not in result.stdout + result.stderr
    assert len(sweep_runs(env)) == before
