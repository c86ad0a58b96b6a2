from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections, so a tensor-parallel rank can take whole
    heads (columns of each) and the output projection the matching rows; the head count is read from the
    projection's width, which under tensor parallelism is this rank's share."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.head_dim, self.causal, self.dropout = dim // heads, causal, dropout
        # no key bias: it adds the same to every score of a query, which softmax ignores (its gradient is
        # rounding noise, which Adam would amplify into updates)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Layer(nn.Module):
    """A pre-norm transformer layer: the unit a pipeline stage boundary may fall between."""
    # Megatron's split: q, k, v and the MLP's first layer by columns, their partners by rows, so each layer
    # needs one all-reduce forward (and one backward) per half
    TP_PLAN = {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.proj": "rowwise",
               "ff.0": "colwise", "ff.2": "rowwise"}

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
