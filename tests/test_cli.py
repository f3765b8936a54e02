"""pipeline/cli.py: how the `vae` command ends when it is interrupted (the stages' own errors are
tested with each stage)."""
import os
import signal
import time

import pytest

from pipeline import cli, sweep


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
