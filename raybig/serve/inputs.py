"""Turning a request's JSON into a model input, or into a 4xx that says what is wrong with it."""
import json

import numpy as np
import orjson
from fastapi import HTTPException

MAX_DEPTH = 1024  # orjson's limit on nested arrays and objects


def parse_predict_body(raw: bytes) -> list:
    """The `inputs` of a predict body, {"inputs": [...]} and nothing else, or a 422.

    orjson first (several times faster than a pydantic model of a float list); it refuses the NaN and
    Infinity literals, which the standard parser accepts, so those bodies get the specific message below.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        if "recursion" in str(err):  # the standard parser would exhaust the stack on it (a 500)
            raise HTTPException(422, f"body: nested deeper than {MAX_DEPTH} levels ({err})") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise HTTPException(422, f"body: Invalid JSON ({err})") from None
    if not isinstance(body, dict) or "inputs" not in body:
        raise HTTPException(422, 'body: expected a JSON object {"inputs": [sample, ...]}')
    extra = sorted(set(body) - {"inputs"})
    if extra:
        raise HTTPException(422, f"{', '.join(extra)}: unknown field (only inputs is allowed)")
    if not isinstance(body["inputs"], list):
        raise HTTPException(422, "inputs: expected a list of samples")
    return body["inputs"]


def as_batch(inputs: list, shape: list[int], max_samples: int) -> np.ndarray:
    """A float32 array [n, *shape] from JSON, or a 422 saying what is wrong with it."""
    if not inputs:
        raise HTTPException(422, "inputs is empty: send at least one sample")
    if len(inputs) > max_samples:
        raise HTTPException(413, f"{len(inputs)} samples in one request; the limit is {max_samples}")
    try:
        x = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(422, "inputs must be a rectangular array of numbers") from None
    flat = int(np.prod(shape))
    if x.shape[1:] != tuple(shape) and x.shape[1:] != (flat,):
        raise HTTPException(422, f"each sample must have shape {list(shape)} (or {flat} numbers); "
                                 f"got samples of shape {list(x.shape[1:])}")
    if not np.isfinite(x).all():
        raise HTTPException(422, "inputs contain NaN or infinity")
    return x.reshape(len(x), *shape)
