"""`vae serve`: the real server process on 127.0.0.1, decoding with onnxruntime."""
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import BIN, free_port
from pipeline.export import export_decoder
from vae.model import VAE, ImageDecoder, VAEConfig

LATENT = 4


@pytest.fixture(scope="module")
def decoder_and_onnx(tmp_path_factory):
    torch.manual_seed(0)
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).decoder).eval()
    path = tmp_path_factory.mktemp("serve") / "decoder.onnx"
    export_decoder(decoder, LATENT, path, opset=18)
    return decoder, path


@pytest.fixture(scope="module")
def server(decoder_and_onnx):
    port = free_port()
    process = subprocess.Popen([str(BIN / "vae"), "serve", str(decoder_and_onnx[1]), "--port", str(port),
                                "--max-batch", "16"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"server did not become ready:\n{process.communicate()[0]}")
    yield url
    process.terminate()
    log = process.communicate(timeout=30)[0]
    print(log)
    assert "Traceback" not in log  # no request made it crash


def test_health_and_metadata(server):
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    meta = httpx.get(f"{server}/v2/models/vae-decoder").json()
    assert meta["latent_dim"] == LATENT and meta["providers"][-1] == "CPUExecutionProvider"
    assert meta["outputs"][0]["shape"] == [-1, 1, 28, 28]


def test_decode_matches_torch(server, decoder_and_onnx):
    z = np.random.default_rng(0).standard_normal((3, LATENT)).astype(np.float32)
    response = httpx.post(f"{server}/v1/decode", json={"z": z.tolist()})
    assert response.status_code == 200 and response.json()["shape"] == [3, 1, 28, 28]
    with torch.no_grad():
        expected = decoder_and_onnx[0](torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.array(response.json()["images"]), expected, atol=1e-5)


@pytest.mark.parametrize("body, status, message", [
    ({"z": [[0.0] * (LATENT + 1)]}, 422, f"z[0]: {LATENT + 1} values; the decoder takes {LATENT}"),
    ({"z": [[0.0] * LATENT] * 17}, 422, "batch of 17 latent vectors; between 1 and 16 allowed"),
    ({"z": []}, 422, "batch of 0"),
    ({"z": [["a"] * LATENT]}, 422, "body.z.0.0"),
    ({"x": [[0.0] * LATENT]}, 422, "body.z: Field required"),
])
def test_bad_requests_get_4xx_naming_the_problem(server, body, status, message):
    response = httpx.post(f"{server}/v1/decode", json=body)
    assert response.status_code == status and message in response.text


def test_nan_malformed_and_oversized_bodies(server):
    post = lambda content: httpx.post(f"{server}/v1/decode", content=content,
                                      headers={"content-type": "application/json"})
    nan = post('{"z": [[NaN, 0, 0, 0]]}')
    assert nan.status_code == 422 and "finite number" in nan.text
    assert post('{"z": [[0, 0').status_code == 422
    assert post(b"0" * 2_000_000).status_code == 413
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200  # still serving


def test_missing_model_file_is_a_clear_error(tmp_path):
    result = subprocess.run([str(BIN / "vae"), "serve", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert result.returncode == 2 and "none.onnx: no such ONNX model" in result.stderr
