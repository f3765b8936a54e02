"""pipeline/sweep.py: DVC's experiment queue as `vae sweep` reads it, through DVC's Python API in
its own process. The sweeps themselves run in test_local_stack.py (against `make up`) and
test_pipeline_dvc.py (beside a `dvc exp run --temp`)."""
import os
from pathlib import Path

import pytest

from pipeline import sweep

from helpers import BIN, git_env, run


def queued_project(path: Path) -> dict[str, str]:
    """A git repository whose one stage echoes a param, one experiment of it queued (tidy-tern)."""
    env = git_env()
    run(["git", "init", "-q"], path, env=env)
    run(["dvc", "init", "-q"], path, env=env)
    (path / "params.yaml").write_text("seed: 0\n")
    (path / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: echo ${seed}\n    params: [seed]\n")
    run(["git", "add", "-A"], path, env=env)
    run(["git", "commit", "-qm", "a stage"], path, env=env)
    run(["dvc", "exp", "run", "--queue", "-n", "tidy-tern", "-S", "seed=1"], path, env=env)
    return env


@pytest.mark.integration  # git and DVC's commands make the queue: 10 s
def test_the_queue_is_read_by_experiment_name_and_an_empty_one_is_said_so(tmp_path, monkeypatch, capsys, caplog):
    env = queued_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert sweep.queue() == ({"tidy-tern": "Queued"}, 0)  # no worker started
    run(["dvc", "queue", "remove", "--queued"], tmp_path, env=env)
    assert sweep.queue() == ({}, 0)
    capsys.readouterr()  # run()'s echo of the commands above
    assert sweep.run(jobs=2) == 0
    assert capsys.readouterr().out == "vae sweep: nothing queued (`dvc exp run --queue -S ...` queues experiments)\n"
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("kombu")]  # "No hostname was supplied"


# `dvc`, failing `dvc queue start` as DVC fails on an unexpected error, FAILS times, then DVC itself.
FAILING_START = """#!/bin/sh
if [ "$1 $2" = "queue start" ] && [ "$(wc -l < "$0.count")" -lt {fails} ]; then
    echo start >> "$0.count"
    echo "ERROR: unexpected error - the queue's file was half-written" >&2
    exit 255
fi
exec {dvc} "$@"
"""


def failing_dvc(folder: Path, fails: int) -> str:
    """A PATH whose `dvc` fails `queue start` FAILS times (counted in dvc.count), then runs DVC."""
    folder.mkdir()
    (folder / "dvc").write_text(FAILING_START.format(fails=fails, dvc=BIN / "dvc"))
    (folder / "dvc").chmod(0o755)
    (folder / "dvc.count").touch()
    return f"{folder}:{BIN}:{os.environ['PATH']}"


@pytest.mark.integration  # a real queue worker runs the experiment: 20 s
def test_a_queue_start_that_fails_is_tried_again_and_one_that_keeps_failing_says_why(tmp_path, monkeypatch,
                                                                                      capsys):
    """`dvc queue start` exited 255 once in the suite, and the sweep failed with no reason
    given (DVC's output was discarded). Now it is tried again, as the queue's reads are, and
    DVC's own error is named when it keeps failing."""
    (tmp_path / "project").mkdir()
    queued_project(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    with monkeypatch.context() as patched:
        patched.setenv("PATH", failing_dvc(tmp_path / "always", fails=99))
        patched.setattr(sweep.time, "sleep", lambda seconds: None)
        with pytest.raises(sweep.SweepError, match="`dvc queue start -j 1` failed 5 times: ERROR: unexpected error "
                                                   "- the queue's file was half-written"):
            sweep.run(jobs=1)
    monkeypatch.setenv("PATH", failing_dvc(tmp_path / "once", fails=1))
    assert sweep.run(jobs=1) == 0
    assert "vae sweep: 1 worker started" in capsys.readouterr().out
    assert sweep.queue()[0] == {"tidy-tern": "Success"}
    assert (tmp_path / "once/dvc.count").read_text() == "start\n"  # one failure, then DVC's own start
