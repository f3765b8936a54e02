"""pipeline/files.py: outputs are replaced whole or not at all."""
import errno

import pytest

from pipeline.files import (
    Layout,
    OutputError,
    StageFileError,
    atomic_dir,
    atomic_path,
    no_room,
    project_root,
    read_json,
    write_serialised,
)

from helpers import small_filesystem


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_atomic_dir_replaces_whole_directories(tmp_path):
    target = tmp_path / "repo"
    (target / "stale").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["stale"] and [p.name for p in tmp_path.iterdir()] == ["repo"]
    with atomic_dir(target) as tmp:
        (tmp / "fresh").write_text("x")
    assert [p.name for p in target.iterdir()] == ["fresh"] and [p.name for p in tmp_path.iterdir()] == ["repo"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_writer_killed_mid_write_leaves_the_old_output_and_its_litter_is_swept(tmp_path, kind):
    """A real SIGKILL mid-write: the output stays as it was (nothing partial for DVC to
    cache), and the next write sweeps up the temporary the killed writer left behind."""
    import subprocess
    import sys

    target = tmp_path / "out"
    target.mkdir() if kind == "dir" else target.write_text("old")
    opener = "atomic_dir" if kind == "dir" else "atomic_path"
    write = "(tmp / 'half').write_text('x')" if kind == "dir" else "tmp.write_text('half')"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from pipeline.files import {opener}
with {opener}({str(target)!r}) as tmp:
    {write}
    os.kill(os.getpid(), signal.SIGKILL)
"""])
    assert killed.returncode == -9
    litter = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(litter) == 1  # what SIGKILL left: no cleanup ran
    assert (list(target.iterdir()) == []) if kind == "dir" else target.read_text() == "old"
    with (atomic_dir if kind == "dir" else atomic_path)(target) as tmp:
        (tmp / "fresh").write_text("x") if kind == "dir" else tmp.write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stores_resolve_to_the_repository_dvc_names(tmp_path, monkeypatch):
    """In a `dvc exp run --queue/--temp` copy (cwd under .dvc/tmp/exps/), the MLflow store and
    Ray's checkpoints are the repository's, which DVC names in $DVC_ROOT; the outputs are the copy's."""
    repo, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    layout = Layout()
    assert layout.model == copy / "models/vae.pt" and layout.mlflow_db == repo / "mlflow.db"
    assert layout.ray_results == repo / ".ray_results" and layout.mlflow_artifacts == repo / "mlartifacts"
    monkeypatch.delenv("DVC_ROOT")
    assert Layout().mlflow_db == copy / "mlflow.db"  # outside DVC: the current directory


@pytest.mark.parametrize("text, message", [
    (None, "missing; `dvc repro` writes it"),
    ('{"run_id": ', "not JSON (Expecting value: line 1 column 12 (char 11)); `dvc repro` writes it again"),
    ("\xff", "not JSON ("),
    ('{"experiment": "vae-mnist"}', "has no 'run_id'; `dvc repro` writes it again"),
    ('["run_id"]', "has no 'run_id'"),
])
def test_a_file_one_stage_wrote_for_another_is_named_when_it_is_not_what_was_written(tmp_path, text, message):
    path = tmp_path / "mlflow_run.json"
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    with pytest.raises(StageFileError) as error:
        read_json(path, "run_id")
    assert str(error.value).startswith(f"{path}: {message}")
    path.write_text('{"run_id": "abc", "experiment": "vae-mnist"}')
    assert read_json(path, "run_id") == {"run_id": "abc", "experiment": "vae-mnist"}



def test_a_model_written_onto_a_full_disk_fails_with_its_errno_and_leaves_nothing(tmp_path):
    """torch.save given a path fails there with a RuntimeError that has lost the errno
    ("unexpected pos"); through write_serialised the error is the full disk's, which `vae` names in a line."""
    import torch

    with small_filesystem(tmp_path / "disk") as disk:
        with pytest.raises(OSError) as error, atomic_path(disk / "vae.pt") as tmp:
            write_serialised(tmp, lambda f: torch.save({"weights": torch.zeros(200_000)}, f))  # 800 KB onto 256 KiB
        assert error.value.errno == errno.ENOSPC and not list(disk.iterdir())
        line = no_room(error.value, tmp_path, disk)
        assert line.startswith("No space left on device (") and line.endswith("; free some space and run it again")
        assert f" free in {tmp_path}, " in line and f" free in {disk})" in line  # two filesystems, each named
    assert no_room(error.value, tmp_path, tmp_path.parent).count(" free in ") == 1  # one filesystem, named once
    assert no_room(OSError(errno.EACCES, "Permission denied"), tmp_path) is None


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, kind):
    """Read-only (a checkout on a read-only mount): the folder and the output, not mkstemp's
    traceback; the CLI prints it in a line."""
    with small_filesystem(tmp_path / "disk", "size=64k,ro") as disk:
        with pytest.raises(OutputError) as error, (atomic_dir if kind == "dir" else atomic_path)(disk / "out"):
            pass
    assert str(error.value) == f"{disk}: cannot write out there (Read-only file system)"


def test_the_project_is_found_from_a_folder_inside_it_and_stores_stay_in_it(tmp_path, monkeypatch):
    """As git and DVC find their repositories: the nearest folder above with params.yaml and
    dvc.yaml; with none, the working directory (whose missing params.yaml the stages name)."""
    inner = tmp_path / "project" / "models" / "triton"
    inner.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(inner)
    assert project_root() == inner  # no project above
    (tmp_path / "project" / "params.yaml").write_text("{}\n")
    assert project_root() == inner  # params.yaml alone is not a project
    (tmp_path / "project" / "dvc.yaml").write_text("{}\n")
    layout = Layout()
    assert project_root() == layout.root == tmp_path / "project"
    assert layout.model == tmp_path / "project/models/vae.pt" and layout.mlflow_db == tmp_path / "project/mlflow.db"
