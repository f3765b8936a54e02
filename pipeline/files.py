"""Where the stages read and write, and how they write: atomically.

Paths are those declared in dvc.yaml, taken relative to the repository root (DVC runs each
stage there) and made absolute, since Ray workers change directory.
Every output is written to a temporary file beside it and renamed into place, so an
interrupted stage never leaves a half-written file that DVC would cache.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE_DIR = Path(os.environ.get("VAE_CACHE_DIR", Path.home() / ".cache" / "vae-mnist"))


def stores_root() -> Path:
    """Where the project's stores live: the repository the user works in. `dvc exp run
    --queue` and `--temp` run each experiment in a temporary copy under .dvc/tmp/exps/, deleted
    afterwards; DVC names the repository it came from in $DVC_ROOT (the repository itself
    for a run in the workspace)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


class Layout:
    """The files of one project checkout, as absolute paths (the same names as dvc.yaml), and
    the stores every run of the project shares: the default MLflow store and Ray's checkpoints."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or Path.cwd()).resolve()
        stores = self.root if root else stores_root()
        self.data_dir = self.root / "data" / "mnist"
        self.model = self.root / "models" / "vae.pt"
        self.mlflow_run = self.root / "models" / "mlflow_run.json"
        self.decoder_onnx = self.root / "models" / "decoder.onnx"
        self.encoder_onnx = self.root / "models" / "encoder.onnx"
        self.score_onnx = self.root / "models" / "score.onnx"
        self.train_metrics = self.root / "metrics" / "train.json"
        self.eval_metrics = self.root / "metrics" / "eval.json"
        self.export_metrics = self.root / "metrics" / "export.json"
        self.triton_repo = self.root / "models" / "triton"
        self.train_plot = self.root / "plots" / "train.csv"
        self.recon_plot = self.root / "plots" / "reconstructions.png"
        self.samples_plot = self.root / "plots" / "samples.png"
        self.traversal_plot = self.root / "plots" / "traversal.png"
        self.latent_plot = self.root / "plots" / "latent_map.png"
        self.latent_stats = self.root / "models" / "latent.json"
        self.ray_results = stores / ".ray_results"
        self.mlflow_db = stores / "mlflow.db"
        self.mlflow_artifacts = stores / "mlartifacts"
        self.registry_lock = stores / ".vae-registry.lock"
        self.train_locks = stores / ".vae-train-locks"  # one per Ray run: pipeline/train.py's run_lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sweep(path: Path) -> None:
    """Remove what a writer of `path` killed mid-write (SIGKILL skips every cleanup) left
    beside it. Safe: DVC runs one stage at a time per repository."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class StageFileError(ValueError):
    """A file one stage wrote for a later one is missing, not JSON, or lacks what it holds."""


def read_json(path: Path, *keys: str) -> dict:
    """The JSON object a stage wrote at path, with at least `keys` in it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageFileError(f"{path}: missing; `dvc repro` writes it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageFileError(f"{path}: not JSON ({e}); `dvc repro` writes it again") from None
    missing = [key for key in keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise StageFileError(f"{path}: has no {', '.join(map(repr, missing))}; `dvc repro` writes it again")
    return value
