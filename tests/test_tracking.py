"""pipeline/tracking.py against real MLflow stores and servers: lineage tags, the champion
rule, and a tracking server that is unreachable at the start or goes away mid-run."""
import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import tracking
from pipeline.files import Layout

from helpers import BIN, ROOT, empty_mlflow_store, free_port, mlflow_server_process, stack


def test_lineage_tags_name_commit_dirtiness_and_dvc_experiment(tmp_path, monkeypatch):
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@example.invalid",
                                  "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lion")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    tags = tracking.lineage_tags(Layout(tmp_path))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    lock = hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()  # the environment's, not the folder's
    assert tags == {"git.commit": head, "git.dirty": "false", "env.uv_lock_sha256": lock,
                    "dvc.experiment": "lucky-lion", "dvc.baseline": "abc123", "sweep": "baseline-abc123"}
    monkeypatch.setenv("VAE_SWEEP", "lr-grid")  # a sweep named by the user
    assert tracking.lineage_tags(Layout(tmp_path))["sweep"] == "lr-grid"


def test_the_browse_hint_is_a_command_a_shell_runs_from_a_path_with_a_space(monkeypatch, tmp_path):
    """`vae summary` prints it to be pasted; unquoted, the shell split the store's path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "My Projects" / "vae"
    hint = tracking.browse_hint(Layout(root))
    assert shlex.split(hint) == ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"], hint


def test_credentials_in_a_tracking_uri_are_hidden_wherever_the_uri_is_shown(monkeypatch):
    uri = "https://alice:s3cr%40t@mlflow.example.com:5000/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    said = tracking.hide_credentials(f"API request to {uri}api/2.0/mlflow/runs/create failed")
    assert said == "API request to https://***@mlflow.example.com:5000/api/2.0/mlflow/runs/create failed"
    assert tracking.browse_hint(Layout()) == "open https://***@mlflow.example.com:5000/ in a browser"
    assert tracking.hide_credentials("https://token@host/x", "https://token@host") == "https://***@host/x"
    for plain in ("http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db"):  # nothing to hide
        assert tracking.hide_credentials(f"at {plain}", plain) == f"at {plain}"


def test_a_run_on_a_server_named_with_credentials_is_reached_and_records_none_of_them(tmp_path, monkeypatch,
                                                                                       mlflow_server):
    """MLflow's client sends a URI's user and password as basic auth, and so does the reachability
    check (urllib's took the user for part of the host name: "unreachable"). models/mlflow_run.json,
    a DVC output pushed to the remote, must not carry the password."""
    with_credentials = mlflow_server.replace("http://", "http://alice:s3cret@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials)
    tracking.require_reachable(with_credentials)
    layout = Layout(tmp_path)
    run_id = tracking.start_run(layout, {"train.epochs": 1}, {})
    recorded = layout.mlflow_run.read_text()
    assert run_id in recorded and "s3cret" not in recorded and "alice:***@" not in recorded
    assert mlflow_server.replace("http://", "http://***@") in recorded


@pytest.mark.integration  # starts `vae serve`
def test_an_error_naming_the_tracking_uri_prints_no_password(tmp_path):
    """MLflow's own errors name the URL they asked, credentials included: `vae` hides them."""
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = subprocess.run([str(BIN / "vae"), "serve", "models:/vae-decoder@champion"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "s3cret" not in result.stdout + result.stderr
    assert uri.replace("alice:s3cret@", "***@") in result.stderr  # MLflow's message, still naming the server


@pytest.mark.integration  # starts `vae evaluate`
def test_a_stage_after_train_finds_the_server_still_gone_in_one_line(tmp_path):
    """evaluate and export open train's run: on a server that does not answer, they fail as
    train does, naming it, not with MLflow's retries and traceback."""
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/mlflow_run.json").write_text('{"run_id": "0123", "experiment": "vae-mnist"}')
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([str(BIN / "vae"), "evaluate"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"vae evaluate: error: MLflow tracking server {uri} is unreachable")


def test_an_unexpected_error_keeps_its_traceback_without_the_password(monkeypatch, capsys, signals_kept):
    """An error the CLI does not name (a bug, or a library's error it did not foresee, such as
    MLflow's after a server goes away mid-stage) prints its traceback, password hidden."""
    from pipeline import cli, environment

    uri = "https://alice:s3cret@mlflow.example.com"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def unforeseen():
        raise RuntimeError(f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed")

    monkeypatch.setattr(environment, "describe", unforeseen)
    assert cli.main(["env"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in unforeseen" in err
    assert "s3cret" not in err and "RuntimeError: API request to https://***@mlflow.example.com/api/" in err


@pytest.mark.integration  # starts `vae train`
def test_unreachable_tracking_server_fails_before_training(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([str(Path(sys.executable).parent / "vae"), "train"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert result.returncode == 2
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr
    assert not (tmp_path / ".ray_results").exists() and not (tmp_path / "models").exists()


def test_server_lost_mid_run_costs_a_warning_not_the_training(tmp_path, mnist_dir, ray_address):
    """The server answers when `vae train` creates the run, then goes away for good before
    the first epoch is logged: training finishes, warns once per process, writes its outputs."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/mnist").symlink_to(mnist_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"val_size": 200, "max_train_images": 600},
        "train": {"epochs": 2, "batch_size": 64, "num_workers": 2}}))
    (tmp_path / "server").mkdir()
    store = empty_mlflow_store(tmp_path / "server" / "mlflow.db")
    with mlflow_server_process(tmp_path / "server", store) as (url, server):
        # No client retries: what is under test is what happens once they are spent.
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "RAY_ADDRESS": ray_address,
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        with open(tmp_path / "train.log", "w") as log:
            train = subprocess.Popen([str(BIN / "vae"), "train"], cwd=tmp_path, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (tmp_path / "models/mlflow_run.json").exists():  # written once the run exists
            assert train.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.1)
        stack.stop(server)
        returncode = train.wait(timeout=300)
    out = (tmp_path / "train.log").read_text()
    assert returncode == 0, out
    assert "WARNING: MLflow stopped answering while logging epoch 1's metrics" in out  # rank 0's worker
    assert out.count("WARNING: MLflow stopped answering") == 2, out  # and once more in the driver
    checkpoint = torch.load(tmp_path / "models/vae.pt", weights_only=True)
    assert set(checkpoint) == {"state_dict", "config"}
    assert yaml.safe_load((tmp_path / "metrics/train.json").read_text())["epochs"] == 2
    assert len((tmp_path / "plots/train.csv").read_text().splitlines()) == 3


def test_stages_after_a_restored_train_share_one_run_naming_the_original(tmp_path, monkeypatch):
    """models/mlflow_run.json names a run the store does not hold (train restored from DVC's
    cache, or run elsewhere): evaluate opens a run that names it, and export logs into the same."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-tern")
    layout = Layout(tmp_path)
    layout.mlflow_run.parent.mkdir()
    layout.mlflow_run.write_text('{"run_id": "0123456789abcdef"}')
    client, evaluate_run = tracking.open_run(layout)
    _, export_run = tracking.open_run(layout)
    assert export_run == evaluate_run
    tags = client.get_run(evaluate_run).data.tags
    assert tags["model.origin_run"] == "0123456789abcdef" and tags["dvc.experiment"] == "tidy-tern"
    monkeypatch.setenv("DVC_EXP_NAME", "other-exp")  # another experiment's stages: a run of their own
    assert tracking.open_run(layout)[1] != evaluate_run
