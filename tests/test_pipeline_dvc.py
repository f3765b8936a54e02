"""The whole pipeline, for real: `dvc repro` in a fresh git repository holding a copy of
the project, with tiny params (a few hundred images, one epoch, two Ray workers)."""
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from pipeline import environment
from pipeline.evaluate import test_set as evaluated_test_images
from pipeline.files import Layout
from pipeline.params import load_params
from vae.model import VAE
from vae.objectives import iwae_log_lik

from helpers import (
    ROOT,
    bucket_keys,
    check_pipeline_run,
    copy_project,
    copy_repro,
    free_port,
    git_env,
    logged_model,
    run,
    set_params,
    system_program,
    vae_serve,
)

TINY = {
    "data": {"source": "pypi", "val_size": 200, "max_train_images": 300},
    "model": {"latent_dim": 20, "hidden_dims": [400]},
    # Two points, a loss curve; DReG's gradient hook through DDP on two Ray workers.
    "train": {"epochs": 2, "num_workers": 2, "batch_size": 64, "iwae_k": 2, "grad_estimator": "dreg"},
    "eval": {"max_test_images": 200, "iwae_k": 5, "grid_images": 16},
    "export": {"score_k": 5},  # the served score with the evaluate stage's k
}


def declared_outputs(repo) -> list[str]:
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


@pytest.fixture(scope="module")
def repro(tmp_path_factory, ray_address, mlflow_server):
    """A project copy after one full `dvc repro` against a real MLflow tracking server
    (shared by this module's tests), and its log."""
    project = copy_project(tmp_path_factory.mktemp("dvc") / "project")
    set_params(project, TINY)
    env = git_env(RAY_ADDRESS=ray_address, MLFLOW_TRACKING_URI=mlflow_server)
    result = run(["dvc", "repro"], project, env=env)
    return project, env, result.stdout + result.stderr


def test_every_stage_ran_and_every_declared_output_exists(repro):
    repo, _, log = repro
    for stage in ("fetch", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in log
    for path in declared_outputs(repo):
        target = repo / path
        assert target.exists(), f"{path} declared in dvc.yaml but not written"
        assert target.is_dir() or target.stat().st_size > 0
    assert not list(repo.rglob("*.tmp")), "a temporary file was left behind"
    assert f"evaluate on {'GPU' if torch.cuda.is_available() else 'CPU'}: 100%" in log  # where it ran, reported
    assert "Browse the run:" in log and "Serve the model (decoder, encoder, score):\n  vae serve models/" in log
    assert "Traceback" not in log, log  # Ray stays quiet (no dashboard, no placement-group cleaner noise)
    assert "failed to initialize" not in log, log  # nor MLflow about the CUDA provider a CPU machine lacks
    assert "INFO mlflow" not in log and "WARNING mlflow" not in log, log  # nor MLflow's chatter
    assert "Downloading artifacts" not in log and "UserWarning" not in log, log  # nor export's
    assert log.count("Browse the run:") == 1  # the summary, once


def test_outputs_hold_what_they_should(repro):
    repo, _, _ = repro
    model = VAE.load(repo / "models/vae.pt")
    assert model.config.latent_dim == 20 and model.config.hidden_dims == (400,)

    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["epochs"] == 2 and math.isfinite(train["val_neg_elbo"])
    assert train["ray_nodes"] == 2 and train["device"] == "cpu"  # the two workers spanned both nodes
    rows = (repo / "plots/train.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_neg_elbo") and len(rows) == 3

    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["test_images"] == 200 and ev["iwae_k"] == 5
    assert ev["neg_elbo"] == pytest.approx(ev["recon"] + ev["kl"])
    assert 0 < ev["nll_iwae"] < 800 and ev["kl"] > 0
    with Image.open(repo / "plots/reconstructions.png") as recon, Image.open(repo / "plots/samples.png") as samples:
        assert recon.format == samples.format == "PNG"
        assert recon.size[1] > samples.size[1]  # inputs above outputs: twice the rows

    session = ort.InferenceSession(str(repo / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    (images,) = session.run(None, {"z": z})
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    triton = repo / "models/triton/vae-decoder"
    assert (triton / "1/model.onnx").read_bytes() == (repo / "models/decoder.onnx").read_bytes()
    config = (triton / "config.pbtxt").read_text()
    assert 'name: "vae-decoder"' in config and "max_batch_size: 1024" in config
    assert 'name: "z", data_type: TYPE_FP32, dims: [ 20 ]' in config
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["worst_abs_diff"] <= 1e-5 and set(export["max_abs_diff"]) == {"1", "256"}
    # The encoder and the score graph beside the decoder, checked by the stage and in Triton's repository.
    assert export["encoder"]["worst_abs_diff"] <= 1e-5 and export["score"]["worst_abs_diff"] <= 1e-5
    assert {p.name for p in (repo / "models/triton").iterdir()} == {"vae-decoder", "vae-encoder", "vae-score"}
    x = (np.random.default_rng(1).random((3, 784)) > 0.5).astype(np.float32)
    encoder = ort.InferenceSession(str(repo / "models/encoder.onnx"), providers=["CPUExecutionProvider"])
    mu, logvar = encoder.run(None, {"x": x})
    assert mu.shape == logvar.shape == (3, 20)
    score = ort.InferenceSession(str(repo / "models/score.onnx"), providers=["CPUExecutionProvider"])
    eps = np.random.default_rng(2).standard_normal((3, export["score_k"], 20)).astype(np.float32)
    (scores,) = score.run(None, {"x": x, "eps": eps})
    assert scores.shape == (3,) and np.isfinite(scores).all() and (scores > 0).all()  # nats of -L_k


def test_one_mlflow_run_with_lineage(repro):
    from mlflow import MlflowClient

    repo, env, _ = repro
    recorded = json.loads((repo / "models/mlflow_run.json").read_text())
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert recorded["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
    experiment = client.get_experiment_by_name("vae-mnist")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [recorded["run_id"]]
    assert runs[0].data.tags["git.dirty"] == "true"  # params.yaml edited
    check_pipeline_run(client, runs[0], repo)


def test_decoder_registered_with_onnx_flavor_and_aliases(repro, monkeypatch, tmp_path):
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    repo, env, _ = repro
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("vae-decoder", "champion")
    candidate = client.get_model_version_by_alias("vae-decoder", "candidate")
    assert champion.version == candidate.version == "1"
    assert champion.run_id == json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    # Not mlflow.set_tracking_uri: it also sets the variable for the rest of the session.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # MLflow's downloads below stay there
    model = mlflow.pyfunc.load_model("models:/vae-decoder@champion")
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 20]
    # Loaded where a GPU is usable, on CUDA in float32, as `vae serve` runs it (TF32 is CUDA's default).
    assert model.metadata.flavors["onnx"]["providers"] == [["CUDAExecutionProvider", {"use_tf32": "0"}],
                                                         "CPUExecutionProvider"]
    images = model.predict(np.zeros((2, 20), dtype=np.float32))
    # One file, as export wrote it: no weights apart, which a graph sent as bytes would lose.
    logged = [a.path for a in mlflow.artifacts.list_artifacts("models:/vae-decoder@champion")]
    assert "model.onnx" in logged and not [path for path in logged if path.endswith(".data")], logged
    assert np.asarray(images["image"] if isinstance(images, dict) else images).shape == (2, 1, 28, 28)
    # The environment it records: what the decoder loads with, pinned at uv.lock's versions;
    # onnxruntime-gpu alone, as this project installs it.
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/vae-decoder@champion")).read_text().split()
    locked = environment.locked_packages()
    assert requirements == [f"{name}=={locked[name]}" for name in ("mlflow", "numpy", "onnx", "onnxruntime-gpu")]


def test_the_runs_artifacts_and_the_registered_model_are_in_the_s3_bucket(repro, s3):
    """The MLflow server stores artifacts in the S3 bucket (--artifacts-destination s3://):
    read the bucket itself, not MLflow's view of it."""
    from mlflow import MlflowClient

    repo, env, _ = repro
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    champion = client.get_model_version_by_alias("vae-decoder", "champion")
    keys = bucket_keys(s3, "mlflow")
    for artifact in ("evaluation/eval.json", "training/train.json", "model/vae.pt", "pipeline/dvc.lock"):
        assert any(f"/{run_id}/artifacts/{artifact}" in key for key in keys), (artifact, keys)
    model_id = logged_model(client, champion).model_id
    assert any(f"/models/{model_id}/artifacts/" in key and key.endswith(".onnx") for key in keys), keys


def test_second_repro_runs_nothing(repro):
    repo, env, _ = repro
    again = run(["dvc", "repro"], repo, env=env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout


def test_dvc_shows_metrics_params_and_plots(repro, tmp_path):
    repo, env, _ = repro
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env=env).stdout)[""]["data"]
    assert {"metrics/train.json", "metrics/eval.json", "metrics/export.json"} <= set(shown)
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert shown["metrics/eval.json"]["data"]["neg_elbo"] == evaluation["neg_elbo"]
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env=env).stdout)  # HEAD has none yet
    assert diff["metrics/eval.json"]["neg_elbo"]["new"] == evaluation["neg_elbo"]
    changed = json.loads(run(["dvc", "params", "diff", "--json"], repo, env=env).stdout)["params.yaml"]
    assert changed["train.epochs"]["old"] == 30 and changed["train.epochs"]["new"] == 2  # TINY, not committed
    assert changed["train.grad_estimator"] == {"old": "iwae", "new": "dreg"}
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo, env=env)
    assert "train_neg_elbo" in (tmp_path / "plots/index.html").read_text()  # the training curves
    pictures = {p.name.removeprefix("workspace_plots_") for p in (tmp_path / "plots/static").iterdir()}
    assert pictures == {"reconstructions.png", "samples.png", "traversal.png", "latent_map.png"}


# The README's commands that only read the pipeline's state: run as written, on this run.
READ_ONLY = [("exp", "show"), ("metrics", "show"), ("metrics", "diff"), ("params", "diff"), ("plots", "show"),
             ("queue", "status")]


def test_the_readmes_read_only_dvc_commands_run_on_the_pipelines_state(repro):
    from test_readme import COMMANDS

    repo, env, _ = repro
    ran = 0
    for line, words in COMMANDS:
        if words[0] == "dvc" and tuple(words[1:3]) in READ_ONLY:
            done = run(words, repo, env=env, check=False)
            assert done.returncode == 0, f"{line} `{' '.join(words)}`: {done.stdout}{done.stderr}"
            ran += 1
    assert ran >= len(READ_ONLY)  # the compact `dvc exp show` too
    assert "train_neg_elbo" in (repo / "dvc_plots/index.html").read_text()


def test_push_to_s3_then_pull_in_a_fresh_clone_restores_everything_without_rerunning(repro, tmp_path, s3):
    """The default remote pointed at a bucket of the S3 server (`dvc remote modify --local`,
    as the README says): endpoint and keys come from the environment, nothing of them is
    written into the repository."""
    repo, env, _ = repro
    env = {**env, **s3}
    remote = f"s3://dvc/{tmp_path.name}"
    run(["dvc", "remote", "modify", "--local", "storage", "url", remote], repo, env=env)
    run(["git", "add", "-A"], repo, env=env)
    run(["git", "commit", "-qm", "results"], repo, env=env)
    run(["dvc", "push"], repo, env=env)
    assert len(bucket_keys(s3, "dvc", tmp_path.name)) >= 10  # the data set, the model, its pictures
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env=env)
    run(["dvc", "remote", "modify", "--local", "storage", "url", remote], clone, env=env)
    run(["dvc", "pull"], clone, env=env)
    for path in ("models/vae.pt", "models/decoder.onnx", "data/mnist/t10k-images-idx3-ubyte", "metrics/eval.json"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env=env).stdout
    assert "Running stage" not in run(["dvc", "repro"], clone, env=env).stdout
    committed = run(["git", "grep", "-I", "-l", s3["AWS_SECRET_ACCESS_KEY"]], repo, env=env, check=False)
    assert committed.returncode == 1 and s3["AWS_SECRET_ACCESS_KEY"] not in (repo / ".dvc/config").read_text()


def stages_run(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


def test_an_export_param_reruns_export_only(repro, tmp_path):
    repo, env = copy_repro(repro[0], tmp_path / "project"), repro[1]
    set_params(repo, {"export": {"parity_batches": [1, 64]}})
    assert stages_run(run(["dvc", "repro"], repo, env=env).stdout) == ["export"]


def test_a_stage_killed_mid_write_leaves_nothing_partial_and_repro_recovers(repro, tmp_path):
    """A changed eval param reruns evaluate and export only. evaluate writes its pictures
    first and metrics/eval.json last: SIGKILL `dvc repro` (and the stage) between the two.
    Nothing half-written remains, dvc.lock still holds evaluate's last complete run, and
    the next `dvc repro` finishes the job."""
    repo, env = copy_repro(repro[0], tmp_path / "project"), repro[1]
    first, last = repo / "plots/reconstructions.png", repo / "metrics/eval.json"
    before = first.stat().st_mtime_ns
    evaluate_locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["evaluate"]
    set_params(repo, {"eval": {"iwae_k": TINY["eval"]["iwae_k"] * 2}})  # a new eval.json: export reruns too
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 300
    while not (first.exists() and first.stat().st_mtime_ns != before):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert stages_run((tmp_path / "killed.log").read_text()) == ["evaluate"]
    assert not last.exists() or json.loads(last.read_text())["test_images"] == 200  # whole, or not there
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["evaluate"] == evaluate_locked
    assert "evaluate" in run(["dvc", "status"], repo, env=env).stdout
    assert stages_run(run(["dvc", "repro"], repo, env=env).stdout) == ["evaluate", "export"]
    assert json.loads(last.read_text())["iwae_k"] == TINY["eval"]["iwae_k"] * 2  # the new evaluation, whole
    assert not list(repo.rglob("*.tmp")), "the killed writer's temporary files were not swept"
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env=env).stdout


@pytest.mark.integration  # a `dvc repro` whose train fails
def test_a_failed_repro_leaves_no_output_for_git_add(tmp_path, mnist_dir):
    """DVC takes back the .gitignore entries of the stages that ran when a later one fails, and a
    rerun that skips them writes none: MNIST (55 MB) was left for `git add -A`. The project's
    .gitignore names every cached output (treeverse/dvc#11091)."""
    repo = copy_project(tmp_path / "project")
    set_params(repo, {"data": {"source": str(mnist_dir)}, "train": {"ray_address": f"127.0.0.1:{free_port()}"}})
    env = {k: v for k, v in git_env().items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    failed = run(["dvc", "repro"], repo, env=env, check=False)
    assert failed.returncode != 0 and "vae train: error: no Ray cluster answers" in failed.stderr, failed.stderr
    assert stages_run(failed.stdout) == ["fetch", "train"] and (repo / "data/mnist").is_dir()
    changed = run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    assert changed.splitlines() == [" M params.yaml", "?? dvc.lock"], changed  # the lock: fetch's, to commit


def test_unknown_params_key_fails_naming_it(repro, tmp_path):
    repo, env = copy_repro(repro[0], tmp_path / "project"), repro[1]
    set_params(repo, {"train": {"epochz": 3}})
    failed = run(["dvc", "repro"], repo, env=env, check=False)
    assert failed.returncode != 0
    assert "train.epochz: unknown key" in failed.stdout + failed.stderr


def test_serve_from_the_registry(repro, tmp_path):
    """The champion's three graphs served: the decoder with its latent record, and the score
    of the test images equal to the evaluate stage's per-image -L_k for the same k and noise;
    the same images inverted (an obvious outlier set) score worse. The server holds them in
    memory: no downloaded copy is left in the temporary folder."""
    repo, env, _ = repro
    with vae_serve("models:/vae-decoder@champion", repo / "serve.log", env={**env, "TMPDIR": str(tmp_path)},
                   cwd=repo) as url:
        assert not list(tmp_path.rglob("*.onnx")), list(tmp_path.rglob("*"))
        assert httpx.get(f"{url}/v2").json()["models"] == ["vae-decoder", "vae-encoder", "vae-score"]
        params = load_params(repo / "params.yaml")
        x, _ = evaluated_test_images(Layout(repo), params)
        x = x[:16].reshape(16, -1)
        served = httpx.post(f"{url}/v1/score", params={"seed": 3}, json={"x": x.tolist()}).json()
        inverted = httpx.post(f"{url}/v1/score", params={"seed": 3}, json={"x": (1 - x).tolist()}).json()
        meta = httpx.get(f"{url}/v2/models/vae-decoder").json()
        assert meta["inputs"][0]["shape"] == [-1, 20]
        # The export stage recorded the evaluate stage's latent order, spread and map in the decoder.
        latent = json.loads((repo / "models/latent.json").read_text())
        assert meta["parameters"]["latent_order"] == latent["order"] and sorted(latent["order"]) == list(range(20))
        assert meta["parameters"]["latent_spread"] == pytest.approx(latent["spread"])
        assert httpx.get(f"{url}/v1/latent_map.png").content == (repo / "plots/latent_map.png").read_bytes()
        assert "latent.js" in httpx.get(f"{url}/").text
    eps = np.random.default_rng(3).standard_normal((16, params.export.score_k, 20), dtype=np.float32)
    model, noise = VAE.load(repo / "models/vae.pt"), torch.from_numpy(eps).transpose(0, 1)  # (k, N, noise_dim)
    evaluated = -iwae_log_lik(model, x, params.eval.iwae_k, noise)
    assert served["k"] == params.eval.iwae_k == 5
    np.testing.assert_allclose(served["score"], evaluated.numpy(), rtol=1e-5)
    assert np.mean(inverted["score"]) > np.mean(served["score"])
    missing = run(["vae", "serve", "models:/vae-decoder@nope"], repo, env=env, check=False)
    assert missing.returncode == 2 and "models:/vae-decoder@nope" in missing.stderr
    bare = run(["vae", "serve", "models:/vae-decoder"], repo, env=env, check=False)  # MLflow 3: a logged model's id
    assert bare.returncode == 2 and bare.stderr.endswith(
        "(a registered model is served by version or alias: models:/vae-decoder/1, models:/vae-decoder@champion)\n")


def test_mlflow_ui_shows_the_experiment_run_and_loss_chart(repro):
    """The UI of the real server, in headless Chromium (Debian's, driven by Playwright):
    the experiment's run table lists the run, and its metrics tab draws the loss chart.
    Screenshots are kept in test-artifacts/."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    chromium = system_program("/usr/bin/chromium", "chromium")
    repo, env, _ = repro
    url = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name("vae-mnist").experiment_id
    # The newest run (a later test trained again); not from the run file: a later repro failed.
    run_ = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])[0]
    run_name = run_.info.run_name
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        # Chromium's background services would only knock on a closed network.
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/#/experiments/{experiment_id}/runs")
            expect(page.get_by_text("vae-mnist").first).to_be_visible(timeout=60_000)
            link = page.get_by_role("link", name=run_name)
            expect(link).to_be_visible(timeout=60_000)
            page.screenshot(path=shots / "mlflow-ui-runs.png")
            link.click()
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_role("searchbox", name="Search metric charts").fill("val_neg_elbo")
            expect(page.get_by_role("heading", name="val_neg_elbo", exact=True)).to_be_visible(timeout=60_000)
            expect(page.get_by_text(f"{run_name} (val_neg_elbo)")).to_be_visible(timeout=30_000)  # the legend
            expect(page.locator(".js-plotly-plot path.js-line").first).to_be_visible(timeout=30_000)  # the curve
            page.screenshot(path=shots / "mlflow-ui-loss-chart.png", full_page=True)
        finally:
            browser.close()


def test_a_temp_and_a_queued_experiment_at_once_log_into_the_projects_store(repro, tmp_path):
    """Without `make up`: no MLFLOW_TRACKING_URI (the default SQLite store), no RAY_ADDRESS (each
    experiment starts a local Ray of its own). A `dvc exp run --temp` and a queued experiment
    train at the same time, each in a copy under .dvc/tmp/exps/ that DVC deletes afterwards:
    both runs land in the project's mlflow.db, their artifacts in its mlartifacts/, with no
    port clash and no "database is locked". (Up to `train` only: evaluate and export add
    nothing to what is under test, the sweep against `make up` runs them.)"""
    from mlflow import MlflowClient

    repo = copy_repro(repro[0], tmp_path / "project")
    env = {k: v for k, v in repro[1].items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    run(["git", "add", "-A"], repo, env=env)
    run(["git", "commit", "-qm", "tiny params"], repo, env=env)
    # One local worker each, on a 2-core machine; up to the train stage.
    cell = ["-S", "train.num_workers=1", "-S", "train.epochs=1", "train"]
    run(["dvc", "exp", "run", "--queue", "-S", "train.seed=2", *cell], repo, env=env)
    with open(tmp_path / "temp.log", "w") as log:
        temp = subprocess.Popen(["dvc", "exp", "run", "--temp", "-S", "train.seed=1", *cell], cwd=repo,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    queued = run(["vae", "sweep", "-j", "1"], repo, env=env, check=False, timeout=600)
    assert temp.wait(timeout=600) == 0 and queued.returncode == 0, (tmp_path / "temp.log").read_text() + queued.stdout
    out = (tmp_path / "temp.log").read_text() + queued.stdout + queued.stderr
    assert "database is locked" not in out and stages_run((tmp_path / "temp.log").read_text()) == ["train"]
    temp_name = re.search(r"Ran experiment\(s\): (\S+)", (tmp_path / "temp.log").read_text()).group(1)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    assert len(runs) == 2 and temp_name in {r.data.tags["dvc.experiment"] for r in runs}
    assert sorted(r.data.params["train.seed"] for r in runs) == ["1", "2"]
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # they did run at the same time
    for run_ in runs:
        assert run_.info.status == "FINISHED" and run_.data.metrics["val_neg_elbo"] > 0
        assert run_.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
        assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"model", "training"}
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))
