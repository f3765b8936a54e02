"""`vae sweep -j N`: run DVC's experiment queue with N workers, and wait for it.

`dvc queue start -j N` spawns its N workers at once, and on DVC 3.67 one of them can die at
start-up in a race on the queue's files (kombu's filesystem transport; treeverse/dvc-task#73,
treeverse/dvc#9358), leaving fewer workers than asked. So the workers start one at a time,
each once the previous one is up. Then this waits until nothing is queued or running, prints
`dvc queue status`, and fails if any experiment failed (`dvc queue logs NAME` says why).
"""
from __future__ import annotations

import re
import subprocess
import time

QUEUE_DONE = ("Success", "Failed")


def dvc(*args: str) -> str:
    return subprocess.run(["dvc", *args], capture_output=True, text=True, check=True).stdout


def workers_up() -> int:
    found = re.search(r"Worker status: (\d+) active, (\d+) idle", dvc("queue", "status"))
    return int(found[1]) + int(found[2]) if found else 0


def tasks() -> dict[str, str]:
    """{experiment name: status} of the queue's tasks."""
    lines = dvc("queue", "status").splitlines()[1:]
    return {words[1]: words[-1] for words in map(str.split, lines) if len(words) >= 4 and words[0] != "Worker"}


def run(jobs: int, timeout_s: float = 24 * 3600) -> int:
    deadline = time.monotonic() + timeout_s
    pending = {name for name, state in tasks().items() if state not in QUEUE_DONE}  # this sweep's
    if not pending:
        print("vae sweep: nothing queued (`dvc exp run --queue -S ...` queues experiments)", flush=True)
        return 0
    for count in range(1, jobs + 1):
        dvc("queue", "start", "-j", str(count))  # starts worker `count` only: the others are up
        while workers_up() < count and any(tasks().get(name) not in QUEUE_DONE for name in pending):
            if time.monotonic() > deadline:
                raise TimeoutError(f"vae sweep: worker {count} did not start")
            time.sleep(0.5)
    print(f"vae sweep: {jobs} worker{'s' * (jobs > 1)} started", flush=True)
    status = tasks()
    while any(status.get(name) not in QUEUE_DONE for name in pending):
        if time.monotonic() > deadline:
            raise TimeoutError("vae sweep: the queue did not drain in time")
        time.sleep(2)
        status = tasks()
    print(dvc("queue", "status"), end="", flush=True)
    failed = sorted(name for name in pending if status.get(name) == "Failed")
    if failed:
        print(f"vae sweep: failed: {', '.join(failed)} (see `dvc queue logs NAME`)", flush=True)
    return 1 if failed else 0
