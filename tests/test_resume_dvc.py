"""`dvc repro` killed during training, then run again: it resumes from the last checkpoint
of the same params and ends with the model an uninterrupted run makes (changed params start
fresh: test_train_ray checks the run names). The checkpoints live in an S3 bucket (train.storage_path: s3://...), the
endpoint and keys in the environment of the driver and of every Ray node, and nowhere else."""
import os
import signal
import sqlite3
import subprocess
import time

import torch

from helpers import INTERRUPTED_RUN, TRAIN_KEYS, bucket_keys, copy_project, git_env, run, set_params


def test_killed_repro_resumes_from_s3_to_the_uninterrupted_model(tmp_path, mnist_dir, ray_address, s3,
                                                                 uninterrupted):
    repo = copy_project(tmp_path / "project")
    # The conftest fixture's run, as params.yaml: same data, model and training.
    run_ = INTERRUPTED_RUN
    set_params(repo, {"data": {"source": str(mnist_dir), "val_size": 200, "max_train_images": run_["images"]},
                      "model": run_["model"],
                      "train": {"storage_path": f"s3://ray/{tmp_path.name}",
                                **{k: run_[k] for k in TRAIN_KEYS}}})
    env = git_env(RAY_ADDRESS=ray_address, **s3)
    with open(tmp_path / "killed.log", "w") as log:
        # `dvc repro train`: fetch, then train; evaluate and export are beside the point here.
        process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        # Kill once Ray has registered epoch 1's checkpoint (its manager snapshot is written
        # after the checkpoint files), so exactly that epoch is there to resume from.
        snapshot = "/checkpoint_manager_snapshot.json"
        while not any(key.endswith(snapshot) for key in bucket_keys(s3, "ray", tmp_path.name)):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # dvc and its `vae train`, mid-training
        process.wait()
    assert not (repo / "models" / "vae.pt").exists()  # nothing half-written

    assert not (repo / ".ray_results").exists()  # the checkpoints are in the bucket alone
    resumed = run(["dvc", "repro", "train"], repo, env=env)
    assert "epoch   1/3" not in resumed.stdout, "the rerun trained epoch 1 again instead of resuming"
    assert "epoch   3/3" in resumed.stdout
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert secret not in (tmp_path / "killed.log").read_text() + resumed.stdout + resumed.stderr
    with sqlite3.connect(repo / "mlflow.db") as db:  # the run's params and tags, in MLflow's own store
        logged = db.execute("SELECT value FROM params UNION ALL SELECT value FROM tags").fetchall()
    assert logged and not [value for (value,) in logged if secret in value]
    model = torch.load(repo / "models" / "vae.pt", weights_only=True)["state_dict"]
    # uninterrupted: what `vae train` writes, the best epoch's weights
    assert all(torch.equal(model[k], uninterrupted[k]) for k in uninterrupted)
