"""The Open Inference Protocol's requests and the plain endpoints', parsed into one checked array.

A bad request raises ApiError with a 4xx and a message naming the problem; check_batch is the
one place a batch of latent vectors or images is validated, whatever the endpoint it came
through, and image_array the one place a PNG becomes an image.
"""
from __future__ import annotations

import io
import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.serve.session import OnnxModel

HEADER_LENGTH = "inference-header-content-length"  # OIP binary tensor data extension


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_batch(batch: np.ndarray, model: OnnxModel) -> np.ndarray:
    """A batch as the model takes it: [N, width] finite FP32 numbers, 1 <= N <= max_batch,
    and for images grey levels in [0, 1]."""
    takes = f"{model.name} takes [N, {model.width}] with 1 <= N <= {model.max_batch}"
    if not 1 <= len(batch) <= model.max_batch:
        raise ApiError(400, f"{model.input}: batch of {len(batch)}; between 1 and {model.max_batch} allowed ({takes})")
    if batch.ndim != 2 or batch.shape[1] != model.width:
        raise ApiError(400, f"{model.input}: shape {list(batch.shape)}; {takes}")
    if not np.isfinite(batch).all():
        raise ApiError(400, f"{model.input}: NaN or infinite values")
    if model.images and (batch.min() < 0 or batch.max() > 1):
        raise ApiError(400, f"{model.input}: values from {batch.min():g} to {batch.max():g}; images are grey "
                            f"levels in [0, 1]")
    return batch


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


SHOWN_PROBLEMS = 3  # a body of a million bad numbers would otherwise get a million lines back


def problems(errors: list[dict]) -> str:
    """The first bad fields and what is wrong with each, and how many more, without echoing
    the input (a NaN would not even encode as JSON)."""
    shown = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:SHOWN_PROBLEMS]]
    more = len(errors) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def parsed(schema: type[BaseModel], body: bytes):
    """A JSON body validated as `schema`, whatever its content type; a bad one is a 400 naming
    its problems."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(400, problems(e.errors())) from None


def parse_infer(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tail that follows it when the client sends binary tensors."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"Inference-Header-Content-Length: {header_length!r} does not fit a "
                                f"{len(body)}-byte body")
        split = int(header_length)
    return parsed(InferRequest, body[:split]), body[split:]


def input_array(request: InferRequest, binary: bytes, model: OnnxModel) -> np.ndarray:
    if [t.name for t in request.inputs] != [model.input]:
        raise ApiError(400, f"inputs: expected exactly one input named {model.input!r}, "
                            f"got {[t.name for t in request.inputs]}")
    for output in request.outputs or []:
        if output.name not in model.outputs:
            raise ApiError(400, f"outputs: unknown output {output.name!r} (the model has {list(model.outputs)})")
    tensor = request.inputs[0]
    if any(size < 0 for size in tensor.shape):
        raise ApiError(400, f"{tensor.name}: shape {tensor.shape} has a negative dimension")
    if tensor.datatype != "FP32":
        raise ApiError(400, f"{tensor.name}: datatype {tensor.datatype}; FP32 required")
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
    return check_batch(values.reshape(tensor.shape), model)


# Rows of numbers whose validation stops at the first bad one: a body of a million strings
# would otherwise cost seconds of the server's time to list them all.
Rows = Annotated[list[Annotated[list[float], Field(fail_fast=True)]], Field(fail_fast=True)]


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    z: Rows


class ImagesRequest(BaseModel):
    """`/v1/encode`, `/v1/reconstruct` and `/v1/score` as JSON: rows of 784 grey levels in [0, 1]."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    x: Rows


def rows_array(rows: list[list[float]], model: OnnxModel) -> np.ndarray:
    try:
        batch = np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise ApiError(400, f"{model.input}: rows of different lengths") from None
    return check_batch(batch, model)


def json_images(body: bytes, model: OnnxModel) -> np.ndarray:
    return rows_array(parsed(ImagesRequest, body).x, model)


# A PNG larger than this is refused before it is decompressed (a small file can hold a huge image).
MAX_PNG_PIXELS = 4096 * 4096


PNG_HINT = ' (send a PNG as image/png, or JSON {"x": [[...]]})'


def png_image(body: bytes, model: OnnxModel, what: str = "the body", hint: str = PNG_HINT
              ) -> tuple[np.ndarray, str | None]:
    """A PNG body as one image x (1, 784) in [0, 1]; one that is not 28x28 grey is converted to
    grey and resized (bilinear) to 28x28, and the note returned says from what. MNIST's digits
    are light on dark: a dark digit on white is taken as drawn, and scores as unlikely. An error
    calls the bytes `what`, and one that is no PNG at all adds `hint`."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(body), formats=["PNG"])
        if image.width * image.height > MAX_PNG_PIXELS:
            raise ApiError(400, f"PNG of {image.width}x{image.height} pixels; at most {MAX_PNG_PIXELS} allowed")
        image.load()
    except UnidentifiedImageError:
        raise ApiError(400, f"{what} is not a PNG image{hint}") from None
    except (OSError, SyntaxError, ValueError) as e:  # a PNG cut short or corrupt
        raise ApiError(400, f"{what} is not a readable PNG image: {e}") from None
    note = None
    if image.size != (28, 28) or image.mode != "L":
        note = f"converted from a {image.width}x{image.height} {image.mode} PNG to 28x28 grey"
        image = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32).reshape(1, 784) / 255
    return check_batch(x, model), note


def inline_schema(schema: dict) -> dict:
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
