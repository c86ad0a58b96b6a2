"""One model version in memory, answering batched requests inside the ingress replica's process."""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import numpy as np
import torch

from raybig.serve.batching import Batcher
from raybig.serve.generation import Sampling, text_stream, token_stream

from raybig.store_io import local_model
from raybig.train.checkpoint import load_trained_model


class ServedModel:
    """Requests for this version that overlap share one forward pass (raybig.serve.batching: a lone
    request runs at once, under load a pass waits up to `batch_wait_ms` to fill). One batcher per
    version, so a batch never mixes versions."""

    def __init__(self, run_dir: str, max_batch_size: int, batch_wait_ms: float, trust_code: bool = False):
        # a path, or an s3:// / gs:// run
        self.run_dir = local_model(run_dir)
        self.model, self.info = load_trained_model(self.run_dir, trust_code=trust_code)
        self.predict = Batcher(self._forward_batch, max_batch_size, batch_wait_ms / 1000)

    def _forward_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        with torch.no_grad():
            out = self.model(torch.from_numpy(x)).float()
        probs = (out if self.info["data"]["task"] == "regression" else torch.softmax(out, dim=-1)).numpy()
        bounds = np.cumsum([len(a) for a in inputs])[:-1]
        return np.split(probs, bounds)

    @functools.cached_property
    def tokenizer(self):
        """A language model's: the run's tokenizer.json, or its characters."""
        from raybig.data.tokenizer import run_tokenizer

        return run_tokenizer(self.run_dir, self.info["data"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; ValueError naming the characters a char model never saw."""
        return self.tokenizer.encode(text)

    def continuation(self, prompt: list[int], sampling: Sampling) -> tuple[Iterator[tuple[str, str | None]], Callable]:
        """(text, finish_reason) pieces of the continuation of `prompt`, and how many tokens it has generated.
        The end-of-text token ends it as a stop string does."""
        generated = [0]

        def pieces():
            tokens, shown = [], ""
            for token in token_stream(self.model, prompt, sampling, window=self.info["data"]["shape"][0]):
                generated[0] += 1
                if token == self.tokenizer.eos_id:
                    yield None
                    return
                tokens.append(token)
                text = self.tokenizer.decode(tokens)
                if not text.endswith("\ufffd"):  # a byte-level token can end inside a character: wait for the rest
                    yield text[len(shown):]
                    shown = text

        return text_stream(pieces(), sampling.stop), lambda: generated[0]

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int | None) -> str:
        pieces, _ = self.continuation(self.encode(prompt), Sampling(max_new_tokens, temperature, seed=seed))
        return "".join(text for text, _ in pieces)

    def batching(self) -> dict:
        return self.predict.stats()
