"""`dvc exp run` against the infra/ topology brought up by `make up` on 127.0.0.1: an MLflow
server whose store is PostgreSQL, and a 2-node Ray cluster. Each experiment is one
complete run tagged with its name, stored in PostgreSQL and trained on both Ray nodes; an
experiment that DVC restores from its run-cache adds nothing to MLflow: no run, no model
version."""
import json
import re

import pytest
import sqlalchemy
from mlflow import MlflowClient

from helpers import SMALL_MODEL, check_pipeline_run, copy_project, git_env, logged_model, run, set_params

LEARNING_RATES = ("0.002", "0.003")


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, mnist_dir, local_stack):
    """Two experiments run with `dvc exp run -S train.lr=...` from one committed baseline;
    the project, its environment, and each learning rate's experiment name and run id."""
    repo = copy_project(tmp_path_factory.mktemp("experiments") / "project")
    set_params(repo, {"data": {"source": str(mnist_dir), "val_size": 200, "max_train_images": 300},
                      "model": SMALL_MODEL, "train": {"epochs": 1, "num_workers": 2, "batch_size": 64},
                      "eval": {"max_test_images": 100, "iwae_k": 2, "grid_images": 8}})
    env = git_env(**local_stack)
    run(["git", "commit", "-qam", "small params"], repo, env=env)
    names, run_ids = {}, {}
    for lr in LEARNING_RATES:
        out = run(["dvc", "exp", "run", "-S", f"train.lr={lr}"], repo, env=env).stdout
        names[lr] = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        run_ids[lr] = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
        assert json.loads((repo / "metrics/train.json").read_text())["ray_nodes"] == 2  # both of the stack's nodes
    return repo, env, names, run_ids


def test_each_experiment_is_one_run_tagged_with_its_name(experiments):
    repo, env, names, run_ids = experiments
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids.values())
    baseline = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    for lr in LEARNING_RATES:
        tags = client.get_run(run_ids[lr]).data.tags
        assert tags["dvc.experiment"] == names[lr] and tags["dvc.baseline"] == baseline
        assert client.get_run(run_ids[lr]).data.params["train.lr"] == lr
    shown = run(["dvc", "exp", "show", "--json"], repo, env=env).stdout  # both, with their metrics
    assert all(name in shown for name in names.values()) and "metrics/eval.json" in shown
    # The workspace holds the last experiment's outputs: its run must hold all of them.
    check_pipeline_run(client, client.get_run(run_ids[LEARNING_RATES[-1]]), repo)


def test_runs_and_models_are_stored_in_postgresql(experiments):
    _, env, _, run_ids = experiments
    engine = sqlalchemy.create_engine(env["VAE_STACK_POSTGRES"])
    try:
        with engine.connect() as db:
            rows = db.execute(sqlalchemy.text("SELECT run_uuid, status FROM runs")).all()
            versions = db.execute(sqlalchemy.text("SELECT run_id FROM model_versions WHERE name = 'vae-decoder'")).all()
    finally:
        engine.dispose()
    assert sorted(rows) == sorted((run_id, "FINISHED") for run_id in run_ids.values())
    assert sorted(v.run_id for v in versions) == sorted(run_ids.values())


def test_an_experiment_restored_from_the_run_cache_adds_nothing_to_mlflow(experiments):
    """Back to the first learning rate: every stage is restored from DVC's run-cache, and the
    restored models/mlflow_run.json names the run that logged and registered that model."""
    repo, env, _, run_ids = experiments
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name("vae-mnist").experiment_id
    out = run(["dvc", "exp", "run", "-S", f"train.lr={LEARNING_RATES[0]}"], repo, env=env).stdout
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run" in out
    assert "Running stage" not in out
    assert len(client.search_runs([experiment_id])) == len(run_ids)
    versions = client.search_model_versions("name = 'vae-decoder'")
    assert len(versions) == len(run_ids)
    for version in versions:  # no registry entry points at a model that was not logged
        assert logged_model(client, version).source_run_id == version.run_id
    restored = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    assert restored == run_ids[LEARNING_RATES[0]]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert client.get_run(restored).data.metrics["test_neg_elbo"] == pytest.approx(evaluation["neg_elbo"])
