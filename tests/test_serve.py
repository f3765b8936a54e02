"""`vae serve`: the real server process on 127.0.0.1, decoding with onnxruntime."""
import io
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch

from pipeline.export import export_decoder
from pipeline.serve.ray_serve import replica_gpus
from pipeline.serve.session import CUDA_FROM_BATCH, BySize, open_session
from vae.model import VAE, ImageDecoder, VAEConfig

from helpers import BIN, free_port, vae_serve

LATENT = 4


@pytest.fixture(scope="module")
def decoder_and_onnx(tmp_path_factory):
    torch.manual_seed(0)
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,)))).eval()
    path = tmp_path_factory.mktemp("serve") / "decoder.onnx"
    export_decoder(decoder, LATENT, path, opset=18)
    return decoder, path


@pytest.fixture(scope="module")
def server(decoder_and_onnx, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with vae_serve(str(decoder_and_onnx[1]), log_path, "--max-batch", "16") as url:
        yield url


def test_health_and_metadata(server):
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    meta = httpx.get(f"{server}/v2/models/vae-decoder").json()
    assert meta["parameters"]["latent_dim"] == LATENT
    # CUDA exactly where torch finds a GPU (onnxruntime-gpu lists its provider everywhere); with
    # none, one session for every batch size.
    gpu = torch.cuda.is_available()
    assert meta["parameters"]["providers"] == ["CUDAExecutionProvider"] * gpu + ["CPUExecutionProvider"]
    assert meta["parameters"]["cpu_below_batch"] == (CUDA_FROM_BATCH if gpu else None)
    assert meta["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, LATENT]}]
    assert meta["outputs"][0]["shape"] == [-1, 1, 28, 28]
    # Exported without the latent record: the page's sliders in index order, no map.
    assert meta["parameters"]["latent_order"] == list(range(LATENT)) and meta["parameters"]["latent_spread"] is None
    no_map = httpx.get(f"{server}/v1/latent_map.png")
    assert no_map.status_code == 404 and no_map.json() == {"error": "this decoder was exported without a latent map"}
    assert "<title>VAE decoder: the latent space</title>" in httpx.get(f"{server}/").text


def test_decode_matches_torch(server, decoder_and_onnx):
    z = np.random.default_rng(0).standard_normal((3, LATENT)).astype(np.float32)
    response = httpx.post(f"{server}/v1/decode", json={"z": z.tolist()})
    assert response.status_code == 200 and response.json()["shape"] == [3, 1, 28, 28]
    with torch.no_grad():
        expected = decoder_and_onnx[0](torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.array(response.json()["images"]), expected, atol=1e-5)


@pytest.mark.parametrize("body, message", [
    ({"z": [[0.0] * (LATENT + 1)]}, f"z: shape [1, {LATENT + 1}]; the decoder takes [N, {LATENT}] with 1 <= N <= 16"),
    ({"z": [[0.0] * LATENT, [0.0] * (LATENT - 1)]}, "z: rows of different lengths"),
    ({"z": [[0.0] * LATENT] * 17}, "z: batch of 17; between 1 and 16 allowed"),
    ({"z": []}, "z: batch of 0; between 1 and 16 allowed"),
    ({"z": [["a"] * LATENT]}, "body.z.0.0"),
    ({"x": [[0.0] * LATENT]}, "body.z: Field required"),
])
def test_bad_decode_requests_get_400_naming_the_problem(server, body, message):
    response = httpx.post(f"{server}/v1/decode", json=body)
    assert response.status_code == 400 and message in response.json()["error"]


def infer_body(z, **tensor):
    return {"inputs": [{"name": "z", "datatype": "FP32", "shape": list(np.shape(z)),
                        "data": np.asarray(z).ravel().tolist(), **tensor}]}


@pytest.mark.parametrize("body, status, message", [
    (infer_body(np.zeros((1, LATENT)), datatype="FP64"), 400, "z: datatype FP64; FP32 required"),
    (infer_body(np.zeros((1, LATENT + 1))), 400, f"the decoder takes [N, {LATENT}]"),
    (infer_body(np.zeros((17, LATENT))), 400, "with 1 <= N <= 16"),
    (infer_body(np.zeros((1, LATENT)), name="x"), 400, "exactly one input named 'z'"),
    (infer_body(np.zeros((2, LATENT)), shape=[1, LATENT]), 400, f"needs {LATENT} values, got {2 * LATENT}"),
    (infer_body(np.zeros((1, LATENT)), data=["a"] * LATENT), 400, "data is not FP32 numbers"),
    (infer_body(np.zeros((1, LATENT))) | {"outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ({"inputs": []}, 400, "inputs: List should have at least 1 item"),
])
def test_bad_infer_requests_get_4xx_naming_the_problem(server, body, status, message):
    response = httpx.post(f"{server}/v2/models/vae-decoder/infer", json=body)
    assert response.status_code == status and message in response.json()["error"]


def test_unknown_model_is_404(server):
    response = httpx.post(f"{server}/v2/models/other/infer", json=infer_body(np.zeros((1, LATENT))))
    assert response.status_code == 404 and "unknown model 'other'" in response.json()["error"]


def test_nan_malformed_and_oversized_bodies(server):
    def post(content):
        return httpx.post(f"{server}/v1/decode", content=content, headers={"content-type": "application/json"})

    nan = post('{"z": [[NaN, 0, 0, 0]]}')
    assert nan.status_code == 400 and "finite number" in nan.text
    assert post('{"z": [[0, 0').status_code == 400
    infer_nan = httpx.post(f"{server}/v2/models/vae-decoder/infer", headers={"content-type": "application/json"},
                           content='{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], '
                                   '"data": [NaN, 0, 0, 0]}]}')
    assert infer_nan.status_code == 400 and "NaN or infinite" in infer_nan.json()["error"]
    assert post(b"0" * 2_000_000).status_code == 413
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200  # still serving


@pytest.mark.integration  # starts `vae serve`
def test_missing_model_file_is_a_clear_error(tmp_path):
    result = subprocess.run([str(BIN / "vae"), "serve", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert result.returncode == 2 and "none.onnx: no such ONNX model" in result.stderr


@pytest.mark.parametrize("binary", [False, True])
def test_triton_client_infers_unchanged(server, decoder_and_onnx, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("vae-decoder")
    assert client.get_model_metadata("vae-decoder")["inputs"][0]["shape"] == [-1, LATENT]
    z = np.random.default_rng(1).standard_normal((5, LATENT)).astype(np.float32)
    tensor = triton.InferInput("z", list(z.shape), "FP32")
    tensor.set_data_from_numpy(z, binary_data=binary)
    result = client.infer("vae-decoder", [tensor], outputs=[triton.InferRequestedOutput("image", binary_data=binary)])
    with torch.no_grad():
        expected = decoder_and_onnx[0](torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(result.as_numpy("image"), expected, atol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="unknown model 'other'"):
        client.infer("other", [tensor])


def test_samples_png_is_deterministic_per_seed(server):
    from PIL import Image

    first, again, other = (httpx.get(f"{server}/v1/samples.png", params={"n": 16, "seed": s}) for s in (7, 7, 8))
    assert first.headers["content-type"] == "image/png" and first.content == again.content != other.content
    with Image.open(io.BytesIO(first.content)) as image:
        assert image.size == (4 * 30 + 2, 4 * 30 + 2)  # a 4x4 grid of 28-pixel digits, 2-pixel gaps
    assert httpx.get(f"{server}/v1/samples.png", params={"n": 0}).status_code == 400


def test_prometheus_metrics_count_requests_and_batches(server):
    httpx.post(f"{server}/v2/models/vae-decoder/infer", json=infer_body(np.zeros((3, LATENT))))
    httpx.post(f"{server}/v2/models/vae-decoder/infer", json=infer_body(np.zeros((3, LATENT)), datatype="INT8"))
    text = httpx.get(f"{server}/metrics").text
    assert 'vae_requests_total{code="200",route="/v2/models/{name}/infer"}' in text
    assert 'vae_errors_total{route="/v2/models/{name}/infer"}' in text
    assert 'vae_batch_size_bucket{le="4.0"}' in text and "vae_request_seconds_bucket" in text


def test_openapi_fuzzing_never_gets_a_5xx(server):
    """At least 1000 requests generated from our OpenAPI spec, valid and invalid ones."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    sent, failures = [0], []

    for mode, examples in ((GenerationMode.POSITIVE, 600), (GenerationMode.NEGATIVE, 600)):
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def send(case):
            response = case.call(base_url=server, timeout=30)
            sent[0] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        send()
    assert sent[0] >= 1000 and not failures, failures[:5]
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_ray_serve_with_two_replicas(decoder_and_onnx, ray_address, tmp_path):
    """`vae serve --ray --replicas 2` on the test's 2-node Ray cluster: both replicas run
    (one per node: each node has one CPU), and requests through Serve's proxy decode right."""
    from ray import serve

    from helpers import git_env

    decoder, onnx_path = decoder_and_onnx
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen([str(BIN / "vae"), "serve", str(onnx_path), "--ray", "--replicas", "2",
                                    "--port", str(port)], env=git_env(RAY_ADDRESS=ray_address), stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while "replicas of" not in (tmp_path / "serve.log").read_text():  # printed once serve.run returns
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        while serve.status().applications["vae-decoder"].deployments["vae-decoder"].replica_states != {"RUNNING": 2}:
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        assert "latent.js" in httpx.get(f"{url}/").text  # the latent-space page, through Serve's proxy
        assert "priorSample" in httpx.get(f"{url}/static/latent.js").text
        z = np.random.default_rng(1).standard_normal((20, 5, LATENT)).astype(np.float32)
        with torch.no_grad():
            expected = decoder(torch.from_numpy(z.reshape(-1, LATENT))).numpy().reshape(20, 5, 1, 28, 28)
        with httpx.Client(timeout=30) as client:
            for batch, want in zip(z, expected):
                response = client.post(f"{url}/v1/decode", json={"z": batch.tolist()})
                assert response.status_code == 200, response.text
                np.testing.assert_allclose(np.array(response.json()["images"]), want, atol=1e-5)
            assert client.post(f"{url}/v1/decode", json={"z": [[0.0]]}).status_code == 400  # still our errors
    finally:
        process.terminate()
        returncode = process.wait(timeout=60)
        serve.shutdown()  # in case the process could not: later tests need the cluster's CPUs
    assert returncode == 0, (tmp_path / "serve.log").read_text()  # SIGTERM took the replicas down itself


def test_small_batches_go_to_the_small_batch_session(decoder_and_onnx):
    """BySize's routing, with two real CPU sessions standing for the CPU and the CUDA one."""
    path = decoder_and_onnx[1]
    large, small = open_session(path, ["CPUExecutionProvider"]), open_session(path, ["CPUExecutionProvider"])
    by_size = BySize(large, small, from_batch=32)
    assert by_size(1) is small and by_size(31) is small and by_size(32) is large and by_size(1024) is large
    assert by_size.describe()["cpu_below_batch"] == 32
    alone = BySize(large, None, from_batch=32)
    assert alone(1) is large and alone.describe() == {"providers": ["CPUExecutionProvider"], "cpu_below_batch": None}


@pytest.mark.parametrize("cluster_gpus, replicas, each", [(0, 2, 0.0), (1, 2, 0.5), (1, 1, 1.0), (4, 2, 1.0)])
def test_ray_serve_replicas_hold_the_clusters_gpus(cluster_gpus, replicas, each):
    assert replica_gpus(cluster_gpus, replicas) == each
