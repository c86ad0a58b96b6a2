"""One model version in memory, answering batched requests inside the ingress replica's process."""
from __future__ import annotations

import numpy as np
import torch
from ray import serve

from raybig.store_io import local_model
from raybig.train.checkpoint import load_trained_model


class ServedModel:
    """Requests for this version arriving within `batch_wait_ms` of each other share one forward pass.

    The batch queue is made per instance: a method decorated with @serve.batch at class level shares one
    queue across every instance in the process, which would mix versions in a batch.
    """

    def __init__(self, run_dir: str, max_batch_size: int, batch_wait_ms: float, trust_code: bool = False):
        # a path, or an s3:// / gs:// run
        self.model, self.info = load_trained_model(local_model(run_dir), trust_code=trust_code)
        self.predict = serve.batch(max_batch_size=max_batch_size,
                                   batch_wait_timeout_s=batch_wait_ms / 1000)(self._forward_batch)
        self.batches = 0
        self.requests = 0
        self.largest_batch = 0

    async def _forward_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.batches += 1
        self.requests += len(inputs)
        self.largest_batch = max(self.largest_batch, len(inputs))
        x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        with torch.no_grad():
            probs = torch.softmax(self.model(torch.from_numpy(x)).float(), dim=-1).numpy()
        bounds = np.cumsum([len(a) for a in inputs])[:-1]
        return np.split(probs, bounds)

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
