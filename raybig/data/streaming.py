"""A corpus larger than memory (text, jsonl, or a table's text column): tokenized once, in parallel, by Ray
Data, into shards.

The files are cut into pieces of a few MB (raybig.data.pieces). A Ray Data `map_batches` task per piece reads it, splits its
documents to training and validation (each piece its own seeded share, whole documents), tokenizes, packs
`seq_len` windows and writes them as shards (raybig.data.shards) into a cache entry keyed by the files'
contents, the settings and the tokenizer. No process ever holds the corpus: the driver holds the plan,
each task a piece, each rank a shuffle window. The tokenizer is fixed before the tasks start: a given
tokenizer.json, a BPE trained by the driver over the training documents read piece by piece, or the
characters the pieces hold (a first Ray Data pass).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from raybig.data.documents import Document, pack, split_documents, text_documents
from raybig.data.files import BadRow, RowErrors, read_text
from raybig.data.pieces import (data_spec, map_pieces, piece_table, plan_pieces, shard_index, source_bytes,
                                task_rows)
from raybig.errors import SpecError


def streams(spec) -> bool:
    """Whether the data is read in pieces by Ray Data tasks into shards (this module for text, raybig.data.
    stream_rows for tables and images) rather than whole into this process's memory. The built-in sources
    are small: with loader stream they are written as shards from memory (raybig.train.runner.pick_loader)."""
    from raybig.data.remote import local_paths

    if spec.source in ("digits", "synthetic") or spec.loader == "memory":
        return False
    why_not = None
    if spec.source == "text" and spec.path is None:
        why_not = "the standard-library corpus (no data.path) is small: use loader memory or auto"
    elif spec.source == "hf_disk" and spec.builder is not None:
        why_not = (f"datasets' {spec.builder} builder reads its files whole: give them as source "
                   f"{'jsonl' if spec.builder == 'json' else spec.builder} to stream them")
    if why_not is not None:
        if spec.loader == "stream":
            raise SpecError(f"stream cannot cut this data into pieces: {why_not}", "data.loader")
        return False
    spec = local_paths(spec)
    wanted = spec.loader == "stream" or source_bytes(spec) > spec.memory_mb * 2**20
    augment = getattr(spec, "augment", None)
    if wanted and augment is not None and (augment.flip or augment.crop_padding):
        raise SpecError("flips and crops are drawn per image by the memory loader, but these images stream: set "
                        "data.loader: memory, or leave data.augment out", "data.augment")
    return wanted


def piece_documents(spec, piece: dict, template: str, errors: RowErrors) -> list[Document]:
    if "ranges" not in piece:  # a table's text column
        from raybig.data.tables import text_column

        table, name = piece_table(spec, piece, errors)
        return [Document([(text, True)]) for text in text_column(spec, table, name, errors)]
    docs = []
    for file, start, end, first_line in piece["ranges"]:
        try:
            text = read_text(Path(file), start, end, first_line)
        except BadRow as err:
            errors.bad(err)
            continue
        docs += text_documents(spec, file, text, template, errors, first_line)
    return docs


def split_piece(docs: list[Document], piece: dict, val_fraction: float,
                index: int) -> tuple[list[Document], list[Document]]:
    """A piece's validation documents: all or none where val_path sets them apart, else drawn with the
    piece's own seed (a lone chat stays in training)."""
    from raybig.data.datasets import SPLIT_SEED

    if piece["split"] is not None:
        return (docs, []) if piece["split"] == "train" else ([], docs)
    if not docs:
        return [], []
    if len(docs) == 1 and len(docs[0].segments) != 1:
        return docs, []
    return split_documents(docs, val_fraction, [SPLIT_SEED, index])


# ----------------------------------------------------------------------------- the tasks
def _tokenize_pieces(batch: dict, spec_json: str, tokenizer: dict, template: str, out: str) -> dict:
    """A Ray Data task: its pieces' windows, written as shards; what it wrote, skipped, or the first error."""
    from raybig.data.shards import write_split

    spec = data_spec(spec_json)
    encoder = _tokenizer_from(tokenizer)
    rows = []
    for index, piece in zip(batch["index"], batch["piece"]):
        index, errors, written, error, field = int(index), RowErrors(spec.on_error), {}, "", ""
        try:
            piece = json.loads(piece)
            parts = split_piece(piece_documents(spec, piece, template, errors), piece, spec.val_fraction, index)
            for split, docs in zip(("train", "val"), parts):
                x, y = pack(docs, encoder, spec.seq_len, split, required=False)
                written[split] = write_split(Path(out) / split, x.astype(_dtype(encoder)), y.astype(_dtype(encoder)),
                                             spec.memory_mb * 2**20, prefix=f"{index:06d}-")
        except SpecError as err:
            (field, error), *_ = err.problems
        except ValueError as err:  # a pretrained char model's tokenizer meets characters it has not
            error, field = f"the text has {err}; the pretrained model's tokens are its characters", "model.pretrained"
        rows.append({"index": index, "train": json.dumps(written.get("train", [])),
                     "val": json.dumps(written.get("val", [])), "skipped": errors.skipped, "error": error,
                     "field": field})
    return task_rows(rows)


def _characters(batch: dict, spec_json: str, template: str) -> dict:
    """A Ray Data task: the characters its pieces' documents hold (for a char tokenizer)."""
    from raybig.data.tokenizer import CharTokenizer

    spec = data_spec(spec_json)
    seen = []
    for piece in batch["piece"]:
        chars = set(CharTokenizer.separator)
        for doc in piece_documents(spec, json.loads(piece), template, RowErrors("skip")):
            chars.update(doc.text)
        seen.append("".join(sorted(chars)))
    return {"chars": np.array(seen, dtype=object)}


def _tokenizer_from(described: dict):
    from raybig.data.tokenizer import CharTokenizer, HFTokenizer

    if "chars" in described:
        return CharTokenizer(described["chars"])
    return HFTokenizer.from_json(described["json"], described["eos_token"], "the run's tokenizer")


# ----------------------------------------------------------------------------- the driver
def streamed_text_bundle(spec, model, errors: RowErrors):
    """The corpus's shards, tokenized now unless an entry for these files, settings and tokenizer exists."""
    from raybig.data.datasets import DataBundle
    from raybig.data.language import lm_meta
    from raybig.data.shards import finish_entry, new_entry, open_entry, shards_root
    from raybig.data.token_cache import cache_key, meta_of, meta_record

    key = "text-" + cache_key(spec, model)
    entry = shards_root() / key
    splits = open_entry(entry)
    if splits is None:
        pieces = plan_pieces(spec)
        template, tokenizer = _tokenizer(spec, model, pieces)
        tmp = new_entry(shards_root(), key)
        try:
            results = map_pieces(_tokenize_pieces, pieces, spec, template=template, out=str(tmp),
                                  tokenizer=_described(tokenizer))
            index = shard_index(results, f"the corpus gives no {{split}} window of seq_len {spec.seq_len} plus one "
                                         "tokens", "data.seq_len")
            skipped = int(sum(r["skipped"] for r in results))
        except BaseException:  # a bad row, or a task's failure: no half-written entry stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta = lm_meta(spec, tokenizer, template, skipped)
        entry = finish_entry(tmp, key, {**index, "shape": [spec.seq_len], "y_shape": [spec.seq_len],
                                        "x_dtype": _dtype(tokenizer), "y_dtype": _dtype(tokenizer)},
                             meta_record(meta))
        splits = open_entry(entry)
    meta = meta_of(json.loads((entry / "meta.json").read_text()))
    errors.skipped = meta.skipped_rows
    return DataBundle(meta, *splits)


def _dtype(tokenizer) -> str:
    return "int16" if tokenizer.vocab_size < 2**15 else "int32"


def _tokenizer(spec, model, pieces: list):
    """(the chat template, the tokenizer), fixed before any piece is tokenized."""
    from raybig.data.chat import DEFAULT_CHAT_TEMPLATE
    from raybig.data.tokenizer import (CharTokenizer, chat_template_of, load_tokenizer, pretrained_chars,
                                       tokenizer_directory, trained_bpe)

    directory = tokenizer_directory(spec, model)
    template = chat_template_of(directory) or DEFAULT_CHAT_TEMPLATE
    settings = spec.tokenizer
    if directory is not None:
        return template, load_tokenizer(directory, settings.eos_token if settings else None,
                                        "data.tokenizer.path" if settings else "model.pretrained")
    if settings is not None:
        return template, trained_bpe(_TrainingTexts(spec, pieces, template), settings.vocab_size, settings.eos_token)
    chars = pretrained_chars(model)
    if chars is None:
        found = map_pieces(_characters, pieces, spec, template=template)
        chars = "".join(sorted(set().union(*(r["chars"] for r in found))))
    return template, CharTokenizer(chars)


class _TrainingTexts:
    """The training documents' texts, read piece by piece each time they are iterated (hashed, then trained
    on), never all at once. A bad row fails here as it would in the tasks; skipped ones are counted there."""

    def __init__(self, spec, pieces: list, template: str):
        self.spec, self.pieces, self.template = spec, pieces, template

    def __iter__(self):
        for index, piece in enumerate(self.pieces):
            docs = piece_documents(self.spec, piece, self.template, RowErrors(self.spec.on_error))
            train, _ = split_piece(docs, piece, self.spec.val_fraction, index)
            for doc in train:
                yield doc.text


def _described(tokenizer) -> dict:
    from raybig.data.tokenizer import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        return {"chars": tokenizer.vocab}
    return {"json": tokenizer.to_json(), "eos_token": tokenizer.eos_token}
