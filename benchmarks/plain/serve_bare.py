"""The plain alternative for benchmarks/serve_load.py: the same trained run served by one bare FastAPI +
uvicorn process. Run: python serve_bare.py RUN_DIR --port 8012"""
import argparse

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from raybig.train.checkpoint import load_trained_model


class Req(BaseModel):
    inputs: list[list[float]]


parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--port", type=int, default=8012)
args = parser.parse_args()
torch.set_num_threads(1)
model, info = load_trained_model(args.run_dir)
shape = info["data"]["shape"]
app = FastAPI()


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/v1/models/{name}/predict")
def predict(name: str, r: Req):
    x = torch.from_numpy(np.asarray(r.inputs, dtype=np.float32).reshape(len(r.inputs), *shape))
    with torch.no_grad():
        probs = torch.softmax(model(x), -1).numpy()
    return {"predictions": [{"label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]}


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
