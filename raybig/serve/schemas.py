"""Request and response bodies. Classifiers take samples and return probabilities and labels; the
char-level language model takes a prompt and returns a continuation."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[Any]] = Field(
        min_length=1, description="A batch of samples, each a (nested) list of numbers: the model's input_shape "
        "(GET /v1/models; e.g. 8 x 8) or flat. At most the model's serve.max_samples_per_request samples (413).")


class Prediction(BaseModel):
    label: int | None = Field(default=None, description="A classifier's: the most likely class.")
    probabilities: list[float] | None = None
    value: float | None = Field(default=None, description="A regression's: the predicted number.")


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=4096)
    max_new_tokens: int = Field(default=64, ge=1, le=1024)
    temperature: float = Field(default=1.0, gt=0, le=10)
    seed: int | None = None


class GenerateResponse(BaseModel):
    model: str
    version: str
    text: str


class ModelCard(BaseModel):
    name: str
    version: str
    default: bool
    kind: str
    task: str
    input_shape: list[int]
    classes: int
    epoch: int
    metrics: dict[str, Any]
    batching: dict[str, Any]
    replica: str = Field(description="The replica that answered (each one holds every version).")
    replica_started: float = Field(description="When that replica loaded its models (Unix time, s).")


class ErrorResponse(BaseModel):
    """Every 4xx of raybig's own endpoints: one message saying what is wrong."""
    detail: str = Field(description="What is wrong with the request, and where.")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """The OpenAI-compatible endpoints' 4xx, in OpenAI's error shape."""
    error: OpenAIErrorDetail


ERROR_MEANINGS = {400: "The body is malformed or a field is out of range.", 401: "Missing or wrong bearer token.",
                  404: "No such model, or no such version of it.", 413: "The body, or its number of samples, is over the limit.",
                  422: "The body is malformed, or its samples do not fit the model."}


def error_responses(*statuses: int, schema: type[BaseModel] = ErrorResponse) -> dict:
    """The 4xx an endpoint answers, for the OpenAPI document (FastAPI's own 422 shape is not used)."""
    return {status: {"model": schema, "description": ERROR_MEANINGS[status]} for status in statuses}
