"""pipeline/tracking.py against a real MLflow store: lineage tags and the champion rule."""
import subprocess

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.files import Layout


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_champion_moves_only_to_a_better_model(client, tmp_path):
    client.create_registered_model(tracking.REGISTERED_MODEL)

    def version(neg_elbo):
        source = tmp_path / f"model-{neg_elbo}"
        source.mkdir()
        v = client.create_model_version(tracking.REGISTERED_MODEL, str(source)).version
        return v, tracking.promote(client, v, neg_elbo)

    def alias(name):
        return client.get_model_version_by_alias(tracking.REGISTERED_MODEL, name).version

    first, promoted = version(105.0)
    assert promoted and alias("champion") == alias("candidate") == first
    worse, promoted = version(110.0)
    assert not promoted and alias("candidate") == worse and alias("champion") == first
    better, promoted = version(100.0)
    assert promoted and alias("champion") == alias("candidate") == better


def test_lineage_tags_name_commit_dirtiness_and_dvc_experiment(tmp_path, monkeypatch):
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@example.invalid",
                                  "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lion")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    tags = tracking.lineage_tags(Layout(tmp_path))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert tags == {"git.commit": head, "git.dirty": "false", "dvc.experiment": "lucky-lion", "dvc.baseline": "abc123"}


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    import os
    import sys
    from pathlib import Path

    from conftest import free_port

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([str(Path(sys.executable).parent / "vae"), "train"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert result.returncode == 2
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr
    assert not (tmp_path / ".ray_results").exists() and not (tmp_path / "models").exists()
