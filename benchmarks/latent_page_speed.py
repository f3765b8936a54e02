"""The latency of one slider update on `vae serve`'s latent-space page, request to painted
image, in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), side by side
with its reference: the same Open Inference Protocol request from Python (httpx), which is
the floor the page cannot beat.

The decoder is the default model's (params.yaml: 784-512-256-32), untrained: its weights do
not change the work. Each update waits for the previous image to be painted.

    python benchmarks/latent_page_speed.py [--updates 100]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))
import stack  # noqa: E402

from pipeline.export import export_decoder  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from vae.model import VAE, ImageDecoder  # noqa: E402


def page_latencies(url: str, updates: int) -> tuple[list[float], list[float]]:
    """Per update: ms from request to painted image, and to the image drawn, before its frame."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => window.latentPage.latencies.length > 0")
        slider = page.locator("#sliders input").first
        slider.focus()
        for i in range(updates):
            page.keyboard.press("ArrowRight" if (i // 30) % 2 == 0 else "ArrowLeft")
            page.wait_for_function("n => window.latentPage.latencies.length > n && !window.latentPage.inFlight",
                                   arg=i + 1)
        latencies = page.evaluate("() => [window.latentPage.latencies.slice(1), window.latentPage.drawn.slice(1)]")
        browser.close()
    return latencies


def client_latencies(url: str, latent_dim: int, updates: int) -> list[float]:
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, latent_dim], "data": [0.1] * latent_dim}]}
    seconds = []
    with httpx.Client() as client:
        for _ in range(updates):
            start = time.perf_counter()
            client.post(f"{url}/v2/models/vae-decoder/infer", json=body).json()
            seconds.append((time.perf_counter() - start) * 1000)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=100)
    args = parser.parse_args()
    config = load_params(ROOT / "params.yaml").model.vae_config()
    work = Path(tempfile.mkdtemp(prefix="vae-page-bench-"))
    export_decoder(ImageDecoder(VAE(config)).eval(), config.latent_dim, work / "decoder.onnx", opset=18)
    port = stack.free_port()
    server = stack.start([str(Path(sys.executable).parent / "vae"), "serve", str(work / "decoder.onnx"),
                          "--port", str(port)], work / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_until(lambda: stack.http_ok(f"{url}/v2/health/ready"), server, work / "serve.log", "vae serve")
        client = statistics.median(client_latencies(url, config.latent_dim, args.updates))
        painted, drawn = (statistics.median(ms) for ms in page_latencies(url, args.updates))
    finally:
        stack.stop(server)
    print(f"one slider update of a {config.latent_dim}-dimensional decoder, median of {args.updates}:")
    print(f"  page, request to painted image (Chromium)  {painted:7.1f} ms   {painted / client:5.2f}x")
    print(f"  page, request to image drawn, before frame {drawn:7.1f} ms   {drawn / client:5.2f}x")
    print(f"  the same request from httpx (reference)    {client:7.1f} ms   1.00x")


if __name__ == "__main__":
    main()
