"""LoRA adapters (peft) on a Hugging Face model: `model.lora: {r, alpha, dropout, target_modules}`.

Only the adapters train: the base weights are frozen, so checkpoints hold the adapters alone (the base is
rebuilt from `pretrained:` or the config's seed). What is published and served is the merged model, each
adapted weight plus its low-rank update, under the base model's own names: a plain transformers model.
"""
from __future__ import annotations

import torch
from torch import nn

from raybig.errors import SpecError

EXTRA_HINT = "LoRA needs peft: pip install 'raybig[hf]'"


def apply_lora(hf_model: nn.Module, lora_spec, train_also: tuple[str, ...] = ()) -> nn.Module:
    """Adapters injected in place (no wrapper, so every other name stays transformers' own); parameters whose
    names start with one of `train_also` (a fresh classification head) train beside them."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise SpecError(EXTRA_HINT, "model.lora") from None
    config = LoraConfig(r=lora_spec.r, lora_alpha=lora_spec.alpha, lora_dropout=lora_spec.dropout,
                        target_modules=lora_spec.target_modules, task_type="SEQ_CLS" if train_also else "CAUSAL_LM")
    try:
        inject_adapter_in_model(config, hf_model)
    except ValueError as err:  # target modules not found in the model
        raise SpecError(" ".join(str(err).split()), "model.lora.target_modules") from None
    for name, param in hf_model.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith(train_also)
    return hf_model


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with each LoRA layer's update added to its base weight, under the base names
    (q_proj.weight, not q_proj.base_layer.weight), adapters left out."""
    from peft.tuners.lora import LoraLayer

    state = dict(model.state_dict())
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = f"{path}.base_layer."
        for key in [k for k in state if k.startswith(base)]:
            state[f"{path}.{key[len(base):]}"] = state.pop(key)
        state[f"{path}.weight"] = state[f"{path}.weight"] + module.get_delta_weight("default")
        for key in [k for k in state if k.startswith(f"{path}.lora_")]:
            del state[key]
    return state
