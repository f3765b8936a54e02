"""The Open Inference Protocol's requests and `/v1/decode`'s, parsed into one checked array.

A bad request raises ApiError with a 4xx and a message naming the problem; check_z is the
one place a latent batch is validated, whatever the endpoint it came through.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.serve.session import DecoderModel

HEADER_LENGTH = "inference-header-content-length"  # OIP binary tensor data extension


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_z(z: np.ndarray, model: DecoderModel) -> np.ndarray:
    """z as the decoder takes it: [N, latent_dim] finite FP32 numbers, 1 <= N <= max_batch."""
    takes = f"the decoder takes [N, {model.latent_dim}] with 1 <= N <= {model.max_batch}"
    if not 1 <= len(z) <= model.max_batch:
        raise ApiError(400, f"{model.input}: batch of {len(z)}; between 1 and {model.max_batch} allowed ({takes})")
    if z.ndim != 2 or z.shape[1] != model.latent_dim:
        raise ApiError(400, f"{model.input}: shape {list(z.shape)}; {takes}")
    if not np.isfinite(z).all():
        raise ApiError(400, f"{model.input}: NaN or infinite values")
    return z


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


def problems(errors: list[dict]) -> str:
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
        raise ApiError(400, problems(e.errors())) from None


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
    return check_z(values.reshape(tensor.shape), model)


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    z: list[list[float]]


def decode_array(request: DecodeRequest, model: DecoderModel) -> np.ndarray:
    try:
        z = np.asarray(request.z, dtype=np.float32)
    except ValueError:
        raise ApiError(400, f"{model.input}: rows of different lengths") from None
    return check_z(z, model)


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
