"""The model registry: the exported decoder logged with MLflow's onnx flavor, registered as
MODEL_NAME, promoted to `champion` when it beats the current one, and fetched back by
`models:/` URI for serving. MODEL_NAME is also the name `vae serve`, Ray Serve and the
Triton repository give the model.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline import environment, tracking
from pipeline.files import Layout

MODEL_NAME = "vae-decoder"


# What loading the logged decoder needs, named rather than inferred, at uv.lock's versions:
# MLflow's inference reloads the model in a subprocess (6 s per export here), and lists both
# onnxruntime and onnxruntime-gpu for their one import name, two packages that must not be
# installed together.
DECODER_REQUIREMENTS = ("mlflow", "numpy", "onnx", "onnxruntime-gpu")


def log_decoder(layout: Layout, run_id: str, onnx_path: Path, z, images) -> str:
    """Log the ONNX decoder with MLflow's onnx flavor (signature and input example from z ->
    images) into the run, registered as a new version of `vae-decoder`; returns the version."""
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    # The flavor records MLflow's default providers (CUDA, then CPU), so the model uses a GPU
    # wherever it is loaded with one; MLflow's check of the input example then loads it here,
    # where onnxruntime would log CUDA's absence as an error, and MLflow warn of it, before
    # falling back to CPU. Export reports the providers in use itself.
    # And a uv environment has no pip, whose version MLflow would write into the model's
    # conda.yaml: it warns of that, though the requirements it needs are given here.
    onnxruntime.set_default_logger_severity(4)
    quieted = [logging.getLogger(name) for name in ("mlflow.onnx", "mlflow.utils.environment")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    mlflow.set_tracking_uri(tracking.tracking_uri(layout))
    requirements = environment.pinned(DECODER_REQUIREMENTS)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="decoder", input_example=z,
                                         signature=infer_signature(z, images), registered_model_name=MODEL_NAME,
                                         pip_requirements=requirements)
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)
    return str(info.registered_model_version)


def promote(client, version: str, neg_elbo: float) -> bool:
    """Alias the new version `candidate`; move `champion` to it only when its test -ELBO beats
    the current champion's. Returns whether it became the champion."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(MODEL_NAME, version, "test_neg_elbo", str(neg_elbo))
    client.set_registered_model_alias(MODEL_NAME, "candidate", version)
    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
        best = float(champion.tags.get("test_neg_elbo", "inf"))
    except MlflowException:  # no champion yet
        best = float("inf")
    if neg_elbo >= best:
        return False
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    return True


def resolve(source: str) -> Path:
    """An ONNX file: the path itself, or the registered model a `models:/` URI names, fetched
    from the tracking server ($MLFLOW_TRACKING_URI, else this repository's mlflow.db)."""
    if source.startswith("models:/"):
        import mlflow
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(tracking.tracking_uri(Layout()))
        try:
            return Path(download_artifacts(artifact_uri=source)) / "model.onnx"
        except MlflowException as e:
            raise LookupError(f"{source}: {e.message}") from None
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such ONNX model (run `make repro` to export one)")
    return Path(source)
