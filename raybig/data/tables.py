"""Tables (Parquet, CSV, a `datasets` directory): numeric feature columns and a label, or a text column.

Each source reads into Arrow tables, training and (where the source has one) validation; what follows is
the same for all three.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from raybig.data.files import BadRow, RowErrors, source_files
from raybig.data.pieces import CSV_SUFFIXES
from raybig.errors import SpecError


def read_tables(spec, errors: RowErrors) -> tuple[pa.Table, pa.Table | None]:
    """(training or all rows, validation rows or None) of a parquet, csv or hf_disk source."""
    if spec.source == "hf_disk":
        return _hf_disk(spec)
    train = _read(spec, spec.path, "data.path", errors)
    return train, (_read(spec, spec.val_path, "data.val_path", errors) if spec.val_path else None)


def _read(spec, path: str, field: str, errors: RowErrors) -> pa.Table:
    if spec.source == "parquet":
        import pyarrow.parquet as pq

        if not Path(path).exists():
            raise SpecError(f"no such Parquet file or directory: {path}", field)
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise SpecError(f"{path} is not readable as Parquet: {err}", field) from None
    return _read_csv(spec, source_files(path, field, suffixes=CSV_SUFFIXES), field, errors)


def _read_csv(spec, files: list[Path], field: str, errors: RowErrors) -> pa.Table:
    from raybig.data.pieces import csv_table, header_end

    return csv_table(spec, [[str(f), header_end(f), f.stat().st_size, 2] for f in files], errors, field)


def _hf_disk(spec) -> tuple[pa.Table, pa.Table | None]:
    """A `save_to_disk` directory: a Dataset, or a DatasetDict (train, and validation or test); or, with
    `builder`, local files read by datasets' own builder for their format."""
    datasets = _datasets()
    if spec.builder is not None:
        loaded = _hf_files(spec, datasets)
        train, val = loaded["train"], loaded.get("validation")
    else:
        (_, train, _), *rest = hf_splits(spec)
        val = rest[0][1] if rest else None
    return _arrow(train), (_arrow(val) if val is not None else None)


def hf_splits(spec) -> list[tuple[str, object, str | None]]:
    """(split name, Dataset, train/val/None) of a save_to_disk directory: a Dataset's name is ""; a DatasetDict's
    train split, and its first validation-like split (None when it has none: the rows are split by seed)."""
    from raybig.data.pieces import VAL_SPLITS

    datasets = _datasets()
    if not Path(spec.path).is_dir():
        raise SpecError(f"no such directory: {spec.path}", "data.path")
    try:
        loaded = datasets.load_from_disk(spec.path)
    except (FileNotFoundError, ValueError) as err:
        raise SpecError(f"{spec.path} is not a datasets save_to_disk directory: {err}", "data.path") from None
    if isinstance(loaded, datasets.Dataset):
        return [("", loaded, None)]
    if "train" not in loaded:
        raise SpecError(f"{spec.path} has splits {', '.join(loaded)} but no train split", "data.path")
    val = next((s for s in VAL_SPLITS if s in loaded), None)
    return [("train", loaded["train"], "train" if val else None)] + ([(val, loaded[val], "val")] if val else [])


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SpecError("data.source hf_disk needs datasets: pip install datasets", "data.source") from None
    return datasets


def _hf_files(spec, datasets):
    """path (and val_path) through `datasets.load_dataset(builder, data_files=...)`, its cache in RAYBIG_CACHE."""
    from raybig.data.datasets import cache_dir

    files = {"train": [str(f) for f in source_files(spec.path, "data.path")]}
    if spec.val_path:
        files["validation"] = [str(f) for f in source_files(spec.val_path, "data.val_path")]
    try:
        return datasets.load_dataset(spec.builder, data_files=files, cache_dir=str(cache_dir() / "hf_datasets"))
    except Exception as err:  # datasets raises its own types (DatasetGenerationError, ...) for unreadable files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SpecError(f"datasets' {spec.builder} builder cannot read {spec.path}: {first}", "data.path") from None


def _arrow(dataset) -> pa.Table:
    """The rows a Dataset shows (an index mapping from select/shuffle applied), as an Arrow table."""
    return dataset.flatten_indices().data.table if dataset._indices is not None else dataset.data.table


def text_column(spec, table: pa.Table, name: str, errors: RowErrors) -> list[str]:
    """The rows of the text column data.field; an empty or non-text row is a bad row."""
    if spec.field not in table.column_names:
        raise SpecError(f"column {spec.field!r} is not in {name} (columns: {', '.join(table.column_names)})",
                        "data.field")
    column = table.column(spec.field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise SpecError(f"column {spec.field!r} of {name} is {column.type}, expected text", "data.field")
    texts = []
    for row, value in enumerate(column.to_pylist(), 1):
        if not value:
            errors.bad(BadRow(f"{name}: row {row}: column {spec.field!r} is empty", "data.field"))
            continue
        texts.append(value)
    return texts


def feature_arrays(spec, table: pa.Table, name: str, errors: RowErrors,
                   classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x [N, *shape] float32, y [N] class indices, class names when the labels are text). Text labels are
    numbered in sorted order, or by `classes` (the training split's) for validation rows."""
    names = table.column_names
    if spec.label not in names:
        raise SpecError(f"column {spec.label!r} is not in {name} (columns: {', '.join(names)})", "data.label")
    features = spec.features or [n for n in names if n != spec.label]
    for i, column in enumerate(features):
        if column not in names:
            raise SpecError(f"column {column!r} is not in {name} (columns: {', '.join(names)})", f"data.features.{i}")
        kind = table.schema.field(column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise SpecError(f"column {column!r} of {name} is {kind}, expected a number", f"data.features.{i}")
    shape = spec.shape or [len(features)]
    if int(np.prod(shape)) != len(features):
        raise SpecError(f"shape {shape} holds {int(np.prod(shape))} values but there are {len(features)} features",
                        "data.shape")
    keep = np.ones(table.num_rows, dtype=bool)
    for column in [*features, spec.label]:
        empty = np.flatnonzero(table.column(column).is_null().to_numpy(zero_copy_only=False))
        for row in empty:
            if keep[row]:
                errors.bad(BadRow(f"{name}: row {row + 1}: column {column!r} is empty",
                                  "data.label" if column == spec.label else "data.features"))
        keep[empty] = False
    table = table.filter(pa.array(keep)) if not keep.all() else table
    x = np.stack([table.column(f).to_numpy().astype(np.float32) for f in features], axis=1) if len(table) \
        else np.zeros((0, len(features)), np.float32)
    if spec.is_regression:
        return x.reshape(len(x), *shape), _targets(table.column(spec.label), spec.label, name), []
    y, classes = _labels(table.column(spec.label), spec.label, name, classes)
    return x.reshape(len(x), *shape), y, classes


def _targets(column, label: str, name: str) -> np.ndarray:
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise SpecError(f"column {label!r} of {name} is {column.type}; a regression predicts a number", "data.label")
    return column.to_numpy().astype(np.float32)


def _labels(column, label: str, name: str, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = np.asarray(column.to_pylist(), dtype=object)
        classes = classes or sorted(set(values.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(values.tolist()) - index.keys())
        if unknown:
            raise SpecError(f"{name} has labels the training rows do not: {', '.join(unknown[:5])}", "data.label")
        return np.array([index[v] for v in values], dtype=np.int64), classes
    if not pa.types.is_integer(column.type):
        raise SpecError(f"column {label!r} of {name} is {column.type}, expected class indices 0..C-1 or class "
                        "names", "data.label")
    y = column.to_numpy().astype(np.int64)
    if len(y) and y.min() < 0:
        raise SpecError(f"column {label!r} of {name} must hold class indices 0..C-1 (it has {y.min()})", "data.label")
    return y, classes or []
