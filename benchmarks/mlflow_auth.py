"""What MLflow's basic-auth app costs its server per request, with its credential cache off
(MLflow's default: every request's password checked against its scrypt hash) and on (`make up`'s
server: infra/local/stack.AUTH_CACHE_S), side by side: two servers as `make up` starts them
(SQLite here), the same client requests to each, alternated, as a training run makes them
(one metric a request).

    python benchmarks/mlflow_auth.py [--requests 100] [--rounds 2]

CPU is the server's (its process and children), wall the client's.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.local import stack  # noqa: E402


def server_cpu(process) -> float:
    server = psutil.Process(process.pid)
    tree = [server, *server.children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in tree)


def log_metrics(url: str, process, requests: int) -> tuple[float, float]:
    """Wall and server CPU seconds of `requests` log_metric calls into a new run."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    run_id = client.create_run(client.create_experiment(f"auth-{secrets.token_hex(4)}")).info.run_id
    wall, cpu = time.perf_counter(), server_cpu(process)
    for step in range(requests):
        client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
    return time.perf_counter() - wall, server_cpu(process) - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    password = secrets.token_urlsafe(24)
    os.environ.update(MLFLOW_TRACKING_USERNAME=stack.ADMIN, MLFLOW_TRACKING_PASSWORD=password)
    cases = {"cache off (MLflow's default)": 0, f"cache on ({stack.AUTH_CACHE_S} s, make up)": stack.AUTH_CACHE_S}
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, ttl in cases.items():
                root = Path(tmp) / str(ttl)
                root.mkdir()
                servers[name] = stack.mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}", password, auth_cache_s=ttl)
            totals = {name: [0.0, 0.0] for name in cases}
            for _ in range(args.rounds):
                for name, (url, process) in servers.items():
                    wall, cpu = log_metrics(url, process, args.requests)
                    totals[name][0] += wall
                    totals[name][1] += cpu
        finally:
            for _, process in servers.values():
                stack.stop(process)
    n = args.requests * args.rounds
    reference = totals[next(iter(cases))]
    print(f"| {n} authenticated requests | ms/request (client) | server CPU ms/request | vs cache off |")
    print("| --- | --- | --- | --- |")
    for name, (wall, cpu) in totals.items():
        print(f"| {name} | {1000 * wall / n:.1f} | {1000 * cpu / n:.1f} | "
              f"{wall / reference[0]:.2f}x wall, {cpu / reference[1]:.2f}x CPU |")


if __name__ == "__main__":
    main()
