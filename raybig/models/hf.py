"""Hugging Face Transformers models: `model: {kind: hf, task: causal_lm | sequence_classification,
config: {model_type: llama, ...}}`.

The model is built offline from a config (`AutoConfig.for_model`, `from_config`; the vocabulary size comes
from the data) or loaded from a local `save_pretrained` directory (`pretrained: DIR`, never the network). It
keeps transformers' own parameter names, so a run's weights are a `from_pretrained` checkpoint as they are.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import torch
from torch import nn

from raybig.data.chat import DEFAULT_CHAT_TEMPLATE
from raybig.data.documents import IGNORE
from raybig.errors import SpecError
from raybig.models.parts import NoParts, Part, module_part

EXTRA_HINT = "Hugging Face models need transformers: pip install 'raybig[hf]'"
DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def transformers():
    try:
        import transformers as tf
    except ImportError:
        raise SpecError(EXTRA_HINT, "model.kind") from None
    return tf


def hf_config(model_spec, meta):
    """The transformers config the spec describes (or its pretrained directory holds), fitted to the data."""
    return _pretrained_config(model_spec, meta) if model_spec.pretrained else _config_from_spec(model_spec, meta)


def _pretrained_config(model_spec, meta):
    directory = Path(model_spec.pretrained)
    if not (directory / "config.json").is_file():
        raise SpecError(f"{directory} is not a save_pretrained directory (no config.json there)", "model.pretrained")
    config = transformers().AutoConfig.from_pretrained(directory, local_files_only=True)
    if model_spec.task == "sequence_classification":
        config.num_labels = meta.num_classes  # a fresh head when the pretrained one has other classes
        return config
    if config.vocab_size < meta.num_classes:  # more is fine: configs often round the embedding up
        raise SpecError(f"{directory} has a vocabulary of {config.vocab_size} tokens but the data's tokenizer has "
                        f"{meta.num_classes}", "model.pretrained")
    return config


def _config_from_spec(model_spec, meta):
    """model.config, checked key by key against its config class, with the data's vocabulary or classes."""
    tf = transformers()
    settings = dict(model_spec.config)
    model_type = settings.pop("model_type")
    try:
        if not isinstance(model_type, str):
            raise ValueError(model_type)
        config_class = tf.AutoConfig.for_model(model_type).__class__
    except ValueError:
        known = ", ".join(sorted(tf.CONFIG_MAPPING.keys())[:12])
        raise SpecError(f"transformers has no model type {model_type!r} (e.g. {known}, ...)",
                        "model.config.model_type") from None
    known_keys = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    for key in settings:
        if key not in known_keys:
            raise SpecError(f"{config_class.__name__} has no setting {key!r}", f"model.config.{key}")
    if model_spec.task == "causal_lm":
        vocab = settings.setdefault("vocab_size", meta.num_classes)
        if vocab != meta.num_classes:
            raise SpecError(f"{vocab}, but the data's vocabulary has {meta.num_classes} tokens (leave it out to take "
                            "the data's)", "model.config.vocab_size")
    else:
        if "vocab_size" not in settings:
            raise SpecError("sequence_classification reads token ids: set the vocabulary size they come from",
                            "model.config.vocab_size")
        labels = settings.setdefault("num_labels", meta.num_classes)
        if labels != meta.num_classes:
            raise SpecError(f"{labels}, but the data has {meta.num_classes} classes", "model.config.num_labels")
    try:
        return config_class(**settings)
    except Exception as err:  # transformers validates configs with its own exception types
        message = " ".join(str(err).split())
        raise SpecError(f"{config_class.__name__}: {message}", "model.config") from None


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}


def build_hf_model(model_spec, meta) -> "HFModel":
    auto = getattr(transformers(), AUTO_CLASSES[model_spec.task])
    config = hf_config(model_spec, meta)
    if model_spec.pretrained:
        model = auto.from_pretrained(model_spec.pretrained, config=config, local_files_only=True,
                                     dtype=torch.float32, ignore_mismatched_sizes=model_spec.task != "causal_lm")
    else:
        model = auto.from_config(config, dtype=torch.float32)
    if model_spec.lora is not None:
        from raybig.models.lora import apply_lora

        heads = HFSequenceClassifier.HEADS if model_spec.task == "sequence_classification" else ()
        apply_lora(model, model_spec.lora, train_also=heads)
    wrapped = WRAPPERS[model_spec.task](model)
    # under LoRA, checkpoints leave the frozen base out: this builder makes it again (raybig.train.parallel)
    wrapped.raybig_rebuilds_frozen = model_spec.lora is not None
    return wrapped


def model_from_config(config: dict, task: str = "causal_lm") -> "HFModel":
    """A model with the architecture of a recorded `config.to_dict()`, its weights still to be loaded."""
    tf = transformers()
    auto = getattr(tf, AUTO_CLASSES[task])
    return WRAPPERS[task](auto.from_config(tf.AutoConfig.for_model(**config), dtype=torch.float32))


class HFModel(nn.Module):
    """A transformers model as raybig trains it: token ids in, logits out, the model's own loss.

    The transformers model's children are this module's children, so parameter names (model.layers.0...,
    lm_head.weight) are transformers' own and a state dict loads with `from_pretrained` unchanged."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        object.__setattr__(self, "hf", hf)  # not registered: no "hf." prefix on every name
        if list(hf.named_parameters(recurse=False)) or list(hf.named_buffers(recurse=False)):
            raise TypeError(f"{type(hf).__name__} keeps tensors outside its submodules")
        for name, child in hf.named_children():
            self.add_module(name, child)

    def train(self, mode: bool = True):
        self.hf.training = mode
        return super().train(mode)

    def _decoder_parts(self, head_name: str, head) -> list[Part]:
        """Llama-style decoders (Llama, Mistral, Qwen2/3, ...): the embedding, each decoder layer (with the
        rotary embedding and causal mask it needs), then the final norm with the head."""
        base, prefix = self.hf.base_model, self.hf.base_model_prefix
        missing = [name for name in DECODER_PARTS if not hasattr(base, name)]
        if missing or not hasattr(self.hf, head_name):
            raise NoParts(f"{type(self.hf).__name__} is not a Llama-style decoder (embed_tokens, layers, norm, "
                          f"rotary_emb, {head_name}): raybig cannot cut it into stages yet")
        if getattr(self.hf, head_name).weight is base.embed_tokens.weight:
            raise NoParts("its input embedding and output head share weights (tie_word_embeddings), which stages "
                          "on different ranks cannot; set model.config.tie_word_embeddings: false")
        embed = module_part(f"{prefix}.embed_tokens", base.embed_tokens, block=False)
        embed.run = lambda ids: base.embed_tokens(ids.long())
        layers = [Part({f"{prefix}.layers.{i}": layer, f"{prefix}.rotary_emb": base.rotary_emb},
                       partial(_decoder_layer, layer, base.rotary_emb, self.hf.config))
                  for i, layer in enumerate(base.layers)]
        return [embed, *layers, Part({f"{prefix}.norm": base.norm, head_name: getattr(self.hf, head_name)},
                                     lambda h: head(base.norm(h)), block=False)]


    def raybig_tp_plan(self) -> dict[str, str]:
        """The config's own tensor-parallel plan (`base_model_tp_plan`: layers.*.self_attn.q_proj colwise, ...),
        at the base model's path here; raybig applies its colwise and rowwise entries."""
        plan = getattr(self.hf.config, "base_model_tp_plan", None) or {}
        if not plan:
            raise ValueError(f"transformers has no tensor-parallel plan for {type(self.hf).__name__}")
        styles = sorted({style for style in plan.values()} - {"colwise", "rowwise"})
        if styles:
            raise ValueError(f"{type(self.hf).__name__}'s tensor-parallel plan uses {', '.join(styles)}, which "
                             "raybig does not apply (colwise and rowwise only)")
        return {f"{self.hf.base_model_prefix}.{path}": style for path, style in plan.items()}

    def raybig_tp_heads(self) -> dict[str, int]:
        """The head counts a tensor-parallel degree must divide (each rank takes whole heads), by spec field."""
        config = self.hf.config
        return {f"model.config.{name}": getattr(config, name) for name in ("num_attention_heads", "num_key_value_heads")
                if getattr(config, name, None)}


class HFCausalLM(HFModel):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids.long(), use_cache=False).logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """transformers' own causal-LM loss, given targets already shifted by the data (y[t] = x[t + 1])."""
        return self.hf.loss_function(logits=logits, labels=None, vocab_size=self.hf.config.vocab_size,
                                     shift_labels=targets.contiguous(),
                                     num_items_in_batch=(targets != IGNORE).sum().clamp(min=1))  # 0, not NaN

    def raybig_parts(self) -> list[Part]:
        return self._decoder_parts("lm_head", self.hf.lm_head)


class HFSequenceClassifier(HFModel):
    """A sequence of token ids to class logits, read at the last position as transformers does for an
    unpadded sequence (raybig's token data are fixed-length windows, without padding)."""
    HEADS = ("score.", "classifier.")  # a fresh head trains beside LoRA adapters

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.hf.base_model(input_ids=input_ids.long(), use_cache=False).last_hidden_state
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.score(hidden[:, -1])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.hf.loss_function(labels=targets, pooled_logits=logits, config=self.hf.config)

    def raybig_parts(self) -> list[Part]:
        return self._decoder_parts("score", self._head)


WRAPPERS = {"causal_lm": HFCausalLM, "sequence_classification": HFSequenceClassifier}


def _decoder_layer(layer: nn.Module, rotary: nn.Module, config, hidden: torch.Tensor) -> torch.Tensor:
    """One decoder layer run on its own, given what the decoder's forward computes once for all its layers."""
    from transformers.masking_utils import create_causal_mask

    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=positions)
    return layer(hidden, attention_mask=mask, position_embeddings=rotary(hidden, positions), position_ids=positions)


def write_pretrained(directory: Path, model_spec, meta, weights: Path) -> None:
    """The run's model as a `save_pretrained` directory: config.json and model.safetensors, which
    `AutoModelForCausalLM.from_pretrained(directory)` loads with no missing or unexpected keys, and for a
    language model its tokenizer (`AutoTokenizer`: the characters that are its tokens) and chat template."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config(model_spec, meta).save_pretrained(tmp)
    shutil.copyfile(weights, tmp / "model.safetensors")  # published with the metadata transformers reads
    if meta.task == "lm" and meta.tokenizer:
        _tokenizer_with(meta).save_pretrained(tmp)  # tokenizer.json, its config and chat_template.jinja
    elif meta.task == "lm":
        (tmp / "raybig_vocab.json").write_text(json.dumps({"vocab": meta.vocab}))
        char_tokenizer(meta.vocab, meta.chat_template or DEFAULT_CHAT_TEMPLATE).save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def char_tokenizer(vocab: str, chat_template: str):
    """A transformers tokenizer for raybig's char-level text: each character one token, in the run's order,
    decoded by joining them; `AutoTokenizer.from_pretrained` loads it from the run's hf/ directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(vocab)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()
    fast = transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.chat_template = chat_template
    return fast


def _tokenizer_with(meta):
    """The run's own tokenizer as transformers keeps one, with its end-of-text token and chat template."""
    from tokenizers import Tokenizer

    fast = transformers().PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta.extra["tokenizer_json"]),
                                                  eos_token=meta.eos_token)
    fast.chat_template = meta.chat_template or DEFAULT_CHAT_TEMPLATE
    return fast
