"""Turning a request's JSON into a model input, or into a 4xx that says what is wrong with it."""
import numpy as np
from fastapi import HTTPException


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
