"""pipeline/registry.py: the champion rule, against a real MLflow store."""
import pytest
from mlflow import MlflowClient

from pipeline import registry

from helpers import empty_mlflow_store


@pytest.fixture
def client(tmp_path):
    return MlflowClient(empty_mlflow_store(tmp_path / "mlflow.db"))


def test_champion_moves_only_to_a_better_model(client, tmp_path):
    client.create_registered_model(registry.MODEL_NAME)

    def version(neg_elbo):
        source = tmp_path / f"model-{neg_elbo}"
        source.mkdir()
        v = client.create_model_version(registry.MODEL_NAME, str(source)).version
        return v, registry.promote(client, v, neg_elbo)

    def alias(name):
        return client.get_model_version_by_alias(registry.MODEL_NAME, name).version

    first, promoted = version(105.0)
    assert promoted and alias("champion") == alias("candidate") == first
    worse, promoted = version(110.0)
    assert not promoted and alias("candidate") == worse and alias("champion") == first
    better, promoted = version(100.0)
    assert promoted and alias("champion") == alias("candidate") == better
