"""Serving speed, side by side in one invocation, on this machine and 127.0.0.1 only:

  1. decoding in-process: onnxruntime vs torch eager, at batch 1 and 1024;
  2. HTTP at batch 1 with concurrent clients, for a bounded time each: `vae serve` (Open
     Inference Protocol) vs `mlflow models serve` of the same registered ONNX model;
  3. a soak of `vae serve`: errors and the server's resident memory over --soak seconds.

Run from a repository where `make repro` has run (models/, mlflow.db):

    python benchmarks/serve_speed.py [--seconds 10] [--clients 32] [--soak 60]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from pipeline.evaluate import load_model
from pipeline.files import Layout
from pipeline.onnx_session import open_session
from pipeline.tracking import tracking_uri
from vae.model import ImageDecoder

BIN = Path(sys.executable).parent


def per_call_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def in_process(layout: Layout) -> None:
    decoder = ImageDecoder(load_model(layout).decoder).eval()
    session = open_session(layout.decoder_onnx)
    latent = session.get_inputs()[0].shape[1]
    print(f"\n1. decode in-process, median ms per call (torch threads {torch.get_num_threads()})")
    print(f"{'batch':>7}{'torch eager':>14}{'onnxruntime':>14}{'speed-up':>10}")
    for batch, repeats in ((1, 2000), (1024, 50)):
        z = np.random.default_rng(0).standard_normal((batch, latent)).astype(np.float32)
        with torch.no_grad():
            eager = per_call_ms(lambda: decoder(torch.from_numpy(z)), repeats)
        ort = per_call_ms(lambda: session.run(None, {"z": z}), repeats)
        print(f"{batch:>7}{eager:>14.3f}{ort:>14.3f}{eager / ort:>9.2f}x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for process {pid}")


async def load(url: str, body: dict, seconds: float, clients: int, pid: int | None = None) -> dict:
    """`clients` concurrent loops posting `body` for `seconds`; latencies and errors, and
    the resident memory of process `pid` once a second."""
    latencies, errors, rss = [], 0, []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        async def loop():
            nonlocal errors
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok

        async def sample():
            while time.monotonic() < deadline:
                rss.append(rss_mib(pid))
                await asyncio.sleep(1)

        await asyncio.gather(*(loop() for _ in range(clients)), *([sample()] if pid else []))
    ms = np.array(latencies) * 1000
    return {"rps": len(ms) / seconds, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99), "errors": errors,
            "requests": len(ms), "rss": rss}


def over_http(layout: Layout, seconds: float, clients: int) -> None:
    # mlflow models serve starts `uvicorn` through a shell: it must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(layout), "PATH": f"{BIN}:{os.environ['PATH']}"}
    latent = open_session(layout.decoder_onnx).get_inputs()[0].shape[1]
    z = [0.1] * latent
    ours_port, mlflow_port = free_port(), free_port()
    contenders = {
        "vae serve (onnxruntime, OIP infer)": (
            [str(BIN / "vae"), "serve", str(layout.decoder_onnx), "--port", str(ours_port)],
            f"http://127.0.0.1:{ours_port}/v2/health/ready",
            f"http://127.0.0.1:{ours_port}/v2/models/vae-decoder/infer",
            {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, latent], "data": z}]}),
        "mlflow models serve (same ONNX model)": (
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/vae-decoder@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(mlflow_port)],
            f"http://127.0.0.1:{mlflow_port}/ping",
            f"http://127.0.0.1:{mlflow_port}/invocations",
            {"inputs": [z]}),  # the signature is an un-named tensor spec
    }
    print(f"\n2. HTTP, batch 1, {clients} concurrent clients, {seconds:g} s each, 127.0.0.1")
    print(f"{'':40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    results = {}
    for name, (cmd, ready, url, body) in contenders.items():
        process = start(cmd, ready, env)
        try:
            results[name] = asyncio.run(load(url, body, seconds, clients))
        finally:
            process.terminate()
            process.wait(timeout=30)
        r = results[name]
        print(f"{name:40}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['errors']:>8}")
    ours, theirs = (r["rps"] for r in results.values())
    print(f"{'throughput ratio, ours / mlflow':40}{ours / theirs:>8.2f}x")


def soak(layout: Layout, seconds: float, clients: int) -> None:
    latent = open_session(layout.decoder_onnx).get_inputs()[0].shape[1]
    port = free_port()
    process = start([str(BIN / "vae"), "serve", str(layout.decoder_onnx), "--port", str(port)],
                    f"http://127.0.0.1:{port}/v2/health/ready", dict(os.environ))
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, latent], "data": [0.1] * latent}]}
    try:
        r = asyncio.run(load(f"http://127.0.0.1:{port}/v2/models/vae-decoder/infer", body, seconds, clients,
                             process.pid))
    finally:
        process.terminate()
        process.wait(timeout=30)
    warm, end = r["rss"][min(10, len(r["rss"]) - 1)], r["rss"][-1]  # after 10 s of warm-up, and at the end
    print(f"\n3. soak of vae serve, {clients} clients, {seconds:g} s: {r['requests']} requests, {r['errors']} errors, "
          f"{r['rps']:.0f} req/s")
    print(f"   server RSS: {r['rss'][0]:.0f} MiB at start, {warm:.0f} after 10 s, {end:.0f} at the end "
          f"({(end - warm) / warm:+.1%}), {max(r['rss']):.0f} at most")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--soak", type=float, default=60, help="seconds of the soak (0: skip it)")
    args = parser.parse_args()
    layout = Layout()
    in_process(layout)
    over_http(layout, args.seconds, args.clients)
    if args.soak:
        soak(layout, args.soak, args.clients)


if __name__ == "__main__":
    main()
