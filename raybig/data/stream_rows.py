"""A table (numeric features and a label) or an image folder larger than memory: read once, in parallel,
by Ray Data tasks into shards.

The files are cut into pieces (raybig.data.pieces). A task per piece reads its rows (or decodes its
images at the shape the driver fixed from the first image), keeps a seeded share of them for validation
unless a val_path (or a DatasetDict's validation split) sets it apart, and writes them as shards
(raybig.data.shards) into a cache entry keyed by the files' contents and the settings. Class names come
first: an image folder's are its subfolders; a text label column's are collected by a first pass over
the pieces. The driver holds the plan and the tasks' results, never the rows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from raybig.data.files import RowErrors
from raybig.data.pieces import (data_spec, first_image_shape, map_pieces, piece_table, plan_pieces, shard_index,
                                task_rows)
from raybig.errors import SpecError


def streamed_rows_bundle(spec, errors: RowErrors):
    """The source's shards, written now unless an entry for these files and settings exists."""
    from raybig.data.datasets import DataBundle
    from raybig.data.shards import finish_entry, new_entry, open_entry, shards_root
    from raybig.data.token_cache import cache_key, meta_of, meta_record

    key = "pieces-" + cache_key(spec, None)
    entry = shards_root() / key
    splits = open_entry(entry)
    if splits is None:
        pieces = plan_pieces(spec)
        classes, shape = _classes_and_shape(spec, pieces)
        tmp = new_entry(shards_root(), key)
        try:
            results = map_pieces(_write_pieces, pieces, spec, classes=classes, shape=shape, out=str(tmp))
            index = shard_index(results, f"{spec.path} gives no {{split}} rows", "data.path")
            meta = _meta(spec, results, classes)
        except BaseException:  # a bad row, or a task's failure: no half-written entry stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        first = next(r for r in results if r["dtypes"])
        entry = finish_entry(tmp, key, {**index, **json.loads(first["dtypes"])}, meta_record(meta))
        splits = open_entry(entry)
    meta = meta_of(json.loads((entry / "meta.json").read_text()))
    errors.skipped = meta.skipped_rows
    return DataBundle(meta, *splits)


def _classes_and_shape(spec, pieces: list[dict]) -> tuple[list[str] | None, list[int] | None]:
    """(the class names where the labels are names, else None; an image's [C, H, W], else None). A table's
    first piece is read here, so a missing column or a wrong type is named before any task starts."""
    if spec.source == "image_folder":
        from raybig.data.images import class_folders

        return [f.name for f in class_folders(spec.path, "data.path")], list(first_image_shape(spec))
    import pyarrow as pa

    from raybig.data.tables import feature_arrays

    table, name = piece_table(spec, pieces[0], RowErrors("skip"))
    label = table.column(spec.label) if spec.label in table.column_names else None
    textual = label is not None and (pa.types.is_string(label.type) or pa.types.is_large_string(label.type))
    feature_arrays(spec, table.slice(0, 0), name, RowErrors("skip"))  # names a missing column or a wrong type
    if spec.is_regression or not textual:
        return None, None
    found = map_pieces(_label_names, [p for p in pieces if p["split"] != "val"], spec)
    return sorted(set().union(*(json.loads(r["names"]) for r in found))), None


def _label_names(batch: dict, spec_json: str) -> dict:
    """A Ray Data task: the class names in its piece's label column."""
    spec = data_spec(spec_json)
    names = []
    for piece in batch["piece"]:
        table, _ = piece_table(spec, json.loads(piece), RowErrors("skip"))
        names.append(json.dumps(sorted(set(table.column(spec.label).drop_null().to_pylist()))))
    return {"names": np.array(names, dtype=object)}


def _write_pieces(batch: dict, spec_json: str, classes: list[str] | None, shape: list[int] | None,
                  out: str) -> dict:
    """A Ray Data task: its piece's rows, split and written as shards; what it wrote, its largest class index,
    the rows it skipped, or the first error."""
    from raybig.data.shards import index_entry, write_split

    spec = data_spec(spec_json)
    rows = []
    for index, piece in zip(batch["index"], batch["piece"]):
        index, errors, written, error, field, top, dtypes = int(index), RowErrors(spec.on_error), {}, "", "", -1, ""
        try:
            piece = json.loads(piece)
            x, y = _rows(spec, piece, classes, shape, errors)
            for split, keep in zip(("train", "val"), _split(len(y), piece["split"], spec.val_fraction, index)):
                written[split] = write_split(Path(out) / split, x[keep], y[keep], spec.memory_mb * 2**20,
                                             prefix=f"{index:06d}-")
            top = int(y.max()) if len(y) and not spec.is_regression else -1
            dtypes = json.dumps(index_entry(x, y)) if len(y) else ""
        except SpecError as err:
            (field, error), *_ = err.problems
        rows.append({"index": index, "train": json.dumps(written.get("train", [])),
                     "val": json.dumps(written.get("val", [])), "skipped": errors.skipped, "error": error,
                     "field": field, "top": top, "dtypes": dtypes})
    return task_rows(rows)


def _rows(spec, piece: dict, classes, shape, errors: RowErrors) -> tuple[np.ndarray, np.ndarray]:
    if "images" in piece:
        from raybig.data.images import decode_images

        field = "data.val_path" if piece["split"] == "val" else "data.path"
        return decode_images(spec, [(label, file) for file, label in piece["images"]], field, errors, tuple(shape))
    from raybig.data.tables import feature_arrays

    table, name = piece_table(spec, piece, errors)
    x, y, _ = feature_arrays(spec, table, name, errors, classes)
    return x, y


def _split(rows: int, split: str | None, val_fraction: float, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a piece: all one or the other where its split is set, else a share
    drawn with the piece's own seed."""
    from raybig.data.datasets import SPLIT_SEED

    every = np.arange(rows)
    if split is not None:
        return (every, every[:0]) if split == "train" else (every[:0], every)
    val = np.zeros(rows, dtype=bool)
    val[np.random.default_rng([SPLIT_SEED, index]).permutation(rows)[: round(rows * val_fraction)]] = True
    return every[~val], every[val]


def _meta(spec, results: list[dict], classes: list[str] | None):
    from raybig.data.datasets import DataMeta

    first = json.loads(next(r for r in results if r["dtypes"])["dtypes"])
    skipped = int(sum(r["skipped"] for r in results))
    if spec.is_regression:
        return DataMeta("regression", first["shape"], 1, skipped_rows=skipped)
    count = len(classes) if classes else max(int(r["top"]) for r in results) + 1
    if count < 2:
        raise SpecError(f"{spec.path} has one class only; a classifier needs two or more", "data.label")
    return DataMeta("classification", first["shape"], count, labels=classes or [], skipped_rows=skipped)
