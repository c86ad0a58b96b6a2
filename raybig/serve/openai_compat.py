"""OpenAI-compatible completions for the served language models: `POST /v1/completions` and
`POST /v1/chat/completions`, with OpenAI's request fields and ranges, its response and stream-chunk shapes
(server-sent events ending in `data: [DONE]`) and its error shape, so OpenAI clients work unchanged.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal

import orjson
from fastapi import HTTPException
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raybig.serve.generation import Sampling

ERROR_TYPES = {401: "authentication_error"}  # every other 4xx here is an invalid_request_error


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, description="One choice per request.")
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    def sampling(self, default_tokens: int) -> Sampling:
        stops = tuple(self.stop or ())  # a default None is not passed through the validator
        return Sampling(self.max_tokens or default_tokens, self.temperature, self.top_p, self.seed, stops)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)

    def sampling(self, default_tokens: int) -> Sampling:
        sampling = super().sampling(default_tokens)
        if self.max_completion_tokens is not None:
            sampling.max_tokens = self.max_completion_tokens
        return sampling


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return Response(orjson.dumps(body), status, media_type="application/json")


def from_http_error(err: HTTPException) -> Response:
    """raybig's own 4xx (auth, size, unknown model) in OpenAI's shape; 422s become OpenAI's 400."""
    status = 400 if err.status_code == 422 else err.status_code
    code = "model_not_found" if err.status_code == 404 else None
    response = error(status, str(err.detail), "model" if code else None, code)
    response.headers.update(err.headers or {})
    return response


def parse(schema: type[_Request], raw: bytes) -> _Request:
    try:
        return schema.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = ".".join(map(str, first["loc"])) or None
        message = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                            for e in err.errors(include_url=False))
        raise BadRequest(message, param) from None


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Completion:
    """One request's answer: its ids, and its body or its stream in the shape of the endpoint asked."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choice: dict, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return body

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def body(self, text: str, finish: str, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            return self._envelope("chat.completion", choice, self._usage(completion_tokens))
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return self._envelope("text_completion", choice, self._usage(completion_tokens))

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = self._envelope("chat.completion.chunk", choice)
        else:
            body = self._envelope("text_completion", {"index": 0, "text": text or "", "finish_reason": finish,
                                                      "logprobs": None})
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def usage_chunk(self, completion_tokens: int) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage(completion_tokens)}
        return b"data: " + orjson.dumps(body) + b"\n\n"


async def answer(completion: Completion, pieces, counted, stream: bool, include_usage: bool) -> Response:
    """`pieces`: an iterator of (text, finish_reason) made in a worker thread one token at a time (generation
    must stay off the event loop, so other requests keep flowing); `counted()`: tokens generated so far."""
    if not stream:
        parts = await asyncio.to_thread(list, pieces)
        text = "".join(text for text, _ in parts)
        return Response(orjson.dumps(completion.body(text, parts[-1][1], counted())), media_type="application/json")

    async def events():
        if completion.chat:
            yield completion.chunk(None, None, first=True)
        while True:
            item = await asyncio.to_thread(next, pieces, None)
            if item is None:
                break
            text, finish = item
            if text:
                yield completion.chunk(text, None)
            if finish is not None:
                yield completion.chunk(None, finish)
        if include_usage:
            yield completion.usage_chunk(counted())
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
