"""Where the stages read and write, and how they write: atomically.

Paths are those declared in dvc.yaml, taken relative to the repository root (DVC runs each
stage there) and made absolute, since Ray workers change directory.
Every output is written to a temporary file beside it and renamed into place, so an
interrupted stage never leaves a half-written file that DVC would cache.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota
CACHE_DIR = Path(os.environ.get("VAE_CACHE_DIR", Path.home() / ".cache" / "vae-mnist"))


# What a command run outside the project is told.
RUN_IN_PROJECT = "run vae in the project (the folder with params.yaml and dvc.yaml) or a folder inside it"


def project_root() -> Path:
    """The project the user is in: the nearest folder at or above the working directory that
    holds params.yaml and dvc.yaml, as git and DVC find their repositories (DVC runs each stage
    there; a user may be in models/). Where none does, the working directory itself, and the
    stages name the params.yaml they did not find."""
    here = Path.cwd().resolve()
    return next((folder for folder in (here, *here.parents)
                 if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file()), here)


def stores_root(root: Path) -> Path:
    """Where the stores of the project at root live: the repository the user works in. `dvc exp
    run --queue` and `--temp` run each experiment in a temporary copy under .dvc/tmp/exps/, deleted
    afterwards; DVC names the repository it came from in $DVC_ROOT (the repository itself
    for a run in the workspace)."""
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


class Layout:
    """The files of one project checkout, as absolute paths (the same names as dvc.yaml), and
    the stores every run of the project shares: the default MLflow store and Ray's checkpoints."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root else project_root()
        stores = self.root if root else stores_root(self.root)
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

    def folders(self) -> list[Path]:
        """The folders the stages write into, where they may have run out of room."""
        return [self.root, self.data_dir, self.model.parent, self.train_metrics.parent, self.train_plot.parent,
                self.mlflow_artifacts, self.ray_results]


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


class OutputError(OSError):
    """An output's folder that cannot be written into: read-only, not the user's, not a folder."""


@contextmanager
def _writable(path: Path) -> Iterator[None]:
    """Where an output's temporary file is made: a refusal there names the folder, in a line."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_ROOM:  # named by the CLI, with the free space
            raise
        raise OutputError(f"{path.parent}: cannot write {path.name} there ({e.strerror or e})") from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it."""
    path = Path(path)
    with _writable(path):
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
    with _writable(path):
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


def write_serialised(path: Path, dump: Callable[[BinaryIO], object]) -> None:
    """What dump(file) writes, written to path by Python: torch.save and np.save, given a real
    file, meet a full disk with errors that have lost the errno (a RuntimeError, a short write)."""
    buffer = io.BytesIO()
    dump(buffer)
    path.write_bytes(buffer.getbuffer())


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def no_room(error: BaseException, *places: Path | str) -> str | None:
    """For a write that met a full disk or quota, a line saying so with the free space of each
    of `places` (those on one filesystem named once); None for any other error."""
    if not (isinstance(error, OSError) and error.errno in NO_ROOM):
        return None
    free = {}
    for place in map(Path, places):
        try:
            free.setdefault(place.stat().st_dev, f"{_size(shutil.disk_usage(place).free)} free in {place}")
        except OSError:
            continue
    where = f" ({', '.join(free.values())})" if free else ""
    return f"{os.strerror(error.errno)}{where}; free some space and run it again"


def _size(count: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while count >= 1024 and len(units) > 1:
        count /= 1024
        units.pop(0)
    return f"{count:.0f} B" if units[0] == "B" else f"{count:.1f} {units[0]}"


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
