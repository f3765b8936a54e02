"""`vae serve`: the exported graphs over HTTP on onnxruntime (CUDA when usable, else CPU).

Open Inference Protocol v2 (the KServe / Triton HTTP API), so their clients work unchanged:
  GET  /v2, /v2/health/live, /v2/health/ready
  GET  /v2/models/{name}, /v2/models/{name}/ready     metadata: shapes, sizes, providers
  POST /v2/models/{name}/infer    one input as JSON data or binary tensor data:
       vae-decoder  z FP32 [N, latent_dim]   -> image [N, 1, 28, 28]
       vae-encoder  x FP32 [N, 784] in [0, 1] -> mu, logvar [N, latent_dim]
       vae-score    x FP32 [N, 784] in [0, 1] -> score [N], -L_k in nats (parameters: {"seed": 0})
  each of the three also as /v2/models/{name}/versions/1/...: one version of each model
The latent-space page, a worked example of the protocol above (static/, no CDN):
  GET  /                               sliders over the latent dimensions, and a canvas to draw on
  GET  /v1/latent_map.png              the evaluate stage's latent map, when the export recorded it
Plain endpoints (the image ones take a PNG body, or JSON {"x": [[784 numbers], ...]}):
  GET  /v1/samples.png?n=64&seed=7     a PNG grid of digits decoded from prior samples
  POST /v1/decode {"z": [[...], ...]}  images (N, 1, 28, 28) of pixel probabilities
  POST /v1/encode                      mu and logvar of q(z|x), (N, latent_dim) each
  POST /v1/reconstruct                 the decoded posterior means, images (N, 1, 28, 28)
  POST /v1/score?seed=0                -L_k per image in nats: the larger, the less likely
  GET  /metrics                        Prometheus: requests, errors, latency, batch sizes
The encoder and score endpoints exist when the graphs were exported (`vae serve models/`).
One onnxruntime session per graph serves every request. A bad request gets a 4xx whose JSON
body {"error": ...} names the problem; a body past the size limit gets 413, read no further.
"""
from __future__ import annotations

import io
import math
import socket
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.registry import ENCODER_NAME, MODEL_NAME, SCORE_NAME, ModelFiles
from pipeline.serve.observability import Metrics, Observe
from pipeline.serve.protocol import (
    HEADER_LENGTH,
    ApiError,
    DecodeRequest,
    ImagesRequest,
    InferRequest,
    inline_schema,
    input_array,
    json_images,
    parse_infer,
    parsed,
    png_image,
    problems,
    rows_array,
)
from pipeline.serve.session import MODEL_VERSION, OnnxModel, open_models

STATIC = Path(__file__).parent / "static"  # the latent-space page's HTML, script and style
INLINE_BATCH = 64  # run up to 64 decoder passes on the event loop: a thread hop costs more than they do
BYTES_PER_FLOAT = 24  # generous JSON size of one float, for the body limit


def png_grid(images: np.ndarray, pad: int = 2) -> bytes:
    """(N, 1, 28, 28) probabilities -> a PNG of the digits in a near-square grid, white gaps."""
    n, side = len(images), images.shape[-1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (side + pad) + pad, cols * (side + pad) + pad), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        canvas[y:y + side, x:x + side] = np.rint(image[0] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


class NumpyJSON(Response):
    """JSON rendered by orjson, which writes numpy arrays directly (784 floats an image)."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def json_body(schema: type, more: dict | None = None) -> dict:
    """How an endpoint that reads its own body documents it in the OpenAPI spec (and is fuzzed
    from it): JSON of `schema`, and `more` content types."""
    content = {"application/json": {"schema": inline_schema(schema.model_json_schema())}}
    return {"requestBody": {"required": True, "content": content | (more or {})}}


IMAGES_BODY = json_body(ImagesRequest, {"image/png": {"schema": {"type": "string", "format": "binary"}}})
SEED = Query(0, ge=0, le=2**32 - 1, description="the score's noise: the same seed, the same score")


def create_app(files: ModelFiles | Path | str | bytes, max_batch: int = 1024) -> FastAPI:
    files = files if isinstance(files, ModelFiles) else ModelFiles(files)
    models, metrics = open_models(files, max_batch), Metrics()
    decoder = models[MODEL_NAME]
    # A body limit that still admits the largest allowed batch. Ours, not FastAPI's max_body_size,
    # whose 413 is plain text where every other error here is JSON that names the problem.
    limit = max_batch * max(model.width for model in models.values()) * BYTES_PER_FLOAT + 4096
    app = FastAPI(title="VAE", description=__doc__)
    app.add_exception_handler(ApiError, lambda request, e: _error(e.status, e.message))
    app.add_exception_handler(HTTPException, lambda request, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(RequestValidationError, lambda request, e: _error(400, problems(e.errors())))

    app.add_middleware(Observe, metrics=metrics)

    def infer_with(model: OnnxModel, batch: np.ndarray, parameters: dict) -> dict[str, np.ndarray]:
        outputs = model.infer(batch, parameters)  # batch checked by protocol.check_batch
        metrics.batch.labels(model.name).observe(len(batch))
        return outputs

    async def infer_sized(model: OnnxModel, batch: np.ndarray, parameters: dict | None = None):
        parameters = parameters or {}
        if len(batch) * model.cost <= INLINE_BATCH:
            return infer_with(model, batch, parameters)
        return await run_in_threadpool(infer_with, model, batch, parameters)

    def named(name: str, version: str | None = None) -> OnnxModel:
        if name not in models:
            known = ", ".join(map(repr, models))
            hint = "" if name not in (ENCODER_NAME, SCORE_NAME) else " (serve the export stage's folder, models/)"
            raise ApiError(404, f"unknown model {name!r}; this server has {known}{hint}")
        if version not in (None, MODEL_VERSION):
            raise ApiError(404, f"{name} has no version {version!r}; this server has version {MODEL_VERSION!r}")
        return models[name]

    async def read_body(request: Request) -> bytes:
        """The request's body, refused at the first byte past the limit (before any, when its
        Content-Length says so): no client makes the server buffer more."""
        def too_large(what: str) -> ApiError:
            return ApiError(413, f"request body of {what}, over this server's limit of {limit} bytes "
                                 f"(--max-batch {max_batch} rows): send fewer rows a request")

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(f"{declared} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def images(request: Request, model: OnnxModel) -> tuple[np.ndarray, dict]:
        """The images of a plain endpoint's body, a PNG or JSON, and a note on a converted PNG."""
        body = await read_body(request)
        if request.headers.get("content-type", "").split(";")[0].strip() == "image/png":
            x, note = png_image(body, model)
            return x, {"note": note} if note else {}
        return json_images(body, model), {}

    @app.get("/v2")
    def server_metadata():
        # `models` is ours, not the protocol's: which graphs this server has (the page asks).
        return {"name": "vae-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"], "models": list(models)}

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    # Each model's endpoints also answer under /versions/{version}, as the protocol has them
    # (tritonclient's model_version): a server holds version 1 of each model.
    @app.get("/v2/models/{name}")
    def model_metadata(name: str):
        return named(name).metadata()

    @app.get("/v2/models/{name}/versions/{version}")
    def version_metadata(name: str, version: str):
        return named(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    def model_ready(name: str):
        return {"name": named(name).name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    def version_ready(name: str, version: str):
        return {"name": named(name, version).name, "ready": True}

    @app.post("/v2/models/{name}/infer", openapi_extra=json_body(InferRequest))
    async def infer(name: str, request: Request):
        return await infer_on(named(name), request)

    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=json_body(InferRequest))
    async def version_infer(name: str, version: str, request: Request):
        return await infer_on(named(name, version), request)

    async def infer_on(model: OnnxModel, request: Request) -> NumpyJSON:
        body, binary = parse_infer(await read_body(request), request.headers.get(HEADER_LENGTH))
        batch = input_array(body, binary, model)
        outputs = await infer_sized(model, batch, request_parameters(body, model))
        wanted = [o.name for o in body.outputs] if body.outputs else list(outputs)
        response = {"model_name": model.name, "model_version": MODEL_VERSION,
                    "outputs": [{"name": name, "datatype": "FP32", "shape": list(outputs[name].shape),
                                 "data": outputs[name].ravel()} for name in wanted]}
        return NumpyJSON(response | ({"id": body.id} if body.id is not None else {}))

    @app.get("/v1/samples.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def samples(n: int = Query(64, ge=1, le=256), seed: int = Query(0, ge=0, le=2**32 - 1)):
        z = decoder.prior_samples(n, seed)
        return Response(png_grid(decoder.decode(z)), media_type="image/png")  # n is bounded by the query's check

    @app.post("/v1/decode", openapi_extra=json_body(DecodeRequest))
    async def decode_json(request: Request):
        z = rows_array(parsed(DecodeRequest, await read_body(request)).z, decoder)
        images = (await infer_sized(decoder, z))[decoder.output]
        return NumpyJSON({"shape": list(images.shape), "images": images})

    @app.post("/v1/encode", openapi_extra=IMAGES_BODY)
    async def encode(request: Request):
        encoder = named(ENCODER_NAME)
        x, note = await images(request, encoder)
        return NumpyJSON(await infer_sized(encoder, x) | note)

    @app.post("/v1/reconstruct", openapi_extra=IMAGES_BODY)
    async def reconstruct(request: Request):
        encoder = named(ENCODER_NAME)
        x, note = await images(request, encoder)
        mu = (await infer_sized(encoder, x))["mu"]
        reconstructions = (await infer_sized(decoder, mu))[decoder.output]
        return NumpyJSON({"shape": list(reconstructions.shape), "images": reconstructions, "mu": mu} | note)

    @app.post("/v1/score", openapi_extra=IMAGES_BODY)
    async def score(request: Request, seed: int = SEED):
        scorer = named(SCORE_NAME)
        x, note = await images(request, scorer)
        scores = (await infer_sized(scorer, x, {"seed": seed}))["score"]
        return NumpyJSON({"score": scores, "k": scorer.k, "seed": seed, "unit": "nats"} | note)

    @app.get("/", response_class=FileResponse, include_in_schema=False)
    def latent_page():
        return FileResponse(STATIC / "latent.html", media_type="text/html")

    @app.get("/v1/latent_map.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def latent_map():
        if decoder.latent_map is None:
            raise ApiError(404, "this decoder was exported without a latent map")
        return Response(decoder.latent_map, media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/metrics", response_class=Response)
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.models = models
    return app


def request_parameters(body: InferRequest, model: OnnxModel) -> dict:
    """The request's parameters the model uses: the score's noise seed, an integer in [0, 2^32)."""
    parameters = body.parameters or {}
    if model.name != SCORE_NAME or "seed" not in parameters:
        return {}
    seed = parameters["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ApiError(400, f"parameters.seed: {seed!r}; an integer from 0 to 2^32 - 1 required")
    return {"seed": seed}


def require_free_port(host: str, port: int) -> None:
    """Fail at once, naming the port, where this machine cannot listen on it: before the graphs
    are fetched and opened (uvicorn would say so after), and before Ray starts for `--ray` (Ray
    Serve's proxy gave up in a hundred lines of its actors' tracebacks)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConnectionError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); another "
                                  f"server holds the port, or the address is not this machine's") from None


def run(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1024) -> None:
    import uvicorn

    from pipeline.registry import resolve

    require_free_port(host, port)
    app = create_app(resolve(source), max_batch)
    models = app.state.models
    print(f"serve: {', '.join(models)} from {source} on {models[MODEL_NAME].sessions.where()}", flush=True)
    uvicorn.run(app, host=host, port=port)
