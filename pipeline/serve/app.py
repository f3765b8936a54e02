"""`vae serve`: the ONNX decoder over HTTP on onnxruntime (CUDA when usable, else CPU).

Open Inference Protocol v2 (the KServe / Triton HTTP API), so their clients work unchanged:
  GET  /v2, /v2/health/live, /v2/health/ready
  GET  /v2/models/vae-decoder, /v2/models/vae-decoder/ready     metadata: shapes, latent size, providers
  POST /v2/models/vae-decoder/infer    input `z` FP32 [N, latent_dim] as JSON data or binary tensor data
The latent-space page, a worked example of the protocol above (static/, no CDN):
  GET  /                               sliders over the latent dimensions, most used first
  GET  /v1/latent_map.png              the evaluate stage's latent map, when the export recorded it
Plain endpoints:
  GET  /v1/samples.png?n=64&seed=7     a PNG grid of digits decoded from prior samples
  POST /v1/decode {"z": [[...], ...]}  images (N, 1, 28, 28) of pixel probabilities
  GET  /metrics                        Prometheus: requests, errors, latency, batch sizes
One onnxruntime session serves every request. A bad request gets a 4xx whose JSON body
{"error": ...} names the problem; bodies above the size limit get 413.
"""
from __future__ import annotations

import io
import math
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

from pipeline.registry import MODEL_NAME
from pipeline.serve.observability import Metrics, Observe
from pipeline.serve.protocol import (
    HEADER_LENGTH,
    ApiError,
    DecodeRequest,
    InferRequest,
    decode_array,
    inline_schema,
    input_array,
    parse_infer,
    problems,
)
from pipeline.serve.session import MODEL_VERSION, DecoderModel

STATIC = Path(__file__).parent / "static"  # the latent-space page's HTML, script and style
INLINE_BATCH = 64  # decode smaller batches on the event loop: a thread hop costs more than they do
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


def create_app(onnx_model: Path | str | bytes, max_batch: int = 1024) -> FastAPI:
    model, metrics = DecoderModel(onnx_model, max_batch), Metrics()
    # A body limit that still admits the largest allowed batch (FastAPI answers 413 past it).
    app = FastAPI(title="VAE decoder", description=__doc__,
                  max_body_size=max_batch * model.latent_dim * BYTES_PER_FLOAT + 4096)
    app.add_exception_handler(ApiError, lambda request, e: _error(e.status, e.message))
    app.add_exception_handler(HTTPException, lambda request, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(RequestValidationError, lambda request, e: _error(400, problems(e.errors())))

    app.add_middleware(Observe, metrics=metrics)

    def decode(z: np.ndarray) -> np.ndarray:  # z checked by protocol.check_z
        images = model.decode(z)
        metrics.batch.observe(len(z))
        return images

    def named(name: str) -> DecoderModel:
        if name != MODEL_NAME:
            raise ApiError(404, f"unknown model {name!r}; this server has {MODEL_NAME!r}")
        return model

    @app.get("/v2")
    def server_metadata():
        return {"name": "vae-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.get("/v2/models/{name}")
    def model_metadata(name: str):
        return named(name).metadata()

    @app.get("/v2/models/{name}/ready")
    def model_ready(name: str):
        named(name)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(InferRequest.model_json_schema())}}}})
    async def infer(name: str, request: Request):
        named(name)
        body, binary = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
        z = input_array(body, binary, model)
        images = decode(z) if len(z) <= INLINE_BATCH else await run_in_threadpool(decode, z)
        response = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION,
                    "outputs": [{"name": model.output, "datatype": "FP32", "shape": list(images.shape),
                                 "data": images.ravel()}]}
        return NumpyJSON(response | ({"id": body.id} if body.id is not None else {}))

    @app.get("/v1/samples.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def samples(n: int = Query(64, ge=1, le=256), seed: int = Query(0, ge=0, le=2**32 - 1)):
        z = np.random.default_rng(seed).standard_normal((n, model.latent_dim), dtype=np.float32)
        return Response(png_grid(decode(z)), media_type="image/png")  # n is bounded by the query's check

    @app.post("/v1/decode")
    def decode_json(request: DecodeRequest):
        images = decode(decode_array(request, model))
        return NumpyJSON({"shape": list(images.shape), "images": images})

    @app.get("/", response_class=FileResponse, include_in_schema=False)
    def latent_page():
        return FileResponse(STATIC / "latent.html", media_type="text/html")

    @app.get("/v1/latent_map.png", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def latent_map():
        if model.latent_map is None:
            raise ApiError(404, "this decoder was exported without a latent map")
        return Response(model.latent_map, media_type="image/png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/metrics", response_class=Response)
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app




def run(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1024) -> None:
    import uvicorn

    from pipeline.registry import resolve

    uvicorn.run(create_app(resolve(source), max_batch), host=host, port=port)
