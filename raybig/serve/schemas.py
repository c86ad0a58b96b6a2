"""Request and response bodies. Classifiers take samples and return probabilities and labels; the
char-level language model takes a prompt and returns a continuation."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] = Field(description="A batch of samples: each the model's input shape (e.g. 8 x 8) or flat.")


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
