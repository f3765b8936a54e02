"""`vae sweep -j N`: run DVC's experiment queue with N workers, and wait for it.

`dvc queue start -j N` spawns its N workers at once, and on DVC 3.67 one of them can die at
start-up in a race on the queue's files (kombu's filesystem transport; treeverse/dvc-task#73,
treeverse/dvc#9358), leaving fewer workers than asked. So the workers start one at a time,
each once the previous one is up. Then this waits until nothing is queued or running, prints
`dvc queue status`, and fails if any experiment failed (`dvc queue logs NAME` says why).

The waiting asks the queue through DVC's Python API, in this process: a `dvc queue status`
command costs DVC's start-up, 2.7 s of CPU here, and polled every 2 s it took half a core from
the experiments of a 2-core machine; asked in this process, 0.03 s (benchmarks/queue_poll.py).
"""
from __future__ import annotations

import logging
import subprocess
import tempfile
import time

QUEUE_DONE = ("Success", "Failed")


class SweepError(RuntimeError):
    """DVC's queue could not be started, read, or did not drain in time."""


def dvc(*args: str, tries: int = 5) -> str:
    """`dvc ARGS`'s output; DVC's error in the SweepError if it keeps failing. Retried: while
    workers start and stop, a command that reads the queue's files (a query, or `dvc queue
    start` asking which workers are up) can meet them half-written and fail; the next one reads
    them whole. The streams are files, not pipes: `dvc queue start` leaves a process that
    watches the new worker and holds the streams it inherited open for the worker's life, so a
    pipe would not end before it."""
    for attempt in range(tries):
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(["dvc", *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err).returncode
            out.seek(0)
            err.seek(0)
            output, error = out.read(), err.read()
        if code == 0:
            return output
        time.sleep(1 + attempt)
    raise SweepError(f"`dvc {' '.join(args)}` failed {tries} times: {error.strip()[-2000:]}")


def start_worker(count: int) -> None:
    """`dvc queue start -j count`, which starts worker `count` when the others are up: DVC
    starts only the workers it does not find up."""
    dvc("queue", "start", "-j", str(count))


def queue(tries: int = 5) -> tuple[dict[str, str], int]:
    """{experiment name: status} of the queue's tasks, and how many workers are up, as `dvc
    queue status` reads them. Retried, as dvc() is."""
    from dvc.repo import Repo

    # DVC's queue is kombu's filesystem transport, which has no host: kombu warns so, twice, where
    # DVC's own commands keep it quiet.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    for attempt in range(tries):
        try:
            with Repo() as repo:
                celery = repo.experiments.celery_queue
                tasks = {task["name"] or task["rev"][:7]: task["status"] for task in celery.status()}
                return tasks, len(celery.worker_status())
        except Exception as e:  # DVC's and kombu's own errors, of a file half-written
            error = e
            time.sleep(1 + attempt)
    raise SweepError(f"DVC's queue could not be read {tries} times: {error}")


def run(jobs: int, timeout_s: float = 24 * 3600) -> int:
    deadline = time.monotonic() + timeout_s
    pending = {name for name, state in queue()[0].items() if state not in QUEUE_DONE}  # this sweep's
    if not pending:
        print("vae sweep: nothing queued (`dvc exp run --queue -S ...` queues experiments)", flush=True)
        return 0
    for count in range(1, jobs + 1):
        start_worker(count)
        while True:
            status, up = queue()
            if up >= count or all(status.get(name) in QUEUE_DONE for name in pending):
                break
            if time.monotonic() > deadline:
                raise SweepError(f"worker {count} did not start")
            time.sleep(0.5)
    print(f"vae sweep: {jobs} worker{'s' * (jobs > 1)} started", flush=True)
    status = queue()[0]
    while any(status.get(name) not in QUEUE_DONE for name in pending):
        if time.monotonic() > deadline:
            raise SweepError("the queue did not drain in time")
        time.sleep(2)
        status = queue()[0]
    dvc("queue", "stop")  # the workers would idle on, waiting for more
    print(dvc("queue", "status"), end="", flush=True)
    failed = sorted(name for name in pending if status.get(name) == "Failed")
    if failed:
        print(f"vae sweep: failed: {', '.join(failed)} (see `dvc queue logs NAME`)", flush=True)
    return 1 if failed else 0
