"""pipeline/cli.py: how the `vae` command ends when it is interrupted (the stages' own errors are
tested with each stage)."""
import os
import signal
import time

from pipeline import cli, sweep


def test_ctrl_c_on_a_sweep_says_the_queue_goes_on_and_how_to_stop_it(monkeypatch, capsys, sigterm_kept):
    """DVC's queue workers are their own processes: Ctrl-C stops the waiting, not the sweep."""
    def waiting(jobs):
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: Python's own handler
        time.sleep(10)  # the handler raises before this ends
        raise AssertionError("SIGINT did not stop the wait")

    monkeypatch.setattr(sweep, "run", waiting)
    assert cli.main(["sweep"]) == 130
    assert capsys.readouterr().err == ("vae sweep: interrupted; the queue's workers go on: `dvc queue status`; "
                                       "`dvc queue stop --kill` stops them\n")
