"""A text or jsonl corpus larger than memory: tokenized once, in parallel, by Ray Data, into shards.

The files are cut into pieces (whole files grouped, or a large file's line-aligned byte ranges where a
document is a line or a JSON row) of a few MB. A Ray Data `map_batches` task per piece reads it, splits its
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

from raybig.data.documents import Document, document_suffixes, pack, split_documents, text_documents
from raybig.data.files import BadRow, RowErrors, read_text, source_files
from raybig.errors import SpecError

# a piece's text: large enough that a task's start costs little, small enough that a task holds little
PIECE_BYTES_MIN, PIECE_BYTES_MAX = 256 * 2**10, 16 * 2**20


def streams(spec) -> bool:
    """Whether a language model's data is tokenized into shards rather than held in memory."""
    from raybig.data.remote import local_paths

    if not spec.is_text:
        return False
    spec = local_paths(spec)
    streamable = spec.source in ("text", "jsonl", "parquet") and getattr(spec, "path", None) is not None
    if spec.loader == "stream" and not streamable:
        where = "the standard-library corpus (no data.path) is small" if spec.source == "text" else \
            f"a {spec.source} text column is read in memory"
        raise SpecError(f"stream tokenizes text, jsonl and parquet files; {where}: use loader memory or auto",
                        "data.loader")
    if spec.loader != "auto" or not streamable:
        return spec.loader == "stream"
    files = [f for _, paths, _ in _parquet_sources(spec) for f in paths] if spec.source == "parquet" else \
        source_files(spec.path, suffixes=document_suffixes(spec))
    return sum(f.stat().st_size for f in files) > spec.memory_mb * 2**20


def piece_bytes(spec) -> int:
    return int(np.clip(spec.memory_mb * 2**20 // 16, PIECE_BYTES_MIN, PIECE_BYTES_MAX))


def plan_pieces(spec) -> list[dict]:
    """The corpus as pieces, in file order: {"ranges": [[file, start, end, first line], ...]} of text, or
    {"row_groups": [[file, group], ...]} of Parquet; "split" says where a val_path's pieces go."""
    if spec.source == "parquet":
        return _row_group_pieces(spec)
    return [{"ranges": ranges, "split": None} for ranges in _text_pieces(spec)]


def _text_pieces(spec) -> list[list[list]]:
    target, by_line = piece_bytes(spec), spec.source == "jsonl" or spec.document == "line"
    pieces, small, small_bytes = [], [], 0
    for file in source_files(spec.path, suffixes=document_suffixes(spec)):
        size = file.stat().st_size
        file = file.resolve()  # the tasks' working directory need not be this process's
        if size > target and by_line:
            pieces += [[r] for r in _line_ranges(file, size, target)]
            continue
        small.append([str(file), 0, size, 1])
        small_bytes += size
        if small_bytes >= target:
            pieces.append(small)
            small, small_bytes = [], 0
    return pieces + ([small] if small else [])


def _line_ranges(file: Path, size: int, target: int) -> list[list]:
    """Byte ranges of about `target` bytes, each ending after a newline, with the line each starts at."""
    ranges, start, line = [], 0, 1
    with open(file, "rb") as f:
        while start < size:
            f.seek(min(start + target, size))
            tail = f.readline() if start + target < size else b""
            end = min(start + target, size) + len(tail)
            f.seek(start)
            ranges.append([str(file), start, end, line])
            line += f.read(end - start).count(b"\n")
            start = end
    return ranges


def _parquet_sources(spec) -> list[tuple[str, list[Path], str | None]]:
    """(field, files, the split they are) for path and val_path."""
    out = []
    for path, field, split in ((spec.path, "data.path", "train" if spec.val_path else None),
                               (spec.val_path, "data.val_path", "val")):
        if path is None:
            continue
        files = sorted(Path(path).rglob("*.parquet")) if Path(path).is_dir() else source_files(path, field)
        if not files:
            raise SpecError(f"{path} holds no .parquet files", field)
        out.append((field, [f.resolve() for f in files], split))
    return out


def _row_group_pieces(spec) -> list[dict]:
    """Row groups, grouped to about piece_bytes each; a file that is not Parquet is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target, pieces = piece_bytes(spec), []
    for field, files, split in _parquet_sources(spec):
        groups, held = [], 0
        for file in files:
            try:
                meta = pq.ParquetFile(file).metadata
            except (pa.ArrowInvalid, OSError) as err:
                raise SpecError(f"{file} is not readable as Parquet: {err}", field) from None
            for g in range(meta.num_row_groups):
                groups.append([str(file), g])
                held += meta.row_group(g).total_byte_size
                if held >= target:
                    pieces.append({"row_groups": groups, "split": split})
                    groups, held = [], 0
        if groups:
            pieces.append({"row_groups": groups, "split": split})
    return pieces


def piece_documents(spec, piece: dict, template: str, errors: RowErrors) -> list[Document]:
    if "row_groups" in piece:
        import pyarrow.parquet as pq

        from raybig.data.tables import text_column

        docs = []
        for file, group in piece["row_groups"]:
            table = pq.ParquetFile(file).read_row_group(group)
            docs += [Document([(text, True)])
                     for text in text_column(spec, table, f"{file} (row group {group})", errors)]
        return docs
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

    spec = _data_spec(spec_json)
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
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}


def _characters(batch: dict, spec_json: str, template: str) -> dict:
    """A Ray Data task: the characters its pieces' documents hold (for a char tokenizer)."""
    from raybig.data.tokenizer import CharTokenizer

    spec = _data_spec(spec_json)
    seen = []
    for piece in batch["piece"]:
        chars = set(CharTokenizer.separator)
        for doc in piece_documents(spec, json.loads(piece), template, RowErrors("skip")):
            chars.update(doc.text)
        seen.append("".join(sorted(chars)))
    return {"chars": np.array(seen, dtype=object)}


def _data_spec(spec_json: str):
    from pydantic import TypeAdapter

    from raybig.spec import DataSpec

    return TypeAdapter(DataSpec).validate_json(spec_json)


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
            results = _map_pieces(_tokenize_pieces, pieces, spec, template=template, out=str(tmp),
                                  tokenizer=_described(tokenizer))
            index, skipped = _index(results, spec), int(sum(r["skipped"] for r in results))
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


def _index(results: list[dict], spec) -> dict:
    failed = [r for r in results if r["error"]]
    if failed:
        first = min(failed, key=lambda r: r["index"])
        raise SpecError(first["error"], first["field"] or "data.path")
    ordered = sorted(results, key=lambda r: r["index"])
    index = {split: [entry for r in ordered for entry in json.loads(r[split])] for split in ("train", "val")}
    for split, name in (("train", "training"), ("val", "validation")):
        if not index[split]:
            raise SpecError(f"the corpus gives no {name} window of seq_len {spec.seq_len} plus one tokens",
                            "data.seq_len")
    return index


def _map_pieces(fn, pieces: list, spec, **kwargs) -> list[dict]:
    """`fn` over the pieces in Ray Data tasks (on the Ray this process runs, else on one started for it)."""
    import logging

    import ray.data

    from raybig.cluster import ray_session

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not its per-run notices on the console
    with ray_session():
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"index": i, "piece": json.dumps(p)} for i, p in enumerate(pieces)]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        return dataset.map_batches(fn, batch_size=1, fn_kwargs={"spec_json": spec.model_dump_json(), **kwargs}
                                   ).take_all()


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
        found = _map_pieces(_characters, pieces, spec, template=template)
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
