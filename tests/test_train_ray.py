"""pipeline/train.py under a real Ray cluster: the same model whatever the worker count,
and training that survives a worker killed mid-run."""
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipeline.params import Params
from pipeline.train_worker import compile_model
from vae.model import VAE

from helpers import INTERRUPTED_RUN, SMALL_MODEL, fit_in_folder


def train(tmp_path, mnist_dir, name, **train_params):
    return fit_in_folder(tmp_path / name, mnist_dir, **train_params)


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_one_and_two_workers_compiled_or_not_make_the_same_model(tmp_path, mnist_dir, ray_address):
    # With 3 importance samples per image: the noise of each image, k draws of it, is still
    # drawn for the global batch and sliced (k = 1 takes the same path, one draw per image).
    # Two stochastic layers, so every module of that model goes through DDP's averaging too.
    model = {**SMALL_MODEL, "mid_latent_dim": 6, "mid_hidden_dims": [16]}
    run = {"iwae_k": 3, "model": model}
    one = train(tmp_path, mnist_dir, "one", num_workers=1, **run)  # 640 images / 32 = 20 steps
    two = train(tmp_path, mnist_dir, "two", num_workers=2, **run)
    two_again = train(tmp_path, mnist_dir, "two-again", num_workers=2, **run)
    # train.compile fuses the forward's elementwise ops, which may also reorder float sums.
    compiled = train(tmp_path, mnist_dir, "two-compiled", num_workers=2, compile=True, **run)
    assert max_abs_diff(one.model, two.model) <= 1e-5  # only float summation order differs
    assert abs(one.history[-1]["val_neg_elbo"] - two.history[-1]["val_neg_elbo"]) <= 0.1
    assert all(torch.equal(two.model[k], two_again.model[k]) for k in two.model)
    assert max_abs_diff(two.model, compiled.model) <= 1e-4
    assert abs(two.history[-1]["val_neg_elbo"] - compiled.history[-1]["val_neg_elbo"]) <= 0.01
    torch.manual_seed(0)
    initial = VAE(Params.model_validate({"model": model}).model.vae_config()).state_dict()
    assert max_abs_diff(one.model, initial) > 1e-3  # and training did move the weights


def test_compile_names_a_missing_cxx_compiler(monkeypatch):
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++",))
    with pytest.raises(RuntimeError, match=r"train.compile: true needs a C\+\+ compiler"):
        compile_model(torch.nn.Linear(2, 2), torch.device("cpu"))


def _kill_a_worker_after_first_checkpoint(storage, killed: list):
    """SIGKILL one Ray Train worker process as soon as epoch 1's checkpoint exists."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(storage.glob("*/checkpoint_*/state.pt")):
        time.sleep(0.02)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
            os.kill(process.info["pid"], signal.SIGKILL)
            killed.append(process.info["pid"])
            return


def test_killed_worker_resumes_from_checkpoint_to_the_same_model(tmp_path, mnist_dir, uninterrupted):
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "killed" / ".ray_results", killed))
    killer.start()
    interrupted = train(tmp_path, mnist_dir, "killed", max_failures=1, **INTERRUPTED_RUN)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert interrupted.epoch == 3 and [r["epoch"] for r in interrupted.history] == [1, 2, 3]
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    assert len(runs) == 1  # the restarted workers logged into the same run
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_neg_elbo")} == {1, 2, 3}
    assert all(torch.equal(interrupted.model[k], uninterrupted.model[k]) for k in uninterrupted.model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_gpu_workers_with_bf16(tmp_path, mnist_dir, ray_address):
    state = train(tmp_path, mnist_dir, "gpu", num_workers=1, use_gpu=True, bf16=True)
    assert state.device == "cuda" and state.history[-1]["val_neg_elbo"] < 550
