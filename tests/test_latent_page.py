"""The latent-space page of `vae serve`, in a real browser: headless Chromium (Debian's,
driven by Playwright) against the real server on 127.0.0.1, with a decoder whose ONNX
metadata records its latent order, spread and map as the export stage writes them, and the
encoder and score graphs beside it."""
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.export import export_decoder, export_encoder, export_score, record_metadata
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
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).eval()
    export_decoder(ImageDecoder(model), LATENT, root / "decoder.onnx", opset=18)
    export_encoder(model, root / "encoder.onnx", opset=18)
    export_score(model, 5, root / "score.onnx", opset=18)
    record_metadata(root / "decoder.onnx", {LATENT_ORDER: json.dumps(ORDER), LATENT_SPREAD: json.dumps(SPREAD),
                                            LATENT_MAP: base64.b64encode(png((200, 30, 30))).decode()})
    with vae_serve(str(root), root / "server.log") as url:
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


def canvas_red(page, canvas_id: str) -> np.ndarray:
    """A 224x224 canvas's red channel (grey level), read back."""
    return np.array(page.evaluate(
        f"() => {{ const c = document.getElementById('{canvas_id}'); return Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data); }"), dtype=np.uint8).reshape(224, 224, 4)[..., 0]


def test_a_digit_drawn_with_the_mouse_is_encoded_reconstructed_and_scored(server):
    """Two strokes drawn with mouse events on the pad: on release the sliders hold the server's
    latent mean of the drawing, the canvas beside it the server's reconstruction, and the score
    is the server's, seed 0; a second drawing moves all three."""
    from playwright.sync_api import sync_playwright

    chromium = system_program("/usr/bin/chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            errors = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{server}/")
            settle(page, 0)
            box = page.locator("#pad").bounding_box()
            answers = []
            for strokes in ([[(0.5, 0.15), (0.5, 0.85)]], [[(0.3, 0.3), (0.7, 0.3), (0.3, 0.8), (0.7, 0.8)]]):
                page.get_by_role("button", name="Clear").click()
                encoded = page.evaluate("() => window.latentPage.encoded")
                for stroke in strokes:
                    page.mouse.move(box["x"] + stroke[0][0] * box["width"], box["y"] + stroke[0][1] * box["height"])
                    page.mouse.down()
                    for fx, fy in stroke[1:]:
                        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=8)
                    page.mouse.up()
                page.wait_for_function("n => window.latentPage.encoded > n && !window.latentPage.inFlight",
                                       arg=encoded, timeout=30_000)
                answers.append(check_the_drawing_against_the_server(page, server))
            page.locator("#draw-section").screenshot(path=ROOT / "test-artifacts" / "latent-page-drawing.png")
        finally:
            browser.close()
    assert not errors, errors
    assert answers[0]["score"] != answers[1]["score"] and answers[0]["mu"] != answers[1]["mu"]


def check_the_drawing_against_the_server(page, server: str) -> dict:
    drawing = np.array(page.evaluate("() => window.latentPage.drawing"))
    assert drawing.shape == (784,) and drawing.max() > 0.9 and (drawing > 0.5).mean() < 0.5  # strokes, not a fill
    rebuilt = httpx.post(f"{server}/v1/reconstruct", json={"x": [drawing.tolist()]}).json()
    scored = httpx.post(f"{server}/v1/score", params={"seed": 0}, json={"x": [drawing.tolist()]}).json()
    mu = rebuilt["mu"][0]
    np.testing.assert_allclose(page.evaluate("() => window.latentPage.z"), mu, atol=1e-5)
    sliders = [float(page.get_by_label(f"z[{d}]").input_value()) for d in ORDER]
    np.testing.assert_allclose(sliders, [np.clip(round(mu[d], 1), -3, 3) for d in ORDER], atol=0.051)
    reconstruction = np.round(255 * np.array(rebuilt["images"][0]).reshape(28, 28))
    assert np.abs(canvas_red(page, "reconstruction")[4::8, 4::8] - reconstruction).max() <= 1  # 8x, nearest
    pad_blocks = canvas_red(page, "pad").reshape(28, 8, 28, 8).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(pad_blocks.ravel(), drawing, atol=1e-6)  # what was sent is what is drawn
    assert page.evaluate("() => window.latentPage.score") == pytest.approx(scored["score"][0], rel=1e-5)
    assert page.locator("#score").inner_text().startswith(f"{scored['score'][0]:.1f} nats")
    return {"score": scored["score"][0], "mu": mu}
