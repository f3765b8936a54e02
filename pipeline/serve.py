"""`vae serve`: the ONNX decoder over HTTP, on onnxruntime (CUDA when usable, else CPU).

  GET  /v2/health/live, /v2/health/ready   liveness and readiness (Open Inference Protocol paths)
  GET  /v2/models/vae-decoder              model metadata: latent size, shapes, providers in use
  POST /v1/decode  {"z": [[...], ...]}     images (N, 1, 28, 28) of pixel probabilities

One onnxruntime session is shared by all requests. Bad requests get a 4xx that names
the problem; bodies above a size limit are refused with 413.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pipeline.onnx_session import open_session

MODEL_NAME = "vae-decoder"
BYTES_PER_FLOAT = 24  # generous JSON size of one float, for the body limit


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    z: list[list[float]]


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input (NaN would not even encode)."""
    problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"detail": problems}, status_code=422)


def create_app(model_path: Path | str, max_batch: int = 1024) -> FastAPI:
    session = open_session(model_path)
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    latent_dim = model_input.shape[1]
    # A body limit that still admits the largest allowed batch (FastAPI answers 413 past it).
    app = FastAPI(title="VAE decoder", description=__doc__,
                  max_body_size=max_batch * latent_dim * BYTES_PER_FLOAT + 4096)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.get(f"/v2/models/{MODEL_NAME}")
    def metadata():
        return {"name": MODEL_NAME, "platform": "onnxruntime", "latent_dim": latent_dim,
                "max_batch": max_batch, "providers": session.get_providers(),
                "inputs": [{"name": model_input.name, "datatype": "FP32", "shape": [-1, latent_dim]}],
                "outputs": [{"name": model_output.name, "datatype": "FP32", "shape": [-1, 1, 28, 28]}]}

    @app.post("/v1/decode")
    def decode(request: DecodeRequest):
        z = request.z
        if not 1 <= len(z) <= max_batch:
            raise HTTPException(422, f"z: batch of {len(z)} latent vectors; between 1 and {max_batch} allowed")
        bad = next((i for i, row in enumerate(z) if len(row) != latent_dim), None)
        if bad is not None:
            raise HTTPException(422, f"z[{bad}]: {len(z[bad])} values; the decoder takes {latent_dim}")
        (images,) = session.run([model_output.name], {model_input.name: np.asarray(z, dtype=np.float32)})
        return {"shape": list(images.shape), "images": images.tolist()}

    return app


def run(model_path: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1024) -> None:
    import uvicorn

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: no such ONNX model (run `make repro` to export one)")
    uvicorn.run(create_app(model_path, max_batch), host=host, port=port)
