"""pipeline/train.py under a real Ray cluster: the same model whatever the worker count,
and training that survives a whole node lost mid-run (its training worker with it)."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import compat
from pipeline.params import Params
from pipeline.train_worker import (
    CheckpointError,
    Worker,
    _agreed,
    compile_model,
    graphed_epoch,
    load_checkpoint,
    read_checkpoint,
    uses_cuda_graph,
)
from vae.model import VAE, VAEConfig
from vae.training import TrainConfig, Trainer

from helpers import BIN, INTERRUPTED_RUN, SMALL_MODEL, TRAIN_KEYS, fit_in_folder, free_port, small_filesystem, stack


def train(tmp_path, mnist_dir, name, **train_params):
    return fit_in_folder(tmp_path / name, mnist_dir, **train_params)


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_a_rerun_resumes_the_ray_run_of_the_same_model_and_no_other():
    """The Ray run's name, which a rerun resumes: the same for params that say only where
    and how wide training runs, different for any param that changes the model."""
    from pipeline.train import run_name

    base = Params()
    placed = base.model_copy(update={"train": base.train.model_copy(update={
        "num_workers": 3, "storage_path": "s3://ray/x", "max_failures": 0, "ray_address": "head:6379",
        "checkpoint_seconds": 60.0})})
    assert run_name(placed) == run_name(base)
    for section, change in (("train", {"epochs": base.train.epochs + 1}), ("train", {"seed": 1}),
                            ("model", {"latent_dim": base.model.latent_dim + 1}), ("data", {"val_size": 999})):
        changed = base.model_copy(update={section: getattr(base, section).model_copy(update=change)})
        assert run_name(changed) != run_name(base), change


def test_one_and_two_workers_compiled_or_not_make_the_same_model(tmp_path, mnist_dir, ray_address):
    # With 3 importance samples per image: the noise of each image, k draws of it, is still
    # drawn for the global batch and sliced (k = 1 takes the same path, one draw per image).
    # The richest model: two stochastic layers top-down under a VampPrior, DReG's gradient
    # hooks on both layers, KL warm-up's weight at 0.5 then 1; so every module of it, the
    # pseudo-inputs too, goes through DDP's averaging.
    model = {**SMALL_MODEL, "mid_latent_dim": 6, "mid_hidden_dims": [16], "mid_layout": "top_down",
             "prior": "vamp", "pseudo_inputs": 10}
    run = {"iwae_k": 3, "grad_estimator": "dreg", "epochs": 2, "kl_warmup_epochs": 2, "model": model}
    one = train(tmp_path, mnist_dir, "one", num_workers=1, **run)  # 640 images / 32 = 20 steps an epoch
    two = train(tmp_path, mnist_dir, "two", num_workers=2, **run)
    assert max_abs_diff(one.model, two.model) <= 1e-5  # only float summation order differs
    assert abs(one.history[-1]["val_neg_elbo"] - two.history[-1]["val_neg_elbo"]) <= 0.1
    if compat.compiles_dreg():  # else the trainer refuses, as test_compile_refuses_dreg_... checks
        # train.compile fuses the forward's elementwise ops, which may also reorder float sums.
        compiled = train(tmp_path, mnist_dir, "two-compiled", num_workers=2, compile=True, **run)
        assert max_abs_diff(two.model, compiled.model) <= 1e-4
        assert abs(two.history[-1]["val_neg_elbo"] - compiled.history[-1]["val_neg_elbo"]) <= 0.01
    torch.manual_seed(0)
    initial = VAE(Params.model_validate({"model": model}).model.vae_config()).state_dict()
    del initial["pseudo_inputs"]  # set to training images before the first step
    assert max_abs_diff(initial, one.model) > 1e-3  # and training did move the weights


def test_compile_refuses_dreg_on_a_torch_that_cannot_compile_it(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # a GPU image's own torch
    with pytest.raises(RuntimeError, match=r"grad_estimator: dreg needs torch >= 2.14, this worker has 2.11.0"):
        compile_model(torch.nn.Linear(2, 2), torch.device("cpu"), dreg=True)
    compile_model(torch.nn.Linear(2, 2), torch.device("cpu"))  # without DReG it compiles there


def test_compile_names_a_missing_cxx_compiler():
    # inductor's own patch: pytest's monkeypatch, undone, left cpp.cxx hidden for later tests.
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",)}), \
            pytest.raises(RuntimeError, match=r"train.compile: true needs a C\+\+ compiler"):
        compile_model(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_only_a_lone_gpu_worker_replays_a_cuda_graph_and_only_if_asked():
    on, off = Params(), Params.model_validate({"train": {"cuda_graph": False}})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graph(on, cuda, 1)
    assert not uses_cuda_graph(off, cuda, 1)
    assert not uses_cuda_graph(on, cuda, 2)  # DDP's all-reduce is not captured
    assert not uses_cuda_graph(on, cpu, 1)


def test_a_graph_that_cannot_be_prepared_names_the_eager_way_out():
    """A failure while the graph's step is warmed up or captured says how to train without it.
    Here the warm-up's first forward fails (images 10 pixels wide for a 784-pixel model)."""
    config = TrainConfig(seed=0, epochs=1, batch_size=4, lr=1e-3, lr_schedule="constant", iwae_k=1, dreg=False,
                         binarize=False, bf16=False, kl_warmup_epochs=0)
    model = VAE(VAEConfig(latent_dim=2, hidden_dims=(8,)))
    trainer = Trainer.create(model, config, 8, capturable=True)
    with pytest.raises(RuntimeError, match=r"training step's CUDA graph failed: .*shapes(.|\n)*"
                                           r"train.cuda_graph: false trains this worker eagerly"):
        graphed_epoch(trainer, torch.zeros((8, 10), dtype=torch.uint8))


def test_a_checkpoint_waits_for_checkpoint_seconds_except_after_the_last_epoch():
    def due(epoch: int, seconds: float, since: float) -> bool:
        params = Params.model_validate({"train": {"epochs": 5, "checkpoint_seconds": seconds}})
        worker = Worker(params, None, None, SimpleNamespace(device=torch.device("cpu")), None, 0, None, None, None,
                        last_checkpoint=time.monotonic() - since)
        return worker.checkpoint_due(epoch)

    assert not due(0, seconds=2, since=0.5) and due(0, seconds=2, since=2.5)
    assert due(4, seconds=2, since=0)  # the last epoch's: what the driver reads the model from
    assert due(0, seconds=0, since=0)  # 0: every epoch


def _agree(rank: int, port: int, flags: tuple, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out.put((rank, [_agreed(flag, torch.device("cpu")) for flag in flags[rank]]))
    torch.distributed.destroy_process_group()


def test_every_rank_takes_rank_0s_decision_to_checkpoint():
    """Ranks whose clocks disagree must still report to Ray together: rank 0 decides, over a
    real two-process Gloo group."""
    context = torch.multiprocessing.get_context("spawn")
    out, flags = context.Queue(), ((True, False), (False, True))  # rank: its own flags
    port = free_port()
    processes = [context.Process(target=_agree, args=(rank, port, flags, out)) for rank in (0, 1)]
    for process in processes:
        process.start()
    results = dict(out.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert results == {0: [True, False], 1: [True, False]}


def test_checkpoint_storage_that_does_not_answer_is_named_before_ray_starts(tmp_path, monkeypatch, s3):
    """Ray's controller died of it, in a traceback, after Ray had started."""
    from pipeline.train import require_storage

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    require_storage("s3://ray/vae-mnist")  # the real S3 server answers
    require_storage(str(tmp_path / "ray_results"))  # a local folder: Ray makes it
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConnectionError, match=r"^train.storage_path: s3://ray/vae-mnist cannot be reached \(.*"
                                              r"Could not connect to server.*\); an S3-compatible server needs "
                                              r"AWS_ENDPOINT_URL and its keys in the environment$"):
        require_storage("s3://ray/vae-mnist")


def test_a_checkpoint_that_cannot_be_read_names_itself_and_how_to_start_afresh(tmp_path):
    folder = tmp_path / "vae-0123456789ab" / "checkpoint_2026-12-06_10-00-00.000000"
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model": VAE(VAEConfig(latent_dim=2, hidden_dims=(8,))).state_dict()}, buffer)
    (folder / "state.pt").write_bytes(buffer.getvalue())
    assert load_checkpoint(folder, str(folder))["epoch"] == 1
    (folder / "state.pt").write_bytes(buffer.getvalue()[:1000])  # cut short
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder, str(folder))
    assert str(error.value).startswith(f"Ray's checkpoint {folder} cannot be read (")
    assert str(error.value).endswith(f"delete the run's folder, {folder.parent}, to train from the start")


def test_a_lock_folder_ray_cannot_write_is_named_with_how_to_give_each_user_one(tmp_path, monkeypatch, s3):
    """Ray locks each download of a checkpoint in remote storage in <RAY_TMPDIR>/_ray_lockfiles, by
    default /tmp's, which the machine's first Ray user makes and alone may write: as another user
    (su dev), the resume from S3 of test_resume_dvc and the sweeps failed in Ray's traceback. A
    read-only filesystem stands in for another user's folder: root may write into any folder."""
    import pyarrow.fs
    import ray.train

    buffer = io.BytesIO()
    torch.save({"epoch": 3}, buffer)
    stack.s3_client(s3).put_object(Bucket="ray", Key=f"{tmp_path.name}/checkpoint/state.pt", Body=buffer.getvalue())
    bucket = pyarrow.fs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"], region=s3["AWS_DEFAULT_REGION"],
                                     access_key=s3["AWS_ACCESS_KEY_ID"], secret_key=s3["AWS_SECRET_ACCESS_KEY"])
    checkpoint = ray.train.Checkpoint(f"ray/{tmp_path.name}/checkpoint", filesystem=bucket)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert read_checkpoint(checkpoint) == {"epoch": 3}
    with small_filesystem(tmp_path / "shared", "size=64k,ro") as shared:
        monkeypatch.setenv("RAY_TMPDIR", str(shared))
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(checkpoint)
    assert str(error.value) == (f"{shared}/_ray_lockfiles: Ray's lock files for a checkpoint in remote storage cannot "
                                "be made there (Read-only file system); on a machine shared by several users of Ray, "
                                "set RAY_TMPDIR to a folder of your own before Ray starts")


@pytest.mark.integration  # two Ray Train runs
def test_a_rerun_stops_at_a_checkpoint_that_cannot_be_read_with_the_workers_error(tmp_path, mnist_dir,
                                                                                   ray_address):
    """The worker's CheckpointError reaches the driver as itself (`vae train` prints it in a line), not
    wrapped in Ray's WorkerGroupError."""
    run = {"images": 64, "num_workers": 1, "max_failures": 0}
    train(tmp_path, mnist_dir, "run", **run)
    # One epoch, one checkpoint (beside Ray's checkpoint_manager_snapshot.json).
    [checkpoint] = [p for p in (tmp_path / "run" / ".ray_results").glob("vae-*/checkpoint_*") if p.is_dir()]
    (checkpoint / "state.pt").write_bytes((checkpoint / "state.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=f"^Ray's checkpoint {checkpoint} cannot be read"):
        train(tmp_path, mnist_dir, "run", **run)


@pytest.mark.integration  # a Ray Train run
def test_checkpoint_storage_that_is_full_is_named_with_its_free_space(tmp_path, mnist_dir, ray_address):
    """Ray's copy of a checkpoint into a full storage fails in pyarrow: the driver raises the
    worker's line, which names the storage and the room left there, not Ray's WorkerGroupError."""
    with small_filesystem(tmp_path / "disk") as disk, pytest.raises(CheckpointError) as error:
        train(tmp_path, mnist_dir, "run", images=64, num_workers=1, max_failures=0, storage_path=str(disk))
    assert str(error.value).startswith(f"epoch 1's checkpoint was not written into {disk}: No space left on device (")
    assert f" free in {disk}" in str(error.value), error.value


@pytest.mark.integration  # two Ray Train runs
def test_a_second_driver_of_the_same_run_waits_for_the_first(tmp_path, mnist_dir, ray_address, capsys):
    """Two drivers of one Ray run (the same params and code: two terminals, a sweep over
    train.num_workers with -j 2) resumed from and deleted each other's checkpoints: the second
    died of a checkpoint gone, telling the user to delete the run's folder. It now waits."""
    run = {"images": 64, "num_workers": 1}
    train(tmp_path, mnist_dir, "run", **run)
    [name] = [p.name for p in (tmp_path / "run" / ".ray_results").glob("vae-*")]
    lock = tmp_path / "run" / ".vae-train-locks" / f"{name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(3)",
                               str(lock)], stdout=subprocess.PIPE, text=True)  # another driver, training
    assert holder.stdout.readline() == "held\n"
    capsys.readouterr()
    state = train(tmp_path, mnist_dir, "run", **run)
    assert holder.poll() == 0, "the second driver trained while the first held the run"
    assert f"train: waiting for the other `vae train` of this run (same params and code), which holds {lock}" in \
        capsys.readouterr().out
    assert state.epoch == 1  # resumed: nothing left to train


@pytest.fixture(scope="module")
def cpu_worker_run(tmp_path_factory, mnist_dir, ray_address):
    """One CPU worker's 2 epochs: the GPU tests' reference, trained once for both of them."""
    return train(tmp_path_factory.mktemp("cpu-reference"), mnist_dir, "cpu", num_workers=1, use_gpu=False, epochs=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_gpu_worker_trains_as_a_cpu_worker_does_and_its_model_loads_on_a_cpu(tmp_path, mnist_dir, cpu_worker_run,
                                                                               bf16):
    """One GPU worker (its step a CUDA graph) against one CPU worker, same params: different
    draws (each device's generators), so not the same weights, but as good a model; the state
    the driver read from the checkpoint holds host tensors only. In fp32, against the same GPU
    worker stepping eagerly (train.cuda_graph: false): the same draws, so the same model but
    for rounding (the graph's Adam against torch's fused one)."""
    gpu = train(tmp_path, mnist_dir, "gpu", num_workers=1, use_gpu=True, bf16=bf16, epochs=2)
    cpu = cpu_worker_run
    assert gpu.device == "cuda" and cpu.device == "cpu"
    # An untrained model scores 784 ln 2 = 543.4; two epochs of 640 images reach about 250.
    assert gpu.history[-1]["val_neg_elbo"] == pytest.approx(cpu.history[-1]["val_neg_elbo"], rel=0.05)
    assert all(t.device.type == "cpu" for t in [*gpu.model.values(), *gpu.best["model"].values()])
    if not bf16:  # in bf16, rounding differences flip casts: no tight bound
        eager = train(tmp_path, mnist_dir, "gpu-eager", num_workers=1, use_gpu=True, cuda_graph=False, epochs=2)
        assert max_abs_diff(gpu.model, eager.model) <= 1e-4  # 6e-6 on a CPU (test_training.py's walk)


# Ray's GCS marks a node dead after health_check_failure_threshold missed checks, one every
# health_check_period_ms (defaults 5 and 3000 ms, with a 10 s timeout each): on a loaded
# 2-core machine those defaults leave training blocked for half a minute. The test's
# cluster checks every second and gives up after 3 misses.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                          "RAY_health_check_failure_threshold": "3"}


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def _node_hosting(nodes, name: str) -> set[int]:
    """Indexes of the nodes that run a Ray process called `name`. Each node is a session of its
    own (`ray start` in stack.start); Ray puts each worker in a process group of its own
    within it, so the session, not the group, is the machine."""
    sessions = {node.pid: i for i, node in enumerate(nodes)}
    return {sessions[sid] for p in psutil.process_iter(["pid", "cmdline"])
            if name in " ".join(p.info["cmdline"] or []) and (sid := _session(p.info["pid"])) in sessions}


def _kill_machine(node) -> int:
    """SIGKILL every process of a node's session at once: raylet, agents, workers, as a machine
    going away. Returns how many."""
    victims = [p for p in psutil.process_iter(["pid"]) if _session(p.info["pid"]) == node.pid]
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(victims)


@pytest.mark.integration  # starts its own 3-node cluster
def test_a_lost_node_is_survived_to_the_same_model(tmp_path, mnist_dir, uninterrupted):
    """A head and two worker nodes, each its own `ray start` session; 2 training workers and
    checkpoints in a directory every node reaches. Once epoch 1's checkpoint exists, every
    process of a worker node that hosts a training worker is SIGKILLed, as a machine going
    away: the run resumes on the surviving nodes and ends, in one MLflow run, with the weights
    of an uninterrupted run."""
    address, nodes, dirs = stack.ray_cluster(1, stack.ray_auth(), count=3, env=FAST_FAILURE_DETECTION)
    try:
        project, storage = tmp_path / "project", tmp_path / "shared"
        (project / "data").mkdir(parents=True)
        (project / "data/mnist").symlink_to(mnist_dir)
        run_ = INTERRUPTED_RUN
        (project / "params.yaml").write_text(yaml.safe_dump({
            "data": {"val_size": 200, "max_train_images": run_["images"]}, "model": run_["model"],
            "train": {**{k: run_[k] for k in TRAIN_KEYS}, "max_failures": 1,
                      "storage_path": str(storage)}}))
        env = {**os.environ, "RAY_ADDRESS": address, **FAST_FAILURE_DETECTION}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(tmp_path / "train.log", "w") as log:
            train = subprocess.Popen([str(BIN / "vae"), "train"], cwd=project, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(storage.glob("*/checkpoint_*/state.pt")):
            assert train.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
            time.sleep(0.05)
        victims = (_node_hosting(nodes, "RayTrainWorker") - _node_hosting(nodes, "TrainController")) - {0}
        assert victims, "no worker node hosts a training worker without the run's controller"
        assert _kill_machine(nodes[min(victims)]) >= 3  # raylet, its agents and a training worker at least
        assert train.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()
    finally:
        for node in reversed(nodes):
            stack.stop_ray_node(node)
        for temp_dir in dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
    log = (tmp_path / "train.log").read_text()
    model = torch.load(project / "models/vae.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(model[k], uninterrupted[k]) for k in uninterrupted), log
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run_record,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    assert {m.step for m in client.get_metric_history(run_record.info.run_id, "val_neg_elbo")} == {1, 2, 3}
    assert json.loads((project / "metrics/train.json").read_text())["epochs"] == 3



def _interrupted_train(project, env, log_path, ready, send) -> str:
    """`vae train` signalled by send(process) once ready(its log so far); checked to end as an
    interrupted run must. Returns its log."""
    with open(log_path, "w") as log:  # its own process group, as a terminal's foreground job
        train = subprocess.Popen([str(BIN / "vae"), "train"], cwd=project, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ready(log_path.read_text()):
        assert train.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    send(train)
    assert train.wait(timeout=60) == 130, log_path.read_text()
    out = log_path.read_text()
    (checkpoints,) = project.glob(".ray_results/vae-*")
    # Ray relays the workers' epoch lines when it gets to them: ours need not come last.
    assert f"vae train: interrupted; run it again to resume from the last checkpoint in {checkpoints}" in \
        out.splitlines(), out
    assert "Traceback" not in out and "SIGTERM received" not in out, out
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    assert not (project / "models/vae.pt").exists()
    return out


def test_ctrl_c_and_sigterm_stop_training_in_a_line_and_the_rerun_resumes(tmp_path, mnist_dir, ray_address):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once epoch 1's checkpoint is
    in, then SIGTERM to the rerun's driver: each ends in one line that says where the checkpoints
    are, status 130 and the MLflow run KILLED. Before, Ray Train's own Ctrl-C handler exited with
    status 1 in no words, and SIGTERM with Ray's crash dump. The rerun resumed."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data/mnist").symlink_to(mnist_dir)
    run_ = INTERRUPTED_RUN
    (project / "params.yaml").write_text(yaml.safe_dump({
        "data": {"val_size": 200, "max_train_images": run_["images"]}, "model": run_["model"],
        "train": {**{k: run_[k] for k in TRAIN_KEYS}, "epochs": 6}}))  # more than two runs get through
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    _interrupted_train(project, env, tmp_path / "sigint.log",
                       lambda _: list(project.glob(".ray_results/*/checkpoint_manager_snapshot.json")),
                       lambda train: os.killpg(train.pid, signal.SIGINT))
    out = _interrupted_train(project, env, tmp_path / "sigterm.log", lambda out: "epoch " in out,
                             lambda train: train.send_signal(signal.SIGTERM))
    assert "epoch   1/6" not in out, "the rerun trained epoch 1 again instead of resuming"
