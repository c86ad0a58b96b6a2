"""`raybig query`: send a file's samples (JSON, CSV or .npy) or a prompt to a running endpoint."""
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from raybig.errors import SpecError


def read_inputs(path: str) -> list:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such file", "--input")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            return data["inputs"] if isinstance(data, dict) else data
        if p.suffix == ".csv":
            return np.atleast_2d(np.loadtxt(p, delimiter=",", dtype=np.float32)).tolist()
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False).tolist()  # never unpickle a user's file
    # (an empty .npy is an EOFError, a header it cannot read an OSError, 100k brackets a RecursionError)
    except (ValueError, KeyError, EOFError, OSError, RecursionError) as err:
        raise SpecError(f"{path}: cannot read samples ({err})", "--input") from None
    raise SpecError(f"{path}: expected a .json, .csv or .npy file", "--input")


def post(url: str, body: dict, token: str | None = None, version: str | None = None, timeout: float = 60) -> dict:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if version:
        headers["x-model-version"] = version
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("detail", detail)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise SpecError(f"{err.code}: {detail}", url) from None
    except urllib.error.URLError as err:
        raise SpecError(f"cannot reach the server ({err.reason}); is `raybig serve` running?", url) from None
