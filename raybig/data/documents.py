"""Text for language models: documents read from their source, split, tokenized and packed into windows.

A document is a list of segments, each with whether the model learns to produce it: plain text is one
trained segment; a prompt/completion row trains on the completion only; a chat trains on the assistant's
turns. Documents are packed one after another, an end-of-text token after each, into `seq_len` windows;
a target the model should not learn is -100 (ignored by the loss and by the metrics).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from raybig.data.chat import render_chat
from raybig.data.files import BadRow, RowErrors, read_text, source_files
from raybig.errors import SpecError

IGNORE = -100  # torch's cross_entropy ignore_index


@dataclass
class Document:
    segments: list[tuple[str, bool]]  # (text, whether the loss is on it)

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def read_documents(spec, chat_template: str, errors: RowErrors) -> list[Document]:
    """Every document of a text source with a path, or a jsonl source, in file order."""
    docs = []
    for file in source_files(spec.path, suffixes=document_suffixes(spec)):
        try:
            text = read_text(file)
        except BadRow as err:
            errors.bad(err)
            continue
        docs += text_documents(spec, file, text, chat_template, errors)
    return docs


def document_suffixes(spec) -> tuple[str, ...]:
    return () if spec.source == "text" else (".jsonl", ".json", ".ndjson")


def text_documents(spec, file, text: str, template: str, errors: RowErrors, first_line: int = 1) -> list[Document]:
    """The documents of `text`, read from `file` (whole, or lines `first_line`.. of it)."""
    if spec.source == "text":
        pieces = [line for line in text.splitlines() if line.strip()] if spec.document == "line" else [text]
        return [Document([(piece, True)]) for piece in pieces if piece]
    docs = []
    for row, line in enumerate(text.splitlines(), first_line):
        if not line.strip():
            continue
        try:
            docs.append(_row_document(_json_object(line), spec, template))
        except BadRow as err:
            errors.bad(BadRow(f"{file}:{row}: {err}", err.field))
    return docs


def _json_object(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRow(f"not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadRow(f"a JSON {type(record).__name__}, expected an object")
    return record


def _string(record: dict, key: str, field: str) -> str:
    if key not in record:
        raise BadRow(f"no field {key!r} (fields: {', '.join(record) or 'none'})", field)
    if not isinstance(record[key], str):
        raise BadRow(f"field {key!r} is a {type(record[key]).__name__}, expected a string", field)
    return record[key]


def _row_document(record: dict, spec, template: str) -> Document:
    if spec.format == "text":
        text = _string(record, spec.field, "data.field")
        if not text.strip():
            raise BadRow(f"field {spec.field!r} is empty", "data.field")
        return Document([(text, True)])
    if spec.format == "prompt_completion":
        return Document([(_string(record, spec.prompt_field, "data.prompt_field"), False),
                         (_string(record, spec.completion_field, "data.completion_field"), True)])
    messages = record.get(spec.messages_field)
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRow(f"field {spec.messages_field!r} must be a non-empty list of {{role, content}} strings",
                     "data.messages_field")
    return chat_document(template, messages)


def chat_document(template: str, messages: list[dict]) -> Document:
    """The conversation as the template renders it, the assistant's turns trained and the rest not: each
    turn's span is where the rendering up to it, with and without the turn, differ."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], add_generation_prompt=True)
        through = render_chat(template, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise BadRow("the chat template does not render the conversation turn by turn (each rendering a "
                         "prefix of the next), so the assistant's turns cannot be found", "data.tokenizer")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    whole = render_chat(template, messages, add_generation_prompt=False)
    segments.append((whole[len(done):], False))
    if not any(trained and text for text, trained in segments):
        raise BadRow("the conversation has no assistant turn to learn", "data.messages_field")
    return Document([s for s in segments if s[0]])


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Whole documents to validation, chosen with a fixed seed; a single document gives its tail."""
    if not docs:
        raise SpecError("the corpus holds no documents", "data.path")
    if len(docs) == 1:
        (doc,) = docs
        if len(doc.segments) != 1:
            raise SpecError("one row cannot be split into training and validation: give more", "data.path")
        text = doc.text
        cut = int(len(text) * (1 - val_fraction))
        return [Document([(text[:cut], True)])], [Document([(text[cut:], True)])]
    order = np.random.default_rng(seed).permutation(len(docs))
    val = set(order[: max(1, round(len(docs) * val_fraction))].tolist())
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def pack(docs: list[Document], tokenizer, seq_len: int, split: str,
         required: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `seq_len` tokens and their next-token targets, IGNORE where the loss is off. Each document
    ends with the end-of-text token, which is trained: the model learns where to stop. The char tokenizer has
    none and puts a newline there. Fewer tokens than one window: an error, or (not `required`) no windows."""
    texts = [text for doc in docs for text, _ in doc.segments]
    encode_many = getattr(tokenizer, "encode_many", None)
    ids = iter(encode_many(texts) if encode_many else [tokenizer.encode(t) for t in texts])
    end = np.asarray([tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(tokenizer.separator),
                     dtype=np.int64)
    tokens, trained = [], []
    for doc in docs:
        for _, flag in doc.segments:
            seq = np.asarray(next(ids), dtype=np.int64)
            tokens.append(seq)
            trained.append(np.full(len(seq), flag))
        tokens.append(end)
        trained.append(np.ones(len(end), dtype=bool))
    tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    trained = np.concatenate(trained) if trained else np.zeros(0, bool)
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        if not required:
            return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
        raise SpecError(f"the {split} text has {len(tokens)} tokens, fewer than one window of seq_len {seq_len} "
                        "plus one", "data.seq_len")
    x = tokens[: n * seq_len].reshape(n, seq_len)
    y = np.where(trained[1: n * seq_len + 1], tokens[1: n * seq_len + 1], IGNORE).reshape(n, seq_len)
    return x, y
