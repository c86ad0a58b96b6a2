"""Text generation for the served language models, one token at a time.

A Hugging Face model decodes with its KV cache: the prompt is run once and each new token costs one
position. raybig's own char transformer has learned positions and no cache: each token reruns the last
`seq_len` tokens. Both sample the same way (temperature, top-p, a seeded generator) and stop the same way
(a token budget, or a stop string, which is never part of the text returned).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    # shifted so that the largest is 0: a temperature near 0 then gives -inf, never inf - inf (NaN)
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set of most likely tokens whose mass reaches top_p (always the first, whatever
        # top_p's rounding)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_stream(model: torch.nn.Module, prompt: list[int], sampling: Sampling, window: int) -> Iterator[int]:
    """New token ids, up to sampling.max_tokens."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    hf = getattr(model, "hf", None)
    with torch.no_grad():
        if hf is not None:
            from transformers import DynamicCache

            cache = DynamicCache(config=hf.config)
            ids = torch.tensor([prompt[-window:]])
            for _ in range(sampling.max_tokens):
                logits = hf(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
                token = next_token(logits, sampling, generator)
                yield token
                ids = torch.tensor([[token]])
        else:
            tokens = list(prompt)
            for _ in range(sampling.max_tokens):
                logits = model(torch.tensor([tokens[-window:]]))[0, -1]
                token = next_token(logits, sampling, generator)
                yield token
                tokens.append(token)


def text_stream(pieces: Iterator[str | None], stop: tuple[str, ...]) -> Iterator[tuple[str, str | None]]:
    """(text, finish_reason) pieces of a continuation: text as soon as no stop string can still begin in it,
    and a last piece whose finish_reason is "stop" (a stop string was generated, or None came: the model's
    end of text; neither is part of the text) or "length"."""
    held = ""
    longest = max((len(s) for s in stop), default=0)
    for piece in pieces:
        if piece is None:
            yield held, "stop"
            return
        held += piece
        hits = [i for i in (held.find(s) for s in stop) if i >= 0]
        if hits:
            yield held[: min(hits)], "stop"
            return
        safe = len(held) - (longest - 1) if longest else len(held)
        if safe > 0:
            yield held[:safe], None
            held = held[safe:]
    yield held, "length"
