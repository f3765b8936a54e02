"""The latent-space page of `vae serve`, in a real browser: headless Chromium (Debian's,
driven by Playwright) against the real server on 127.0.0.1, with a decoder whose ONNX
metadata records its latent order, spread and map as the export stage writes them."""
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.export import export_decoder, record_metadata
from pipeline.serve.session import LATENT_MAP, LATENT_ORDER, LATENT_SPREAD
from vae.model import VAE, ImageDecoder, VAEConfig

from helpers import ROOT, system_program, vae_serve

LATENT, ORDER, SPREAD = 4, [2, 0, 3, 1], [0.8, 0.1, 1.3, 0.5]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]  # its background services would only knock on a closed network


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import base64

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("latent-page")
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,)))).eval()
    export_decoder(decoder, LATENT, root / "decoder.onnx", opset=18)
    record_metadata(root / "decoder.onnx", {LATENT_ORDER: json.dumps(ORDER), LATENT_SPREAD: json.dumps(SPREAD),
                                            LATENT_MAP: base64.b64encode(png((200, 30, 30))).decode()})
    with vae_serve(str(root / "decoder.onnx"), root / "server.log") as url:
        yield url


def test_the_metadata_reports_the_recorded_order_spread_and_map(server):
    parameters = httpx.get(f"{server}/v2/models/vae-decoder").json()["parameters"]
    assert parameters["latent_order"] == ORDER and parameters["latent_spread"] == SPREAD and parameters["latent_map"]
    latent_map = httpx.get(f"{server}/v1/latent_map.png")
    assert latent_map.headers["content-type"] == "image/png" and latent_map.content == png((200, 30, 30))


def digit_pixels(page) -> np.ndarray:
    return np.array(page.evaluate(
        "() => { const c = document.getElementById('digit'); return Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data); }"), dtype=np.uint8)


def shows_the_servers_digit(page, server: str) -> np.ndarray:
    """The #digit canvas (28x28 pixels scaled 8x, nearest) read back as grey levels, checked
    against the server's own decoding of the page's z; returns the grey levels."""
    side, scale = 28, 224 // 28
    rgba = digit_pixels(page).reshape(side * scale, side * scale, 4)
    grey = rgba[scale // 2::scale, scale // 2::scale, 0].astype(int)
    z = page.evaluate("() => window.latentPage.z")
    decoded = np.array(httpx.post(f"{server}/v1/decode", json={"z": [z]}).json()["images"]).reshape(side, side)
    assert np.abs(grey - np.round(255 * decoded)).max() <= 1, "the page does not show the server's digit for its z"
    return grey


def settle(page, updates_before: int) -> int:
    """Wait until a newer image than the updates_before-th is painted and none is pending."""
    page.wait_for_function("n => { const p = window.latentPage; return p.latencies.length > n && !p.inFlight"
                           " && !p.again; }", arg=updates_before, timeout=30_000)
    return page.evaluate("() => window.latentPage.latencies.length")


def test_sliders_move_the_image_a_seed_reproduces_it_and_nothing_errs(server):
    """The sliders come in the recorded order, labelled, and move with the keyboard; the image
    changes while they move; a seed draws the same image again; the interpolation strip and
    the latent map are shown; every request goes to the server itself; the console stays
    clean. A screenshot is kept in test-artifacts/, the update latency printed."""
    from playwright.sync_api import expect, sync_playwright

    chromium = system_program("/usr/bin/chromium", "chromium")
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors, requests = [], []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{server}/")
            updates = settle(page, 0)
            assert page.locator("#sliders label").all_inner_texts() == [f"z[{d}]" for d in ORDER]
            first = shows_the_servers_digit(page, server)

            slider = page.get_by_label("z[2]")  # the most used dimension, by keyboard alone
            slider.focus()
            for _ in range(15):
                page.keyboard.press("ArrowRight")
            updates = settle(page, updates)
            assert float(slider.input_value()) == pytest.approx(1.5)
            moved = shows_the_servers_digit(page, server)
            assert (moved != first).any(), "the image did not change as the slider moved"

            seeded = {}
            for seed in (7, 8, 7):
                page.get_by_label("Seed", exact=True).fill(str(seed))
                page.get_by_role("button", name="Draw z from the prior with this seed").click()
                updates = settle(page, updates)
                pixels = digit_pixels(page)
                if seed in seeded:
                    assert (pixels == seeded[seed]).all(), "seed 7 drew a different image the second time"
                seeded[seed] = pixels
            assert (seeded[7] != seeded[8]).any()
            page.get_by_role("button", name="Random").click()
            updates = settle(page, updates)
            assert page.get_by_label("Seed", exact=True).input_value() != "7"  # a new seed, shown

            page.get_by_role("button", name="Interpolate").click()
            page.wait_for_timeout(500)
            strip = page.evaluate("() => { const c = document.getElementById('strip'); return Array.from("
                                  "c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }")
            assert np.ptp(strip[0::4]) > 0  # digits painted along the strip, not one flat colour
            latent_map = page.get_by_alt_text("The evaluate stage's map", exact=False)
            expect(latent_map).to_be_visible()
            assert page.evaluate("() => document.getElementById('latent-map').naturalWidth") == 40
            page.screenshot(path=shots / "latent-page.png", full_page=True)
            latencies = page.evaluate("() => window.latentPage.latencies")
        finally:
            browser.close()
    assert not errors, errors
    assert requests and all(url.startswith(server) or url.startswith("data:") for url in requests), requests
    print(f"slider update, request to painted image: median {np.median(latencies):.1f} ms "
          f"over {len(latencies)} updates")
