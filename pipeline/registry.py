"""The model registry: the exported graphs logged with MLflow's onnx flavor as one registered
model, MODEL_NAME, promoted to `champion` when it beats the current one, and fetched back by
`models:/` URI for serving.

One registered model holds all three graphs: the decoder is the flavor's model (its signature
z -> image, what `mlflow models serve` and pyfunc run), the encoder and the score graph travel
as the flavor's extra files. So one alias names one consistent set: three registered models
would need three alias moves, and a crash between them would pair one run's decoder with
another's encoder. MODEL_NAME, ENCODER_NAME and SCORE_NAME are also the names `vae serve` and
the Triton repository give the three graphs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path

from pipeline import environment, tracking
from pipeline.files import Layout

MODEL_NAME = "vae-decoder"
ENCODER_NAME, SCORE_NAME = "vae-encoder", "vae-score"
# Where the export stage's folder (models/) and a registered model version keep each graph.
FOLDER_FILES = ("decoder.onnx", "encoder.onnx", "score.onnx")
REGISTERED_FILES = ("model.onnx", "extra_files/encoder.onnx", "extra_files/score.onnx")


class GraphError(ValueError):
    """A file that should hold an ONNX graph and does not: cut short, corrupted, or something else."""


@dataclass(frozen=True)
class ModelFiles:
    """The export stage's graphs, as files or as bytes (a replica on another node): the
    decoder always; the encoder and the score graph where they were exported."""
    decoder: Path | bytes
    encoder: Path | bytes | None = None
    score: Path | bytes | None = None

    @classmethod
    def in_folder(cls, folder: Path, names: tuple[str, str, str] = FOLDER_FILES) -> "ModelFiles":
        """The three graphs in a folder by their names there; the encoder and score when present."""
        decoder, *others = (folder / name for name in names)
        return cls(decoder, *(path if path.is_file() else None for path in others))

    def read(self) -> "ModelFiles":
        """Each graph as one self-contained serialisation: weights an ONNX file keeps in an
        external data file beside it (as MLflow's flavor logged them by default) are inlined,
        since a session opened on bytes has no folder to look for them in."""
        return ModelFiles(*(_graph_bytes(f) if isinstance(f, Path) else f for f in astuple(self)))


def _graph_bytes(path: Path) -> bytes:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path)).SerializeToString()
    except DecodeError as e:
        raise GraphError(f"{path}: not an ONNX graph, cut short or corrupted ({e})") from None


# What loading the logged decoder needs, named rather than inferred, at uv.lock's versions:
# MLflow's inference reloads the model in a subprocess (6 s per export here), and lists both
# onnxruntime and onnxruntime-gpu for their one import name, two packages that must not be
# installed together.
DECODER_REQUIREMENTS = ("mlflow", "numpy", "onnx", "onnxruntime-gpu")


def log_graphs(layout: Layout, run_id: str, z, images) -> str:
    """Log the export stage's graphs into the run with MLflow's onnx flavor, the decoder as
    its model (signature and input example from z -> images), the encoder and the score graph
    as its extra files; registered as a new version of `vae-decoder`; returns the version.
    Each graph one file, as export wrote it: not the flavor's default of the weights apart."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from pipeline.serve.session import GPU_PROVIDERS  # here: the serving module imports this one

    mlflow.set_tracking_uri(tracking.tracking_uri(layout))
    requirements = environment.pinned(DECODER_REQUIREMENTS)
    with _mlflow_quiet(), mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(layout.decoder_onnx)), name="decoder", input_example=z,
                                     signature=infer_signature(z, images), registered_model_name=MODEL_NAME,
                                     pip_requirements=requirements, save_as_external_data=False,
                                     onnx_execution_providers=list(GPU_PROVIDERS),
                                     extra_files=[str(layout.encoder_onnx), str(layout.score_onnx)])
    return str(info.registered_model_version)


@contextlib.contextmanager
def _mlflow_quiet():
    """Logging the decoder without chatter that is not the user's concern (the loggers and the
    progress bars as they were after; onnxruntime's default severity, which has no getter, stays):
    - The flavor records the providers `vae serve` asks for (CUDA in float32, then CPU), so the
      model uses a GPU wherever it is loaded with one; MLflow's check of the input example then
      loads it here, where onnxruntime would log CUDA's absence as an error, and MLflow warn of
      it, before falling back to CPU. Export reports the providers in use itself.
    - A uv environment has no pip, whose version MLflow would write into the model's conda.yaml:
      it warns of that, though the requirements it needs are given here.
    - MLflow copies each extra file in with a "Downloading artifacts" progress bar of its own."""
    import onnxruntime
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BARS

    onnxruntime.set_default_logger_severity(4)
    quieted = [logging.getLogger(name) for name in ("mlflow.onnx", "mlflow.utils.environment")]
    levels = [logger.level for logger in quieted]
    bars = os.environ.get(BARS.name)
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    BARS.set(False)
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)
        if bars is None:
            BARS.unset()
        else:
            BARS.set(bars)


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


def bare_name_hint(source: str) -> str:
    """MLflow 3 reads `models:/NAME` as a logged model's id: a registered model's name alone
    is "not found". The hint says how to name one of its versions."""
    name = source.removeprefix("models:/")
    if "/" in name or "@" in name:
        return ""
    return f" (a registered model is served by version or alias: models:/{name}/1, models:/{name}@champion)"


def resolve(source: str) -> ModelFiles:
    """The graphs to serve: those of the registered model version a `models:/` URI names,
    fetched from the tracking server ($MLFLOW_TRACKING_URI, else this repository's mlflow.db);
    the export stage's folder (models/); or one decoder file, with the encoder and score
    graphs beside it when they are there."""
    if source.startswith("models:/"):
        import mlflow
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(tracking.tracking_uri(Layout()))
        # Held in memory, the download removed: each start would otherwise leave a copy behind.
        with tempfile.TemporaryDirectory(prefix="vae-model-") as download:
            try:
                folder = Path(download_artifacts(artifact_uri=source, dst_path=download))
            except MlflowException as e:
                raise LookupError(f"{source}: {e.message}{bare_name_hint(source)}") from None
            return ModelFiles.in_folder(folder, REGISTERED_FILES).read()
    path = Path(source)
    if path.is_dir():
        if not (path / FOLDER_FILES[0]).is_file():
            raise FileNotFoundError(f"{source}: no {FOLDER_FILES[0]} in this folder (run `make repro` to export one)")
        return ModelFiles.in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such ONNX model (run `make repro` to export one)")
    return ModelFiles.in_folder(path.parent, (path.name, *FOLDER_FILES[1:]))
