"""pipeline/sweep.py: DVC's experiment queue as `vae sweep` reads it, through DVC's Python API in
its own process. The sweeps themselves run in test_local_stack.py (against `make up`) and
test_pipeline_dvc.py (beside a `dvc exp run --temp`)."""
import pytest

from pipeline import sweep

from helpers import git_env, run


@pytest.mark.integration  # git and DVC's commands make the queue: 10 s
def test_the_queue_is_read_by_experiment_name_and_an_empty_one_is_said_so(tmp_path, monkeypatch, capsys, caplog):
    env = git_env()
    run(["git", "init", "-q"], tmp_path, env=env)
    run(["dvc", "init", "-q"], tmp_path, env=env)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: echo ${seed}\n    params: [seed]\n")
    run(["git", "add", "-A"], tmp_path, env=env)
    run(["git", "commit", "-qm", "a stage"], tmp_path, env=env)
    run(["dvc", "exp", "run", "--queue", "-n", "tidy-tern", "-S", "seed=1"], tmp_path, env=env)
    monkeypatch.chdir(tmp_path)
    assert sweep.queue() == ({"tidy-tern": "Queued"}, 0)  # no worker started
    run(["dvc", "queue", "remove", "--queued"], tmp_path, env=env)
    assert sweep.queue() == ({}, 0)
    capsys.readouterr()  # run()'s echo of the commands above
    assert sweep.run(jobs=2) == 0
    assert capsys.readouterr().out == "vae sweep: nothing queued (`dvc exp run --queue -S ...` queues experiments)\n"
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("kombu")]  # "No hostname was supplied"
