"""`vae serve`: the real server process on 127.0.0.1, decoding with onnxruntime."""
import io
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from pipeline.export import export_decoder, export_encoder, export_score
from pipeline.registry import GraphError, ModelFiles
from pipeline.serve.ray_serve import replica_gpus
from pipeline.serve.session import CUDA_FROM_BATCH, BySize, open_models, open_session
from vae.model import VAE, ImageDecoder, ImageEncoder, ImageScore, VAEConfig

from helpers import BIN, free_port, vae_serve

LATENT, K = 4, 5  # the latent size; the score's importance samples


@pytest.fixture(scope="module")
def decoder_and_onnx(tmp_path_factory):
    """A small random VAE's decoder and its ONNX file, with the encoder and the score graph
    (K samples) beside it, as the export stage writes them; and the VAE."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).eval()
    decoder, folder = ImageDecoder(model).eval(), tmp_path_factory.mktemp("serve")
    export_decoder(decoder, LATENT, folder / "decoder.onnx", opset=18)
    export_encoder(model, folder / "encoder.onnx", opset=18)
    export_score(model, K, folder / "score.onnx", opset=18)
    return decoder, folder / "decoder.onnx", model


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(decoder_and_onnx, server_log):
    """`vae serve` on the export folder: the three graphs."""
    with vae_serve(str(decoder_and_onnx[1].parent), server_log, "--max-batch", "16") as url:
        yield url


def test_health_and_metadata(server, server_log, decoder_and_onnx):
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    meta = httpx.get(f"{server}/v2/models/vae-decoder").json()
    assert meta["parameters"]["latent_dim"] == LATENT
    # CUDA exactly where torch finds a GPU (onnxruntime-gpu lists its provider everywhere); with
    # none, one session for every batch size.
    gpu = torch.cuda.is_available()
    assert meta["parameters"]["providers"] == ["CUDAExecutionProvider"] * gpu + ["CPUExecutionProvider"]
    assert meta["parameters"]["cpu_below_batch"] == (CUDA_FROM_BATCH if gpu else None)
    # ... and its first line says as much, with what it serves.
    where = f"CUDAExecutionProvider (batches under {CUDA_FROM_BATCH} on CPUExecutionProvider)" if gpu else \
        "CPUExecutionProvider"
    assert server_log.read_text().startswith(
        f"serve: vae-decoder, vae-encoder, vae-score from {decoder_and_onnx[1].parent} on {where}\n")
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
    ({"z": [[0.0] * (LATENT + 1)]}, f"z: shape [1, {LATENT + 1}]; vae-decoder takes [N, {LATENT}] with 1 <= N <= 16"),
    ({"z": [[0.0] * LATENT, [0.0] * (LATENT - 1)]}, "z: rows of different lengths"),
    ({"z": [[0.0] * LATENT] * 17}, "z: batch of 17; between 1 and 16 allowed"),
    ({"z": []}, "z: batch of 0; between 1 and 16 allowed"),
    ({"z": [["a"] * LATENT]}, "z.0.0: Input should be a valid number"),
    ({"x": [[0.0] * LATENT]}, "z: Field required"),
])
def test_bad_decode_requests_get_400_naming_the_problem(server, body, message):
    response = httpx.post(f"{server}/v1/decode", json=body)
    assert response.status_code == 400 and message in response.json()["error"]


def infer_body(z, **tensor):
    return {"inputs": [{"name": "z", "datatype": "FP32", "shape": list(np.shape(z)),
                        "data": np.asarray(z).ravel().tolist(), **tensor}]}


@pytest.mark.parametrize("body, status, message", [
    (infer_body(np.zeros((1, LATENT)), datatype="FP64"), 400, "z: datatype FP64; FP32 required"),
    (infer_body(np.zeros((1, LATENT + 1))), 400, f"vae-decoder takes [N, {LATENT}]"),
    (infer_body(np.zeros((17, LATENT))), 400, "with 1 <= N <= 16"),
    (infer_body(np.zeros((1, LATENT)), name="x"), 400, "exactly one input named 'z'"),
    (infer_body(np.zeros((2, LATENT)), shape=[1, LATENT]), 400, f"needs {LATENT} values, got {2 * LATENT}"),
    (infer_body(np.zeros((1, LATENT)), shape=[-1, LATENT]), 400, f"z: shape [-1, {LATENT}] has a negative dimension"),
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
    declared = post(b"0" * 2_000_000)  # refused on its Content-Length, JSON as every other error
    assert declared.status_code == 413 and "2000000 bytes, over this server's limit" in declared.json()["error"]
    chunked = httpx.post(f"{server}/v2/models/vae-decoder/infer", content=iter([b"0" * 100_000] * 20),
                         headers={"content-type": "application/json"})  # no Content-Length: counted as it comes
    assert chunked.status_code == 413 and "more than" in chunked.json()["error"], chunked.text
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200  # still serving


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded", None])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    """As `curl -d` sends it (a form's content type) or with none, /v1/decode reads JSON as the
    other endpoints do, and names a NaN as such, not as a body that is no object."""
    headers = {"content-type": content_type} if content_type else {}
    good = httpx.post(f"{server}/v1/decode", content=json.dumps({"z": [[0.0] * LATENT]}), headers=headers)
    assert good.status_code == 200 and good.json()["shape"] == [1, 1, 28, 28]
    nan = httpx.post(f"{server}/v1/decode", content='{"z": [[NaN, 0, 0, 0]]}', headers=headers)
    assert nan.status_code == 400 and nan.json() == {"error": "z.0.0: Input should be a finite number"}


def test_a_flood_of_bad_values_gets_a_short_answer(server):
    """A body of 50,000 bad values, under the size limit: the answer names the first problems
    and counts the rest, rather than listing each (a 12 MB body got 62 MB back)."""
    flat = httpx.post(f"{server}/v1/decode", json={"z": [0] * 50_000})  # numbers where rows belong
    assert flat.status_code == 400 and flat.json() == {"error": "z.0: Input should be a valid array"}
    words = httpx.post(f"{server}/v1/encode", json={"x": [["a"] * 784] * 60})
    assert words.status_code == 400
    assert words.json() == {"error": "x.0.0: Input should be a valid number, unable to parse string as a number"}
    shapeless = httpx.post(f"{server}/v2/models/vae-decoder/infer", json={"inputs": [{}] * 10_000})
    error = shapeless.json()["error"]  # each input lacks its name, shape and datatype
    assert shapeless.status_code == 400 and error.endswith("; and 29997 more") and len(error) < 300, error


def grey_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def png_bytes(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_server_lists_its_three_graphs_with_their_shapes(server):
    assert httpx.get(f"{server}/v2").json()["models"] == ["vae-decoder", "vae-encoder", "vae-score"]
    encoder, score = (httpx.get(f"{server}/v2/models/{name}").json() for name in ("vae-encoder", "vae-score"))
    assert encoder["inputs"] == score["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 784]}]
    assert [(o["name"], o["shape"]) for o in encoder["outputs"]] == [("mu", [-1, LATENT]), ("logvar", [-1, LATENT])]
    assert score["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    assert score["parameters"]["k"] == K and encoder["parameters"]["latent_dim"] == LATENT


def test_encode_reconstruct_and_score_match_torch(server, decoder_and_onnx):
    """JSON in, through both APIs; the score with the noise numpy draws from the request's seed."""
    decoder, _, model = decoder_and_onnx
    x = grey_images(3)
    with torch.no_grad():
        mu, logvar = (t.numpy() for t in ImageEncoder(model)(torch.from_numpy(x)))
        eps = np.random.default_rng(9).standard_normal((3, K, model.config.noise_dim), dtype=np.float32)
        score = ImageScore(model)(torch.from_numpy(x), torch.from_numpy(eps)).numpy()
        reconstruction = decoder(torch.from_numpy(mu)).numpy()
    encoded = httpx.post(f"{server}/v1/encode", json={"x": x.tolist()}).json()
    np.testing.assert_allclose(encoded["mu"], mu, atol=1e-5)
    np.testing.assert_allclose(encoded["logvar"], logvar, atol=1e-5)
    rebuilt = httpx.post(f"{server}/v1/reconstruct", json={"x": x.tolist()}).json()
    assert rebuilt["shape"] == [3, 1, 28, 28]
    np.testing.assert_allclose(rebuilt["images"], reconstruction, atol=1e-5)
    scored = httpx.post(f"{server}/v1/score", params={"seed": 9}, json={"x": x.tolist()}).json()
    assert scored["k"] == K and scored["seed"] == 9
    np.testing.assert_allclose(scored["score"], score, rtol=1e-5)
    infer = httpx.post(f"{server}/v2/models/vae-score/infer", json={
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 784], "data": x.ravel().tolist()}],
        "parameters": {"seed": 9}}).json()
    np.testing.assert_allclose(infer["outputs"][0]["data"], score, rtol=1e-5)


def test_a_score_depends_on_the_seed_and_the_images_row_not_on_the_batch(server):
    x = grey_images(4, seed=1)

    def scores(rows, seed):
        response = httpx.post(f"{server}/v1/score", params={"seed": seed}, json={"x": rows.tolist()})
        return np.array(response.json()["score"])

    whole, again, alone, other = scores(x, 3), scores(x, 3), scores(x[:1], 3), scores(x, 4)
    assert (whole == again).all() and whole[0] == alone[0] and (whole != other).all()


def test_a_png_is_one_image_and_one_not_28x28_grey_is_converted_and_said_so(server):
    from PIL import Image

    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255  # a "1"
    exact = httpx.post(f"{server}/v1/encode", content=png_bytes(digit), headers={"content-type": "image/png"}).json()
    as_json = httpx.post(f"{server}/v1/encode", json={"x": [(digit.ravel() / 255).tolist()]}).json()
    np.testing.assert_allclose(exact["mu"], as_json["mu"], atol=1e-6)
    assert "note" not in exact
    big = Image.fromarray(digit).resize((56, 56), Image.Resampling.NEAREST).convert("RGB")
    converted = httpx.post(f"{server}/v1/score", content=png_bytes(big), headers={"content-type": "image/png"}).json()
    assert converted["note"] == "converted from a 56x56 RGB PNG to 28x28 grey" and len(converted["score"]) == 1


@pytest.mark.parametrize("content, content_type, message", [
    ('{"x": [[0.5, 0.5]]}', "application/json", "x: shape [1, 2]; vae-"),  # vae-encoder or vae-score
    ('{"x": [[NaN]]}', "application/json", "x.0.0: Input should be a finite number"),
    ('{"x": [' + ", ".join(["[1.5" + ", 0" * 783 + "]"]) + "]}", "application/json",
     "x: values from 0 to 1.5; images are grey levels in [0, 1]"),
    ('{"x": [' + ", ".join(["[-0.1" + ", 0" * 783 + "]"]) + "]}", "application/json", "values from -0.1 to 0"),
    ('{"x": []}', "application/json", "x: batch of 0; between 1 and 16 allowed"),
    ('{"z": [[0]]}', "application/json", "x: Field required"),
    (b"GIF89a not a png", "image/png", "the body is not a PNG image"),
    (png_bytes(np.zeros((28, 28), dtype=np.uint8))[:45], "image/png", "the body is not a readable PNG image"),
], ids=["shape", "nan", "above-1", "below-0", "empty", "no-x", "not-png", "cut-png"])
def test_bad_images_get_400_naming_the_problem(server, content, content_type, message):
    for path in ("/v1/encode", "/v1/reconstruct", "/v1/score"):
        response = httpx.post(f"{server}{path}", content=content, headers={"content-type": content_type})
        assert response.status_code == 400 and message in response.json()["error"], (path, response.text)


def test_huge_pngs_infinite_binary_tensors_and_bad_seeds_are_refused(server):
    from PIL import Image

    huge = png_bytes(Image.new("1", (5000, 4000)))  # 20 megapixels in a few kilobytes
    response = httpx.post(f"{server}/v1/score", content=huge, headers={"content-type": "image/png"})
    assert response.status_code == 400 and "PNG of 5000x4000 pixels" in response.json()["error"]
    x = grey_images(1)
    x[0, 5] = np.inf
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 784],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    infinite = httpx.post(f"{server}/v2/models/vae-encoder/infer", content=header + x.tobytes(),
                          headers={"inference-header-content-length": str(len(header))})
    assert infinite.status_code == 400 and "x: NaN or infinite values" in infinite.json()["error"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 784], "data": grey_images(1).ravel().tolist()}]}
    for seed in (-1, 2**32, "7", 1.5):
        bad = httpx.post(f"{server}/v2/models/vae-score/infer", json=body | {"parameters": {"seed": seed}})
        assert bad.status_code == 400 and "parameters.seed" in bad.json()["error"], seed
    assert httpx.post(f"{server}/v1/score", params={"seed": -1}, json={"x": grey_images(1).tolist()}).status_code == 400


def test_binary_tensors_whose_stated_sizes_do_not_fit_the_body_are_refused(server):
    """The binary extension states two sizes: the JSON header's length, and each tensor's
    binary_data_size. Either one off by 4 bytes, or by 1, is named; the right ones decode."""
    z = np.zeros((1, LATENT), dtype="<f4")

    def post(size: int, past_the_end: bool = False) -> httpx.Response:
        header = json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, LATENT],
                                         "parameters": {"binary_data_size": size}}]}).encode()
        length = len(header) + z.nbytes + 1 if past_the_end else len(header)
        return httpx.post(f"{server}/v2/models/vae-decoder/infer", content=header + z.tobytes(),
                          headers={"inference-header-content-length": str(length)})

    assert post(z.nbytes).status_code == 200
    short = post(z.nbytes - 4)
    assert short.status_code == 400
    assert f"z: binary_data_size {z.nbytes - 4}, but {z.nbytes} binary bytes follow" in short.json()["error"]
    past = post(z.nbytes, past_the_end=True)
    error = past.json()["error"]
    assert past.status_code == 400 and error.startswith("Inference-Header-Content-Length: ") and "does not fit" in error


def test_graphs_of_different_models_are_refused_naming_the_sizes(decoder_and_onnx, tmp_path):
    export_encoder(VAE(VAEConfig(latent_dim=LATENT + 1, hidden_dims=(8,))), tmp_path / "encoder.onnx", opset=18)
    with pytest.raises(LookupError, match=f"the encoder's latent size {LATENT + 1} is not the decoder's {LATENT}"):
        open_models(ModelFiles(decoder_and_onnx[1], tmp_path / "encoder.onnx"), max_batch=4)


def test_a_graph_with_its_weights_beside_it_travels_to_a_replica_whole(decoder_and_onnx, tmp_path):
    """A replica on another node opens the graphs from bytes. An ONNX file may keep its weights
    in a data file beside it (MLflow's flavor logged the registry's decoder so by default):
    those weights go inline, and the bytes decode alone as the file does."""
    import onnx

    onnx.save_model(onnx.load(str(decoder_and_onnx[1])), str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.data", size_threshold=0)
    assert (tmp_path / "model.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    shipped = ModelFiles(tmp_path / "model.onnx").read().decoder
    (tmp_path / "model.data").unlink()  # the bytes must not need it
    z = np.random.default_rng(0).standard_normal((3, LATENT)).astype(np.float32)
    [alone] = open_session(shipped, ["CPUExecutionProvider"]).run(None, {"z": z})
    [from_file] = open_session(decoder_and_onnx[1], ["CPUExecutionProvider"]).run(None, {"z": z})
    np.testing.assert_array_equal(alone, from_file)


@pytest.mark.integration  # starts `vae serve`
def test_a_decoder_alone_serves_and_says_where_the_encoder_is(decoder_and_onnx, tmp_path):
    (tmp_path / "decoder.onnx").write_bytes(decoder_and_onnx[1].read_bytes())
    with vae_serve(str(tmp_path / "decoder.onnx"), tmp_path / "server.log") as url:
        assert httpx.get(f"{url}/v2").json()["models"] == ["vae-decoder"]
        response = httpx.post(f"{url}/v1/encode", json={"x": grey_images(1).tolist()})
        assert response.status_code == 404
        assert "unknown model 'vae-encoder'; this server has 'vae-decoder' (serve the export stage's folder, " \
               "models/)" == response.json()["error"]


@pytest.mark.integration  # starts `vae serve`
def test_missing_model_file_is_a_clear_error(tmp_path):
    result = subprocess.run([str(BIN / "vae"), "serve", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert result.returncode == 2 and "none.onnx: no such ONNX model" in result.stderr


def _cut_short(folder, name: str):
    """A copy of the export stage's folder with graph `name` cut short, as a failed copy leaves it."""
    shutil.copytree(folder, folder.parent / "copy")
    graph = folder.parent / "copy" / name
    graph.write_bytes(graph.read_bytes()[:2000])
    return graph


@pytest.mark.parametrize("name", ["decoder.onnx", "encoder.onnx", "score.onnx"])
def test_a_graph_cut_short_is_named_by_its_file(decoder_and_onnx, tmp_path, name):
    shutil.copytree(decoder_and_onnx[1].parent, tmp_path / "models")
    graph = _cut_short(tmp_path / "models", name)
    files = ModelFiles.in_folder(graph.parent)
    with pytest.raises(GraphError, match=f"^{graph}: onnxruntime cannot open it .*INVALID_PROTOBUF"):
        open_models(files, 8)
    with pytest.raises(GraphError, match=f"^{graph}: not an ONNX graph, cut short or corrupted"):
        files.read()  # what `vae serve --ray` sends its replicas
    with pytest.raises(GraphError, match="^vae-decoder's graph: onnxruntime cannot open it"):
        open_models(ModelFiles(graph.read_bytes()), 8)  # bytes, as a replica gets them


@pytest.mark.integration  # runs `vae serve`, which stops before it serves
@pytest.mark.parametrize("ray", [False, True], ids=["serve", "serve --ray"])
def test_a_graph_cut_short_stops_serve_before_anything_starts(decoder_and_onnx, tmp_path, ray):
    shutil.copytree(decoder_and_onnx[1].parent, tmp_path / "models")
    graph = _cut_short(tmp_path / "models", "score.onnx")
    result = subprocess.run([str(BIN / "vae"), "serve", *(["--ray"] if ray else []), str(graph.parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # the error alone: no traceback, no Ray or Serve started
    # --ray reads the graphs' bytes to send (onnx's parser); plain serve opens them (onnxruntime's).
    said = "not an ONNX graph, cut short or corrupted" if ray else "onnxruntime cannot open it"
    assert line.startswith(f"vae serve: error: {graph}: {said}")


@pytest.mark.integration  # runs `vae serve`, which stops before it opens a graph or starts Ray
@pytest.mark.parametrize("ray", [False, True])
def test_a_port_already_taken_is_named_before_anything_starts(tmp_path, ray):
    """On a port another server holds, Ray Serve's proxy gave up after Ray had started, in a
    hundred lines of its actors' tracebacks; uvicorn said so after the graphs were opened (or
    fetched from the registry), among its log lines, with exit 3. The registry here holds no
    such model: asked first, it would be what the error names."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray: its proxy binds here
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        result = subprocess.run([str(BIN / "vae"), "serve", *(["--ray"] if ray else []), "--port", str(port),
                                 "models:/vae-decoder@champion"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # no Ray started, no traceback
    assert line == (f"vae serve: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in "
                    f"use); another server holds the port, or the address is not this machine's")


@pytest.mark.integration  # runs `vae serve --ray`, which stops before it serves
def test_serve_on_a_ray_address_where_nothing_answers_names_it_in_seconds(decoder_and_onnx):
    silent = f"127.0.0.1:{free_port()}"
    result = subprocess.run([str(BIN / "vae"), "serve", "--ray", str(decoder_and_onnx[1].parent)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "RAY_ADDRESS": silent})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # before ray.init, which retried for minutes
    assert line.startswith(f"vae serve: error: no Ray cluster answers at {silent} (RAY_ADDRESS): ")


@pytest.mark.parametrize("command, flag, value, message", [
    ("serve", "--port", "70000", "must be 1 to 65535, not 70000"),  # uvicorn bound 4464 and reported 70000
    ("serve", "--port", "http", "'http' is not an integer"),
    ("serve", "--max-batch", "0", "must be at least 1, not 0"),
    ("serve", "--replicas", "0", "must be at least 1, not 0"),  # Ray Serve: a traceback
    ("serve", "--replica-cpus", "-1", "must be at least 0, not -1"),
    ("serve", "--replica-cpus", "nan", "must be at least 0, not nan"),
    ("sample", "--n", "0", "must be at least 1, not 0"),
    ("sample", "--seed", str(2**32), f"must be 0 to {2**32 - 1}, not {2**32}"),  # as the server's seeds
    ("encode", "--batch-size", "0", "must be at least 1, not 0"),
    ("sweep", "--jobs", "0", "must be at least 1, not 0"),  # started no worker, then waited a day
])
def test_bad_numbers_on_the_command_line_are_named_before_anything_starts(capsys, command, flag, value, message):
    from pipeline.cli import parser

    given = {"serve": ["serve", "models/", "--ray"], "sample": ["sample", "--out", "s.png"],
             "encode": ["encode", "x.npy", "--out", "l.csv"], "sweep": ["sweep"]}[command]
    with pytest.raises(SystemExit) as exited:
        parser().parse_args([*given, flag, value])
    assert exited.value.code == 2 and f"{flag}: {message}" in capsys.readouterr().err
    assert parser().parse_args(["serve", "models/", "--port", "65535", "--replica-cpus", "0"]).port == 65535


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


def test_a_model_answers_at_its_version_as_the_protocol_has_it(server, decoder_and_onnx):
    """tritonclient's model_version="1" asks /v2/models/{name}/versions/1/...; another version
    is a 404 naming the one served."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_model_ready("vae-score", "1")
    assert client.get_model_metadata("vae-decoder", "1") == httpx.get(f"{server}/v2/models/vae-decoder").json()
    z = np.random.default_rng(2).standard_normal((2, LATENT)).astype(np.float32)
    tensor = triton.InferInput("z", list(z.shape), "FP32")
    tensor.set_data_from_numpy(z)
    result = client.infer("vae-decoder", [tensor], model_version="1")
    assert result.get_response()["model_version"] == "1"
    with torch.no_grad():
        expected = decoder_and_onnx[0](torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(result.as_numpy("image"), expected, atol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="no version '2'; this server has version '1'"):
        client.infer("vae-decoder", [tensor], model_version="2")
    assert not client.is_model_ready("vae-decoder", "2")


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
    assert 'vae_batch_size_bucket{le="4.0",model="vae-decoder"}' in text and "vae_request_seconds_bucket" in text


def test_openapi_fuzzing_never_gets_a_5xx(server):
    """At least 1000 requests generated from our OpenAPI spec, valid and invalid ones, over
    every endpoint, the encoder's and the score's (JSON and PNG bodies) among them."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    sent, failures, seen = [0], [], set()

    for mode, examples in ((GenerationMode.POSITIVE, 600), (GenerationMode.NEGATIVE, 600)):
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def send(case):
            response = case.call(base_url=server, timeout=30)
            sent[0] += 1
            seen.add((case.path, case.media_type))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        send()
    assert sent[0] >= 1000 and not failures, failures[:5]
    for path in ("/v1/encode", "/v1/reconstruct", "/v1/score"):
        assert {(path, "application/json"), (path, "image/png")} <= seen, seen
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_ray_serve_with_two_replicas(decoder_and_onnx, ray_address, tmp_path):
    """`vae serve --ray --replicas 2` on the test's 2-node Ray cluster: both replicas run
    (one per node: each node has one CPU), and requests through Serve's proxy decode right and
    reach the encoder that travelled with the decoder."""
    from ray import serve

    from helpers import git_env

    decoder, onnx_path, _ = decoder_and_onnx  # the encoder and score graphs beside it go too
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
            encoded = client.post(f"{url}/v1/encode", json={"x": grey_images(2).tolist()})
            assert encoded.status_code == 200 and np.shape(encoded.json()["mu"]) == (2, LATENT)
    finally:
        process.terminate()
        returncode = process.wait(timeout=60)
        serve.shutdown()  # in case the process could not: later tests need the cluster's CPUs
    assert returncode == 0, (tmp_path / "serve.log").read_text()  # SIGTERM took the replicas down itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_on_a_gpu_the_served_sessions_hold_exports_tolerance(decoder_and_onnx):
    """The CUDA session runs in float32 (in TF32, the provider's default, the decoder was 7.8e-5
    from torch on an H200), so export's check of both served sessions holds on a GPU."""
    from pipeline.export import check_parity
    from pipeline.params import ExportParams

    decoder, path, _ = decoder_and_onnx
    assert BySize.open(path).large.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
    report = check_parity(decoder, LATENT, path, ExportParams())
    assert report["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# A stand-in for the NVIDIA driver's library, for the two calls cuda_usable makes: it sees
# STAND_IN_GPUS devices, and none when CUDA_VISIBLE_DEVICES is set and empty, as the driver does.
STAND_IN_DRIVER = r"""
#include <stdlib.h>
static int hidden(void) { const char *v = getenv("CUDA_VISIBLE_DEVICES"); return v && !*v; }
int cuInit(unsigned int flags) { return hidden() ? 100 : 0; }
int cuDeviceGetCount(int *count) { *count = atoi(getenv("STAND_IN_GPUS")); return 0; }
"""


def cuda_usable_in(env: dict[str, str]) -> bool:
    """pipeline.serve.session.cuda_usable() in a fresh process with these variables set."""
    result = subprocess.run([sys.executable, "-c", "from pipeline.serve.session import cuda_usable; "
                             "print(cuda_usable())"], env={**os.environ, **env}, capture_output=True, text=True,
                            check=True, timeout=60)
    return {"True": True, "False": False}[result.stdout.strip()]


def test_cuda_is_requested_only_where_the_driver_sees_a_device(tmp_path):
    """The driver's library loading is not enough (onnxruntime would fail on CUDA and log it):
    cuda_usable asks the driver for its GPUs. A stand-in driver, compiled here, answers as the
    real one does; a GPU node checks the real one below."""
    cc = shutil.which("cc") or pytest.skip("needs a C compiler (cc) to build the stand-in driver")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), "-x", "c", "-"],
                   input=STAND_IN_DRIVER, text=True, check=True)
    driver = {"LD_LIBRARY_PATH": str(tmp_path)}
    assert cuda_usable_in({**driver, "STAND_IN_GPUS": "1"})
    assert not cuda_usable_in({**driver, "STAND_IN_GPUS": "0"})  # a container: the library, no device
    assert not cuda_usable_in({**driver, "STAND_IN_GPUS": "1", "CUDA_VISIBLE_DEVICES": ""})
    if not torch.cuda.is_available():  # and no driver at all
        assert not cuda_usable_in({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_on_a_gpu_cuda_is_requested_unless_every_gpu_is_hidden():
    assert cuda_usable_in({}) and not cuda_usable_in({"CUDA_VISIBLE_DEVICES": ""})


def test_small_batches_go_to_the_small_batch_session(decoder_and_onnx):
    """BySize's routing, with two real CPU sessions standing for the CPU and the CUDA one."""
    path = decoder_and_onnx[1]
    large, small = open_session(path, ["CPUExecutionProvider"]), open_session(path, ["CPUExecutionProvider"])
    by_size = BySize(large, small, from_batch=32)
    assert by_size(1) is small and by_size(31) is small and by_size(32) is large and by_size(1024) is large
    assert by_size.describe()["cpu_below_batch"] == 32
    alone = BySize(large, None, from_batch=32)
    assert alone(1) is large and alone.describe() == {"providers": ["CPUExecutionProvider"], "cpu_below_batch": None}


@pytest.mark.parametrize("node_gpus, replicas, each", [
    ((0,), 2, 0.0), ((1,), 2, 0.5), ((1,), 1, 1.0), ((4,), 2, 1.0), ((0, 2), 4, 0.5),
    ((1, 1), 3, 0.5),  # 2/3 of the cluster's two GPUs each would fit only two replicas
    ((3, 1), 5, 0.75),  # four on the first node, one on the second
])
def test_ray_serve_replicas_hold_the_clusters_gpus(node_gpus, replicas, each):
    from pipeline.ray_connect import workers_fit

    nodes = [{"CPU": 16.0, "GPU": float(g)} for g in node_gpus]
    assert replica_gpus(nodes, replicas) == each
    if each:  # all fit, and with a larger share (at most one GPU) they would not
        assert workers_fit(nodes, replicas, 0, each) and (each == 1 or not workers_fit(nodes, replicas, 0, each + 0.01))


def test_replicas_that_cannot_fit_on_a_local_ray_are_refused(monkeypatch):
    from pipeline.ray_connect import PlacementError, require_room

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PlacementError, match=r"--replicas, --replica-cpus: 3 replicas of 1 CPU each do not fit on "
                                             r"this machine's Ray \(2 CPUs and 0 GPUs\)"):
        require_room([{"CPU": 2.0}], 3, 1, 0, None, "replica", "--replicas, --replica-cpus")
    require_room([{"CPU": 2.0}], 4, 0.5, 0, None, "replica", "--replicas, --replica-cpus")  # half a CPU each: fits
