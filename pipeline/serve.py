"""`vae serve`: the ONNX decoder over HTTP on onnxruntime (CUDA when usable, else CPU).

Open Inference Protocol v2 (the KServe / Triton HTTP API), so their clients work unchanged:
  GET  /v2, /v2/health/live, /v2/health/ready
  GET  /v2/models/vae-decoder, /v2/models/vae-decoder/ready     metadata: shapes, latent size, providers
  POST /v2/models/vae-decoder/infer    input `z` FP32 [N, latent_dim] as JSON data or binary tensor data
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.onnx_session import open_session

MODEL_NAME, MODEL_VERSION = "vae-decoder", "1"
INLINE_BATCH = 64  # decode smaller batches on the event loop: a thread hop costs more than they do
BYTES_PER_FLOAT = 24  # generous JSON size of one float, for the body limit
HEADER_LENGTH = "inference-header-content-length"  # OIP binary tensor data extension


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --- the model --------------------------------------------------------------------------

class DecoderModel:
    """The one onnxruntime session every request shares, and what clients need to know of it."""

    def __init__(self, model: Path | str | bytes, max_batch: int):
        self.session = open_session(model)
        (model_input,), (model_output,) = self.session.get_inputs(), self.session.get_outputs()
        self.input, self.output = model_input.name, model_output.name
        self.latent_dim, self.max_batch = model_input.shape[1], max_batch

    def check(self, z: np.ndarray) -> np.ndarray:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ApiError(400, f"{self.input}: shape {list(z.shape)}; the decoder takes [N, {self.latent_dim}]")
        if not 1 <= len(z) <= self.max_batch:
            raise ApiError(400, f"{self.input}: batch of {len(z)}; between 1 and {self.max_batch} allowed")
        if not np.isfinite(z).all():
            raise ApiError(400, f"{self.input}: NaN or infinite values")
        return z

    def decode(self, z: np.ndarray) -> np.ndarray:
        (images,) = self.session.run([self.output], {self.input: self.check(z)})
        return images

    def metadata(self) -> dict:
        return {"name": MODEL_NAME, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [{"name": self.input, "datatype": "FP32", "shape": [-1, self.latent_dim]}],
                "outputs": [{"name": self.output, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                "parameters": {"latent_dim": self.latent_dim, "max_batch": self.max_batch,
                               "providers": self.session.get_providers()}}


# --- Open Inference Protocol requests ---------------------------------------------------

class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _problems(errors: list[dict]) -> str:
    """Each bad field and what is wrong with it, without echoing the input (a NaN would
    not even encode as JSON)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def parse_infer(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tail that follows it when the client sends binary tensors."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"Inference-Header-Content-Length: {header_length!r} does not fit a "
                                f"{len(body)}-byte body")
        split = int(header_length)
    try:
        return InferRequest.model_validate_json(body[:split]), body[split:]
    except ValidationError as e:
        raise ApiError(400, _problems(e.errors())) from None


def input_array(request: InferRequest, binary: bytes, model: DecoderModel) -> np.ndarray:
    if [t.name for t in request.inputs] != [model.input]:
        raise ApiError(400, f"inputs: expected exactly one input named {model.input!r}, "
                            f"got {[t.name for t in request.inputs]}")
    for output in request.outputs or []:
        if output.name != model.output:
            raise ApiError(400, f"outputs: unknown output {output.name!r} (the model has {model.output!r})")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise ApiError(400, f"{tensor.name}: datatype {tensor.datatype}; FP32 required")
    if len(tensor.shape) != 2 or tensor.shape[1] != model.latent_dim or not 1 <= tensor.shape[0] <= model.max_batch:
        raise ApiError(400, f"{tensor.name}: shape {tensor.shape}; the decoder takes [N, {model.latent_dim}] "
                            f"with 1 <= N <= {model.max_batch}")
    size = (tensor.parameters or {}).get("binary_data_size")
    try:
        if size is not None:
            if not isinstance(size, int) or size != len(binary):
                raise ApiError(400, f"{tensor.name}: binary_data_size {size!r}, but {len(binary)} binary bytes follow")
            values = np.frombuffer(binary, dtype="<f4")
        elif tensor.data is None:
            raise ApiError(400, f"{tensor.name}: no data (neither JSON data nor binary_data_size)")
        else:
            values = np.asarray(tensor.data, dtype=np.float32).ravel()
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"{tensor.name}: data is not FP32 numbers: {e}") from None
    if values.size != math.prod(tensor.shape):
        raise ApiError(400, f"{tensor.name}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, "
                            f"got {values.size}")
    return values.reshape(tensor.shape)


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    z: list[list[float]]


# --- pictures and metrics ---------------------------------------------------------------

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


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vae_requests", "HTTP requests", ["route", "code"], registry=self.registry)
        self.errors = Counter("vae_errors", "HTTP requests answered with 4xx or 5xx", ["route"], registry=self.registry)
        self.latency = Histogram("vae_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        self.batch = Histogram("vae_batch_size", "latent vectors per decode", registry=self.registry,
                               buckets=tuple(2**i for i in range(11)))

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)
        if code >= 400:
            self.errors.labels(route).inc()


class Observe:
    """Pure ASGI middleware counting every request by route and status. (FastAPI's
    @app.middleware wraps each response in a stream and costs more than a decode.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:  # the router has put the matched route in scope by now
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(route, status, time.perf_counter() - start)


class NumpyJSON(Response):
    """JSON rendered by orjson, which writes numpy arrays directly (784 floats an image)."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# --- the app ----------------------------------------------------------------------------

def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(onnx_model: Path | str | bytes, max_batch: int = 1024) -> FastAPI:
    model, metrics = DecoderModel(onnx_model, max_batch), Metrics()
    # A body limit that still admits the largest allowed batch (FastAPI answers 413 past it).
    app = FastAPI(title="VAE decoder", description=__doc__,
                  max_body_size=max_batch * model.latent_dim * BYTES_PER_FLOAT + 4096)
    app.add_exception_handler(ApiError, lambda request, e: _error(e.status, e.message))
    app.add_exception_handler(HTTPException, lambda request, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(RequestValidationError, lambda request, e: _error(400, _problems(e.errors())))

    app.add_middleware(Observe, metrics=metrics)

    def decode(z: np.ndarray) -> np.ndarray:
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
        "application/json": {"schema": _inline(InferRequest.model_json_schema())}}}})
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
        return Response(png_grid(decode(z)), media_type="image/png")

    @app.post("/v1/decode")
    def decode_json(request: DecodeRequest):
        bad = next((i for i, row in enumerate(request.z) if len(row) != model.latent_dim), None)
        if bad is not None:
            raise ApiError(400, f"z[{bad}]: {len(request.z[bad])} values; the decoder takes {model.latent_dim}")
        images = decode(np.asarray(request.z, dtype=np.float32).reshape(-1, model.latent_dim))
        return NumpyJSON({"shape": list(images.shape), "images": images})

    @app.get("/metrics", response_class=Response)
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs inlined, to embed in the OpenAPI spec."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def resolve(source: str) -> Path:
    """An ONNX file: the path itself, or the registered model a `models:/` URI names, fetched
    from the tracking server ($MLFLOW_TRACKING_URI, else this repository's mlflow.db)."""
    if source.startswith("models:/"):
        import mlflow
        from mlflow.artifacts import download_artifacts

        from pipeline.files import Layout
        from pipeline.tracking import tracking_uri

        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(tracking_uri(Layout()))
        try:
            return Path(download_artifacts(artifact_uri=source)) / "model.onnx"
        except MlflowException as e:
            raise LookupError(f"{source}: {e.message}") from None
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such ONNX model (run `make repro` to export one)")
    return Path(source)


def run(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1024) -> None:
    import uvicorn

    uvicorn.run(create_app(resolve(source), max_batch), host=host, port=port)
