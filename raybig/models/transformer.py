from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    """A pre-norm transformer layer: the unit a pipeline stage boundary may fall between."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float, causal: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Embed(nn.Module):
    """Tokens (lm) or per-step feature vectors (classifier) to vectors, plus learned positions."""

    def __init__(self, inputs: int, dim: int, length: int, tokens: bool, dropout: float):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Embedding(inputs, dim) if tokens else nn.Linear(inputs, dim)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.long() if self.tokens else x)
        return self.dropout(h + self.pos[:, : h.shape[1]])


class Head(nn.Module):
    def __init__(self, dim: int, outputs: int, pool: bool):
        super().__init__()
        self.norm, self.out, self.pool = nn.LayerNorm(dim), nn.Linear(dim, outputs), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.out(x.mean(dim=1) if self.pool else x)


def transformer_blocks(spec, meta, dropout: float) -> list[nn.Module]:
    """lm: a causal char model over token ids [T] -> logits [T, vocab]; classifier: an encoder over [T, F]."""
    lm = spec.task == "lm"
    if lm:
        inputs, length = meta.num_classes, meta.shape[0]
    else:
        if len(meta.shape) != 2:
            raise ValueError(f"a transformer classifier needs sequence-shaped samples [T, F], got {meta.shape}")
        length, inputs = meta.shape
    blocks: list[nn.Module] = [Embed(inputs, spec.dim, length, lm, dropout)]
    blocks += [Layer(spec.dim, spec.heads, spec.ff_mult, dropout, causal=lm) for _ in range(spec.layers)]
    blocks.append(Head(spec.dim, meta.num_classes, pool=not lm))
    return blocks
