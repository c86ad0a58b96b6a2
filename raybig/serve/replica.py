"""One model version in memory, answering batched requests."""
from __future__ import annotations

import numpy as np
import torch
from ray import serve

from raybig.train.checkpoint import load_trained_model


class ModelReplica:
    """Requests arriving within `batch_wait_ms` of each other are merged into one forward pass."""

    def __init__(self, run_dir: str, max_batch_size: int, batch_wait_ms: float, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, self.info = load_trained_model(run_dir)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.batches = 0
        self.requests = 0
        self.largest_batch = 0

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.batches += 1
        self.requests += len(inputs)
        self.largest_batch = max(self.largest_batch, len(inputs))
        with torch.no_grad():
            probs = torch.softmax(self.model(torch.from_numpy(np.concatenate(inputs))).float(), dim=-1).numpy()
        bounds = np.cumsum([len(a) for a in inputs])[:-1]
        return np.split(probs, bounds)

    async def predict(self, x: np.ndarray) -> np.ndarray:
        return await self.predict_batch(x)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int | None) -> str:
        vocab = self.info["data"]["vocab"]
        length = self.info["data"]["shape"][0]
        lookup = {c: i for i, c in enumerate(vocab)}
        tokens = torch.tensor([[lookup[c] for c in prompt]])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(tokens[:, -length:])[0, -1].float() / temperature
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        return "".join(vocab[i] for i in tokens[0, len(prompt):].tolist())

    def batching(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest_batch,
                "mean_batch": self.requests / self.batches if self.batches else 0.0}
