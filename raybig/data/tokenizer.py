"""Text to token ids and back. Three kinds, one interface (`encode`, `decode`, `vocab_size`, `eos_id`):

- the text's own characters (the demo's char LM; no end-of-text token: documents are joined by a newline),
- a Hugging Face `tokenizer.json` from a directory (`data.tokenizer.path`, or a pretrained model's),
- a byte-level BPE trained on the training split (`data.tokenizer.train: bpe`), once: it is cached in
  RAYBIG_CACHE under a key of the training text and the settings, so later runs and every sweep trial reuse it.

A run keeps its tokenizer (tokenizer.json beside model.json), so resuming and serving use the very same one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from raybig.errors import SpecError

# the end-of-text tokens of common tokenizers, tried in this order when the spec names none
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")
BPE_EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
    """Each character of the corpus is one token, in sorted order."""
    eos_id = None
    separator = "\n"  # between documents, in place of an end-of-text token

    def __init__(self, vocab: str):
        self.vocab = vocab
        self.lookup = {c: i for i, c in enumerate(vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """ValueError naming the characters the model never saw."""
        unknown = sorted(set(text) - self.lookup.keys())
        if unknown:
            raise ValueError(f"characters the model never saw: {''.join(unknown)!r}")
        return [self.lookup[c] for c in text]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, each looked up as an array of code points (a corpus's worth in seconds)."""
        codes = np.array([ord(c) for c in self.vocab], dtype=np.uint32)
        order = np.argsort(codes)
        ranked = codes[order]
        out = []
        for text in texts:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            at = np.minimum(np.searchsorted(ranked, points), len(ranked) - 1)
            if not (ranked[at] == points).all():
                self.encode(text)  # raises, naming the characters
            out.append(order[at])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`, with the token that ends a document."""
    separator = ""

    def __init__(self, tokenizer, eos_token: str | None, source: str, field: str = "data.tokenizer"):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        if eos_token is None:
            eos_token = next((t for t in EOS_CANDIDATES if t in vocab), None)
            if eos_token is None:
                raise SpecError(f"{source} has none of the usual end-of-text tokens ({', '.join(EOS_CANDIDATES)}): "
                                "name the one it has", f"{field}.eos_token")
        elif eos_token not in vocab:
            raise SpecError(f"{source} has no token {eos_token!r}", f"{field}.eos_token")
        self.eos_token, self.eos_id = eos_token, vocab[eos_token]

    @classmethod
    def from_json(cls, text: str, eos_token: str | None, source: str, field: str = "data.tokenizer") -> "HFTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(text), eos_token, source, field)
        except Exception as err:  # tokenizers raises its own exception type for a malformed file
            if isinstance(err, SpecError):
                raise
            raise SpecError(f"{source} is not a Hugging Face tokenizer.json: {err}", f"{field}.path") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on the tokenizer's own threads."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def digest(self) -> str:
        return digest_of(self.to_json())


Tokenizer = CharTokenizer | HFTokenizer


def digest_of(tokenizer_json: str) -> str:
    """What names a tokenizer in a run's model.json: its tokenizer.json's hash."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


def tokenizer_directory(data_spec, model_spec) -> Path | None:
    """Where a tokenizer.json is to be read from: data.tokenizer.path, else a pretrained model directory that
    holds one (a char-level raybig run's hf/ directory keeps its characters instead, in raybig_vocab.json)."""
    spec = data_spec.tokenizer
    if spec is not None and spec.path is not None:
        path = Path(spec.path)
        return path.parent if path.name == TOKENIZER_FILE else path
    pretrained = getattr(model_spec, "pretrained", None) if spec is None else None
    if pretrained and (Path(pretrained) / TOKENIZER_FILE).is_file() \
            and not (Path(pretrained) / "raybig_vocab.json").is_file():
        return Path(pretrained)
    return None


def pretrained_chars(model_spec) -> str | None:
    """The characters of a char-level raybig model a run starts from: its tokens, in their order."""
    pretrained = getattr(model_spec, "pretrained", None)
    vocab_file = Path(pretrained) / "raybig_vocab.json" if pretrained else None
    return json.loads(vocab_file.read_text())["vocab"] if vocab_file and vocab_file.is_file() else None


def load_tokenizer(directory: Path, eos_token: str | None, field: str) -> HFTokenizer:
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise SpecError(f"no {TOKENIZER_FILE} in {directory}", field)
    return HFTokenizer.from_json(file.read_text(encoding="utf-8"), eos_token or _config_eos(directory), str(file))


def _config_eos(directory: Path) -> str | None:
    """The eos token a transformers tokenizer directory names in tokenizer_config.json, if any."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def chat_template_of(directory: Path | None) -> str | None:
    """The chat template a tokenizer directory keeps (chat_template.jinja, or tokenizer_config.json's)."""
    if directory is None:
        return None
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def trained_bpe(texts: list[str], vocab_size: int, eos_token: str | None) -> HFTokenizer:
    """A byte-level BPE over `texts` (the training split), from the cache when these texts and settings were
    seen before: the key is their content, so renamed or moved files still hit and edited ones miss."""
    import tokenizers
    from raybig.data.datasets import cache_dir

    eos = eos_token or BPE_EOS
    key = hashlib.sha256(json.dumps([vocab_size, eos, tokenizers.__version__]).encode())
    for text in texts:
        key.update(hashlib.sha256(text.encode()).digest())
    path = cache_dir() / "tokenizers" / f"bpe-{key.hexdigest()[:24]}.json"
    if path.is_file():
        return HFTokenizer.from_json(path.read_text(encoding="utf-8"), eos, str(path))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(tokenizer.to_str(), encoding="utf-8")
    os.replace(tmp, path)  # two runs training the same one at once both end with a whole file
    return HFTokenizer(tokenizer, eos, str(path))


def run_tokenizer(run_dir: Path, data_info: dict) -> Tokenizer:
    """The tokenizer a trained run recorded: its tokenizer.json, or its characters."""
    if data_info.get("tokenizer"):
        file = Path(run_dir) / TOKENIZER_FILE
        return HFTokenizer.from_json(file.read_text(encoding="utf-8"), data_info.get("eos_token"), str(file))
    return CharTokenizer(data_info["vocab"])
