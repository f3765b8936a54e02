"""What the tests share besides fixtures (those are in conftest.py): running commands, project
copies in fresh git repositories, small training runs, and the checks of a pipeline's MLflow run."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "infra" / "local"))
import stack  # noqa: E402  (infra/local/stack.py: the servers and clusters, as `make up` starts them)

free_port = stack.free_port
# What a copy of the project needs to run its pipeline.
PROJECT_FILES = ["vae", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore"]


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 600):
    """Run a command, echoing its output into the test log; fail with that output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def unavailable(why: str) -> None:
    """What a test needs cannot be had on this machine: it skips, saying why; in CI it fails."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def system_program(path: str, package: str) -> str:
    """A program from a Debian package that `make test` installs when missing. Where that was
    impossible (not root, no apt) the test skips, naming the package; in CI it fails instead."""
    found = shutil.which(path)
    if not found:
        unavailable(f"needs {path} from the Debian package {package!r} (`make test` installs it when run as root)")
    return found


@contextmanager
def small_filesystem(path: Path, options: str = "size=256k"):
    """A real filesystem at path (a tmpfs: root's to mount) with mount `options`: to fill up, as
    a full disk or quota met mid-write, or read-only ("ro"). Unmounted afterwards."""
    if os.geteuid():
        unavailable("the test's filesystem is a tmpfs, which only root may mount")
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        unavailable(f"the test's filesystem is a tmpfs, and mounting one failed: {' '.join(mounted.stderr.split())}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def ray_nodes_possible() -> None:
    """Ray nodes of this project's Python: not from a path with a space (infra/local/stack.py)."""
    if why := stack.split_python():
        unavailable(why)


def empty_mlflow_store(path: Path) -> str:
    """A fresh MLflow SQLite store at path, its tables made: a copy of one made once per
    MLflow version (in the project's cache dir), since creating the tables takes MLflow's
    migrations 5 to 11 s here, for every test that needs a store of its own. Its URI."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.files import CACHE_DIR

    template = CACHE_DIR / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        making = template.with_suffix(f".{os.getpid()}.tmp")
        MlflowClient(f"sqlite:///{making}").search_experiments()
        making.replace(template)  # whole or absent, if tests make it at once
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@contextmanager
def mlflow_server_process(root: Path, backend_uri: str, s3: dict | None = None):
    """A real `mlflow server` on 127.0.0.1 with backend_uri as its store and artifacts in
    root (or with s3, in that server's bucket `mlflow`); yields its URL and the process
    (tests may stop it for good)."""
    try:
        url, server = stack.mlflow_server(root, backend_uri, s3=s3)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield url, server
    finally:
        stack.stop(server)


@contextmanager
def vae_serve(source: str, log_path: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    """A real `vae serve SOURCE` process on 127.0.0.1, once ready; yields its URL. Its log goes
    to a file (an unread pipe fills up and blocks the server mid-request); a traceback in it
    fails the test."""
    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(BIN / "vae"), "serve", source, "--port", str(port), *args], env=env, cwd=cwd,
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vae serve did not become ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log_path.read_text()  # no request made it crash


def git_env(**extra: str) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid", **extra}


def copy_project(repo: Path) -> Path:
    """A copy of the project in a fresh git repository, with DVC initialised as committed."""
    for name in PROJECT_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo, env=git_env())
    return repo


def spaced_project(tmp_path: Path, *names: str) -> Path:
    """The project as a user who cloned it into a folder with a space has it ("a space/project"):
    .venv and `names` linked, not copied. Its .venv/bin/python is then a path with a space."""
    root = tmp_path / "a space" / "project"
    root.mkdir(parents=True)
    for name in (".venv", *names):
        (root / name).symlink_to(ROOT / name)
    return root


def set_params(repo: Path, changes: dict) -> None:
    """Update sections of repo/params.yaml, as a user editing it would."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


# What tests train when the model's size is beside the point: seconds, not minutes.
SMALL_MODEL = {"latent_dim": 8, "hidden_dims": [128]}


def fit_in_folder(root: Path, mnist_dir: Path, model: dict = SMALL_MODEL, **train_params):
    """pipeline.train.fit() in a project folder (own MLflow store and Ray storage; a folder
    used before keeps its Ray storage, as a rerun would), with small data; returns the final
    training state."""
    from pipeline import tracking
    from pipeline.files import Layout
    from pipeline.params import Params
    from pipeline.train import fit

    if not (root / "data" / "mnist").exists():
        (root / "data").mkdir(parents=True)
        (root / "data" / "mnist").symlink_to(mnist_dir)
    layout = Layout(root)
    empty_mlflow_store(layout.mlflow_db)
    params = Params.model_validate({
        "data": {"val_size": 200, "max_train_images": train_params.pop("images", 640)},
        "model": model,
        "train": {"epochs": 1, "batch_size": 32, "num_workers": 2, **train_params}})
    return fit(layout, params, tracking.start_run(layout, params.flat(), {}))


# The run that both interruption tests (a killed worker, a killed `dvc repro`) must end with:
# PyTorch's example model, epochs long enough for a kill to land mid-run, each checkpointed
# (the tests kill right after epoch 1's).
INTERRUPTED_RUN = {"model": {"latent_dim": 20, "hidden_dims": [400]}, "images": 4800, "epochs": 3,
                   "batch_size": 32, "num_workers": 2, "checkpoint_seconds": 0}
TRAIN_KEYS = ("epochs", "batch_size", "num_workers", "checkpoint_seconds")  # INTERRUPTED_RUN's train section


def copy_repro(repo: Path, target: Path) -> Path:
    """A whole copy of a project after its `dvc repro` (outputs, DVC cache and git history), for
    a test that changes its params without disturbing the others that share the original."""
    shutil.copytree(repo, target, symlinks=True)
    return target


def check_pipeline_run(client, run_, repo: Path) -> None:
    """What one pipeline execution's MLflow run must hold, checked against the outputs in
    repo: status, lineage tags, params, per-epoch and test metrics, artifacts, registry."""
    run_id = run_.info.run_id
    assert run_.info.status == "FINISHED"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    tags, params = run_.data.tags, yaml.safe_load((repo / "params.yaml").read_text())
    assert tags["git.commit"] == head and tags["data.md5"] == lock["stages"]["fetch"]["outs"][0]["md5"]
    assert tags["env.uv_lock_sha256"] == hashlib.sha256((ROOT / "uv.lock").read_bytes()).hexdigest()
    assert tags["device"] == "cpu" and tags["ray.num_workers"] == str(params["train"]["num_workers"])
    assert run_.data.params["train.lr"] == str(params["train"]["lr"])
    assert run_.data.params["model.latent_dim"] == str(params["model"]["latent_dim"])
    epochs = params["train"]["epochs"]
    assert [m.step for m in client.get_metric_history(run_id, "val_neg_elbo")] == list(range(1, epochs + 1))
    assert any(key.startswith("system/cpu_utilization") for key in run_.data.metrics)
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert run_.data.metrics["test_neg_elbo"] == pytest.approx(evaluation["neg_elbo"])
    assert {"model", "training", "evaluation", "pipeline"} <= {a.path for a in client.list_artifacts(run_id)}
    assert {"training/train.json", "training/train.csv"} <= {a.path for a in client.list_artifacts(run_id, "training")}
    assert {f"evaluation/{name}" for name in ("eval.json", "traversal.png", "latent_map.png")} <= {
        a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"pipeline/params.yaml", "pipeline/dvc.lock", "pipeline/export.json"} <= {
        a.path for a in client.list_artifacts(run_id, "pipeline")}
    (version,) = client.search_model_versions(f"run_id = '{run_id}'")
    assert version.name == "vae-decoder" and logged_model(client, version).source_run_id == run_id


def bucket_keys(s3: dict, bucket: str, prefix: str = "") -> list[str]:
    """Every object key in an S3 bucket, read with boto3 straight from the server."""
    pages = stack.s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def logged_model(client, version):
    """The MLflow 3 logged model a registry version was made from (its source is
    models:/<model id>; the version's own model_id field comes back empty from a server)."""
    assert version.source.startswith("models:/m-"), version.source
    return client.get_logged_model(version.source.removeprefix("models:/"))
