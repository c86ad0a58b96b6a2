"""Model zoo. Each builder returns an ordered list of blocks; BlockModel runs them in order. A python model
(raybig.models.user) is whatever module the user's factory returns; an hf model (raybig.models.hf) is a
transformers model. raybig.models.parts is how parallelism sees all of them."""
from __future__ import annotations

import torch

from raybig.models.blocks import BlockModel
from raybig.models.cnn import cnn_blocks
from raybig.models.lstm import lstm_blocks
from raybig.models.mlp import mlp_blocks
from raybig.models.transformer import transformer_blocks

BUILDERS = {"mlp": mlp_blocks, "cnn": cnn_blocks, "lstm": lstm_blocks, "transformer": transformer_blocks}


def build_model(model_spec, meta, dropout: float = 0.0, seed: int | None = None) -> torch.nn.Module:
    """The same seed gives the same initial weights on every rank and in every layout."""
    if seed is not None:
        torch.manual_seed(seed)
    if model_spec.kind == "python":
        from raybig.models.user import build_user_model

        return build_user_model(model_spec, meta)
    if model_spec.kind == "hf":
        from raybig.models.hf import build_hf_model

        return build_hf_model(model_spec, meta)
    return BlockModel(BUILDERS[model_spec.kind](model_spec, meta, dropout), model_spec.kind)
