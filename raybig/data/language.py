"""A language model's data: documents from the source, split by document, tokenized, packed into windows."""
from __future__ import annotations

from raybig.data.chat import DEFAULT_CHAT_TEMPLATE
from raybig.data.documents import Document, pack, read_documents, split_documents
from raybig.data.files import RowErrors
from raybig.data.tokenizer import (CharTokenizer, chat_template_of, load_tokenizer, pretrained_chars,
                                   tokenizer_directory, trained_bpe)
from raybig.errors import SpecError


def text_bundle(spec, model, errors: RowErrors):
    """The packed windows, from the token cache when these files and settings were tokenized before; a corpus
    too large for memory as shards on disk (raybig.data.streaming)."""
    from raybig.data import token_cache
    from raybig.data.streaming import streamed_text_bundle, streams

    if streams(spec):
        return streamed_text_bundle(spec, model, errors)
    key = token_cache.cache_key(spec, model)
    bundle = token_cache.load(key)
    if bundle is None:
        bundle = _tokenized(spec, model, errors)
        token_cache.store(key, bundle)
    return bundle


def _tokenized(spec, model, errors: RowErrors):
    from raybig.data.datasets import SPLIT_SEED, DataBundle, Split

    directory = tokenizer_directory(spec, model)
    template = chat_template_of(directory) or DEFAULT_CHAT_TEMPLATE
    train_docs, val_docs = _documents(spec, template, errors)
    if val_docs is None:
        train_docs, val_docs = split_documents(train_docs, spec.val_fraction, SPLIT_SEED)
    tokenizer = _tokenizer(spec, model, directory, train_docs, val_docs)
    try:
        x, y = pack(train_docs, tokenizer, spec.seq_len, "training")
        vx, vy = pack(val_docs, tokenizer, spec.seq_len, "validation")
    except ValueError as err:  # a char tokenizer fixed by a pretrained model meets characters it has not
        if isinstance(err, SpecError):
            raise
        raise SpecError(f"the text has {err}; the pretrained model's tokens are its characters",
                        "model.pretrained") from None
    return DataBundle(lm_meta(spec, tokenizer, template, errors.skipped), Split(x, y), Split(vx, vy))


def lm_meta(spec, tokenizer, template: str, skipped: int):
    from raybig.data.datasets import DataMeta

    meta = DataMeta("lm", [spec.seq_len], tokenizer.vocab_size, chat_template=template, skipped_rows=skipped)
    if isinstance(tokenizer, CharTokenizer):
        meta.vocab = tokenizer.vocab
    else:
        meta.tokenizer, meta.eos_token = tokenizer.digest, tokenizer.eos_token
        meta.extra["tokenizer_json"] = tokenizer.to_json()
    return meta


def _documents(spec, template: str, errors: RowErrors) -> tuple[list[Document], list[Document] | None]:
    """(documents, validation documents where the source keeps them apart, else None)."""
    if spec.source == "text" and spec.path is None:
        from raybig.data.datasets import _stdlib_corpus

        return [Document([(_stdlib_corpus(spec), True)])], None
    if spec.source in ("text", "jsonl"):
        return read_documents(spec, template, errors), None
    from raybig.data.tables import read_tables, text_column

    train, val = read_tables(spec, errors)

    def as_documents(table, name):
        return [Document([(text, True)]) for text in text_column(spec, table, name, errors)]

    return as_documents(train, spec.path), (as_documents(val, spec.val_path or f"{spec.path} (validation)")
                                            if val is not None else None)


def _tokenizer(spec, model, directory, train_docs: list[Document], val_docs: list[Document]):
    settings = spec.tokenizer
    if directory is not None:
        return load_tokenizer(directory, settings.eos_token if settings else None,
                              "data.tokenizer.path" if settings else "model.pretrained")
    if settings is not None:  # train: bpe, on the training documents only
        return trained_bpe([d.text for d in train_docs], settings.vocab_size, settings.eos_token)
    chars = pretrained_chars(model)
    if chars is not None:
        return CharTokenizer(chars)
    seen = set(CharTokenizer.separator)
    for doc in (*train_docs, *val_docs):
        seen.update(doc.text)
    return CharTokenizer("".join(sorted(seen)))

