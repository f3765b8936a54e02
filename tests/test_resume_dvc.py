"""`dvc repro` killed during training, then run again: it resumes from the last checkpoint
of the same params and ends with the model an uninterrupted run makes; changed params
start fresh."""
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import copy_project, fit_in_folder, git_env, run, set_params

pytestmark = pytest.mark.integration
TRAIN = {"epochs": 3, "batch_size": 32, "num_workers": 2}
# Big enough that the kill lands mid-training, not after it: PyTorch's example model.
MODEL = {"latent_dim": 20, "hidden_dims": [400]}


def test_killed_repro_resumes_to_the_uninterrupted_model(tmp_path, mnist_dir, ray_address):
    repo = copy_project(tmp_path / "project")
    set_params(repo, {"data": {"source": str(mnist_dir), "val_size": 200, "max_train_images": 4800},
                      "model": MODEL, "train": TRAIN, "eval": {"max_test_images": 100, "iwae_k": 2}})
    env = git_env(RAY_ADDRESS=ray_address)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        # Kill once Ray has registered epoch 1's checkpoint (its manager snapshot is written
        # after the checkpoint files), so exactly that epoch is there to resume from.
        while not list((repo / ".ray_results").glob("*/checkpoint_manager_snapshot.json")):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # dvc and its `vae train`, mid-training
        process.wait()
    assert not (repo / "models" / "vae.pt").exists()  # nothing half-written

    resumed = run(["dvc", "repro"], repo, env=env)
    assert "epoch   1/3" not in resumed.stdout, "the rerun trained epoch 1 again instead of resuming"
    assert "epoch   3/3" in resumed.stdout
    model = torch.load(repo / "models" / "vae.pt", weights_only=True)["state_dict"]
    reference = fit_in_folder(tmp_path / "reference", mnist_dir, MODEL, images=4800, **TRAIN)["best"]["model"]
    assert all(torch.equal(model[k], reference[k]) for k in reference)

    set_params(repo, {"train": {"lr": 0.004}})  # not the default: a changed params set
    fresh = run(["dvc", "repro", "train"], repo, env=env)  # evaluate and export have nothing to show here
    assert "epoch   1/3" in fresh.stdout  # a different model: trained from the start
