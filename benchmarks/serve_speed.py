"""Serving speed, side by side in one invocation, on this machine and 127.0.0.1 only:

  1. in-process, each graph (decode, encode, score) on onnxruntime vs torch eager, at batch 1
     and 1024, and its images per second;
  2. HTTP at batch 1 over concurrent connections, for a bounded time each, driven by wrk:
     `vae serve` (Open Inference Protocol) vs `mlflow models serve` of the same registered
     ONNX model, flat out; then `vae serve` paced at --rate requests/s, for its latency;
  3. a soak of `vae serve`: errors and the server's resident memory over --soak seconds;
  4. the three graphs over HTTP from one `vae serve models/`, batch 1 and 64: images per
     second of encode and score beside decode's.

Needs `wrk` (apt-get install wrk): a Python load generator would take the CPU the server
needs on a small machine, and measure itself.

Run from a repository where `make repro` has run (models/, mlflow.db):

    python benchmarks/serve_speed.py [--seconds 10] [--clients 32] [--rate 500] [--soak 60]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "local"))
import stack  # noqa: E402

from pipeline.files import Layout  # noqa: E402
from pipeline.serve.session import open_session  # noqa: E402
from pipeline.tracking import tracking_uri  # noqa: E402
from vae.model import VAE, ImageDecoder, ImageEncoder, ImageScore  # noqa: E402

BIN = Path(sys.executable).parent
WRK_SCRIPT = Path(__file__).with_name("post.lua")


def per_call_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def in_process(layout: Layout) -> None:
    model = VAE.load(layout.model)
    k, noise_dim = open_session(layout.score_onnx).get_inputs()[1].shape[1:]
    rng = np.random.default_rng(0)
    graphs = {  # name: (torch module, ONNX file, inputs for a batch)
        "decode": (ImageDecoder(model), layout.decoder_onnx,
                   lambda n: {"z": rng.standard_normal((n, model.config.latent_dim), dtype=np.float32)}),
        "encode": (ImageEncoder(model), layout.encoder_onnx, lambda n: {"x": rng.random((n, 784), dtype=np.float32)}),
        f"score (k={k})": (ImageScore(model), layout.score_onnx,
                           lambda n: {"x": rng.random((n, 784), dtype=np.float32),
                                      "eps": rng.standard_normal((n, k, noise_dim), dtype=np.float32)}),
    }
    print(f"\n1. in-process, median ms per call (torch threads {torch.get_num_threads()})")
    print(f"{'graph':>14}{'batch':>7}{'torch eager':>14}{'onnxruntime':>14}{'speed-up':>10}{'images/s':>12}")
    for name, (module, path, inputs) in graphs.items():
        session, module = open_session(path), module.eval()
        for batch in (1, 1024):
            feed = inputs(batch)
            repeats = max(5, min(2000, int(2000 / batch / (k if name.startswith("score") else 1)) + 5))
            with torch.no_grad():
                eager = per_call_ms(lambda f=feed, m=module: m(*map(torch.from_numpy, f.values())), repeats)
            ort = per_call_ms(lambda f=feed, s=session: s.run(None, f), repeats)
            print(f"{name:>14}{batch:>7}{eager:>14.3f}{ort:>14.3f}{eager / ort:>9.2f}x{1000 * batch / ort:>12.0f}")


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


def wrk(url: str, body: dict, seconds: float, clients: int, think_ms: float = 0, pid: int | None = None) -> dict:
    """wrk (C, one thread: one core, the server gets the other) posting `body` over `clients`
    keep-alive connections: flat out, or paced by an exponential think time per connection.
    Also samples the resident memory of process `pid` once a second."""
    if shutil.which("wrk") is None:
        sys.exit("serve_speed: needs the `wrk` load generator "
                 "(Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body_file:
        json.dump(body, body_file)
        body_file.flush()
        env = {**os.environ, "WRK_BODY": body_file.name, "WRK_THINK_MS": str(think_ms)}
        process = subprocess.Popen(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "-s", str(WRK_SCRIPT), url],
                                   env=env, stdout=subprocess.PIPE, text=True)
        rss = []
        while process.poll() is None:
            if pid:
                rss.append(rss_mib(pid))
            time.sleep(1)
        summary = json.loads(process.stdout.read().strip().splitlines()[-1])
    return summary | {"rps": summary["requests"] / summary["seconds"], "rss": rss}


def contenders(layout: Layout) -> dict:
    """name -> (server command, ready URL, infer URL, body of one batch-1 request)."""
    latent = open_session(layout.decoder_onnx).get_inputs()[0].shape[1]
    z = [0.1] * latent
    ours_port, mlflow_port = stack.free_ports(2)
    return {
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


def row(name: str, r: dict) -> str:
    return f"{name:40}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"


def over_http(layout: Layout, seconds: float, clients: int, rate: float) -> None:
    # mlflow models serve starts `uvicorn` through a shell: it must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(layout), "PATH": f"{BIN}:{os.environ['PATH']}"}
    print(f"\n2. HTTP, batch 1, {clients} connections, {seconds:g} s each, wrk on 127.0.0.1")
    print(f"{'':40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    results = {}
    for name, (cmd, ready, url, body) in contenders(layout).items():
        process = start(cmd, ready, env)
        try:
            results[name] = wrk(url, body, seconds, clients)
            print(row(name, results[name]))
            if name.startswith("vae serve"):  # paced: each connection sends about rate/clients requests a second
                paced = wrk(url, body, seconds, clients, think_ms=1000 * clients / rate)
                print(row(f"  same, paced at about {rate:g} req/s", paced))
        finally:
            process.terminate()
            process.wait(timeout=30)
    ours, theirs = (r["rps"] for r in results.values())
    print(f"{'throughput ratio, ours / mlflow':40}{ours / theirs:>8.2f}x")


def soak(layout: Layout, seconds: float, clients: int) -> None:
    cmd, ready, url, body = next(iter(contenders(layout).values()))
    process = start(cmd, ready, dict(os.environ))
    try:
        r = wrk(url, body, seconds, clients, pid=process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warm, end = r["rss"][min(10, len(r["rss"]) - 1)], r["rss"][-1]  # after 10 s of warm-up, and at the end
    print(f"\n3. soak of vae serve, {clients} connections, {seconds:g} s: {r['requests']} requests, "
          f"{r['errors']} errors, {r['rps']:.0f} req/s, p99 {r['p99_ms']:.1f} ms")
    print(f"   server RSS: {r['rss'][0]:.0f} MiB at start, {warm:.0f} after 10 s, {end:.0f} at the end "
          f"({(end - warm) / warm:+.1%}), {max(r['rss']):.0f} at most")


def graphs_over_http(layout: Layout, seconds: float, clients: int) -> None:
    """Decode, encode and score, OIP infer on one `vae serve models/`, each flat out."""
    port = stack.free_port()
    process = start([str(BIN / "vae"), "serve", str(layout.decoder_onnx.parent), "--port", str(port)],
                    f"http://127.0.0.1:{port}/v2/health/ready", dict(os.environ))
    latent = open_session(layout.decoder_onnx).get_inputs()[0].shape[1]
    rng = np.random.default_rng(0)
    print(f"\n4. the three graphs over HTTP, one `vae serve models/`, {clients} connections, {seconds:g} s each")
    print(f"{'model':14}{'batch':>6}{'req/s':>9}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'vs decode':>11}")
    try:
        for batch in (1, 64):
            decoded = None
            graphs = (("vae-decoder", "z", latent), ("vae-encoder", "x", 784), ("vae-score", "x", 784))
            for name, tensor, width in graphs:
                values = rng.standard_normal((batch, width)) if tensor == "z" else rng.random((batch, width))
                body = {"inputs": [{"name": tensor, "datatype": "FP32", "shape": [batch, width],
                                    "data": np.round(values, 4).ravel().tolist()}]}
                r = wrk(f"http://127.0.0.1:{port}/v2/models/{name}/infer", body, seconds, clients)
                images = r["rps"] * batch
                decoded = decoded or images
                print(f"{name:14}{batch:>6}{r['rps']:>9.0f}{images:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                      f"{r['errors']:>8}{images / decoded:>10.2f}x")
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=float, default=500, help="requests/s of the paced run")
    parser.add_argument("--soak", type=float, default=60, help="seconds of the soak (0: skip it)")
    args = parser.parse_args()
    layout = Layout()
    in_process(layout)
    over_http(layout, args.seconds, args.clients, args.rate)
    if args.soak:
        soak(layout, args.soak, args.clients)
    graphs_over_http(layout, args.seconds, args.clients)


if __name__ == "__main__":
    main()
