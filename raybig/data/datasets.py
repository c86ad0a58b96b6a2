"""Every data source, local, nothing downloaded at run time, becomes the same thing: inputs `x` with a
per-sample shape and integer targets `y` (class indices; for a language model the next tokens, -100 where
the loss is off), split into train and validation with a fixed seed so every run (and every data-parallel
degree) sees the same split.

Built in: the 8x8 digits, Python's standard-library text, synthetic points. Yours: text files, JSONL,
CSV, Parquet, a `datasets` directory, a folder of images (raybig.data.documents, .tables, .images).
"""
from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybig.data.files import RowErrors
from raybig.errors import SpecError
from raybig.spec import DigitsData, SyntheticData

SPLIT_SEED = 0
DIGITS_ROWS = 1797


@dataclass
class DataMeta:
    """What a model and a server need to know about the data, recorded beside every checkpoint."""
    task: str  # "classification", "regression" or "lm"
    shape: list[int]  # one sample's input shape
    num_classes: int  # the model's outputs: classes, the vocabulary size for the lm, 1 for a regression
    vocab: str = ""  # a char lm: the characters, in token order
    tokenizer: str = ""  # an lm with a tokenizer.json: its digest (the file is kept in the run)
    eos_token: str = ""
    chat_template: str = ""  # the lm's, where its tokenizer brings one
    labels: list[str] = field(default_factory=list)  # class names, where the data has them
    skipped_rows: int = 0  # bad rows left out (data.on_error: skip)
    extra: dict = field(default_factory=dict)  # not recorded: e.g. the tokenizer itself, for the driver

    def to_dict(self) -> dict:
        out = {"task": self.task, "shape": self.shape, "num_classes": self.num_classes, "vocab": self.vocab}
        for key in ("tokenizer", "eos_token", "chat_template", "labels", "skipped_rows"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes


@dataclass
class DataBundle:
    meta: DataMeta
    train: Split  # or, for data that streams, a raybig.data.shards.ShardedSplit
    val: Split

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.val.nbytes


def cache_dir() -> Path:
    d = Path(os.environ.get("RAYBIG_CACHE", Path.home() / ".cache" / "raybig"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- describe (before Ray)
def describe(spec, model=None) -> DataMeta:
    """The data's task, shape and classes (raises SpecError for missing files, columns, bad rows). The
    built-in sources know theirs; the others are read (once per process: load() then reuses them)."""
    if isinstance(spec, DigitsData):
        return _digits_meta(spec)
    if isinstance(spec, SyntheticData):
        return DataMeta("classification", [spec.features], spec.classes)
    return load(spec, model).meta


def _digits_meta(spec: DigitsData) -> DataMeta:
    if spec.classes is None:
        return DataMeta("classification", [8, 8], 10)
    return DataMeta("classification", [8, 8], len(spec.classes), labels=[str(d) for d in spec.classes])


def _stdlib_file(module: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"


def _stdlib_corpus(spec) -> str:
    parts = []
    for i, module in enumerate(spec.modules):
        path = _stdlib_file(module)
        if not path.is_file():
            raise SpecError(f"no standard-library file {module}.py in {path.parent}", f"data.modules.{i}")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)[: spec.max_chars]
    if len(text) < (spec.seq_len + 1) * 10:
        raise SpecError(f"the corpus has {len(text)} characters, too few for seq_len {spec.seq_len}", "data.max_chars")
    return text


# ----------------------------------------------------------------------------- load
def load(spec, model=None) -> DataBundle:
    """The whole data set in memory. `model` (the spec's model section) lends a pretrained model's tokenizer."""
    if isinstance(spec, DigitsData):
        x, y = _digits()
        if spec.classes is not None:  # the digits kept, renumbered in the order the spec lists them
            kept = np.isin(y, spec.classes)
            renumber = np.full(10, -1, dtype=y.dtype)
            renumber[spec.classes] = np.arange(len(spec.classes))
            x, y = x[kept], renumber[y[kept]]
        return _bundle(_digits_meta(spec), x, y, spec.val_fraction, spec.train_fraction)
    if isinstance(spec, SyntheticData):
        x, y = _synthetic(spec)
        return _bundle(describe(spec), x, y, spec.val_fraction, spec.train_fraction)
    from raybig.data.remote import local_paths

    spec = local_paths(spec)  # s3:// and gs:// paths: read from their local mirror
    return _read(spec.model_dump_json(), type(spec), model.model_dump_json() if model is not None else None)


@functools.lru_cache(maxsize=1)
def _read(spec_json: str, spec_type, model_json: str | None) -> DataBundle:
    """A source read from its files; kept for the next call with the same spec (describe, then load)."""
    from pydantic import TypeAdapter

    from raybig.spec import ModelSpec

    spec = spec_type.model_validate_json(spec_json)
    model = TypeAdapter(ModelSpec).validate_json(model_json) if model_json else None
    errors = RowErrors(getattr(spec, "on_error", "fail"))
    from raybig.data.streaming import streams

    if not spec.is_text and streams(spec):
        from raybig.data.stream_rows import streamed_rows_bundle

        return streamed_rows_bundle(spec, errors)
    if spec.is_text:
        from raybig.data.language import text_bundle

        return text_bundle(spec, model, errors)  # it counts its skipped rows (and caches the count)
    bundle = _images(spec, errors) if spec.source == "image_folder" else _table(spec, errors)
    bundle.meta.skipped_rows = errors.skipped
    return bundle


def _table(spec, errors: RowErrors) -> DataBundle:
    from raybig.data.tables import feature_arrays, read_tables

    train, val = read_tables(spec, errors)
    x, y, classes = feature_arrays(spec, train, spec.path, errors)
    if spec.is_regression:
        meta = DataMeta("regression", list(x.shape[1:]), 1)
        if val is None:
            return _bundle(meta, x, y, spec.val_fraction)
        vx, vy, _ = feature_arrays(spec, val, spec.val_path or f"{spec.path} (validation)", errors)
        return DataBundle(meta, Split(x, y), Split(vx, vy))
    if val is None:
        meta = _classes_meta(list(x.shape[1:]), y, None, classes, spec.path)
        return _bundle(meta, x, y, spec.val_fraction)
    vx, vy, _ = feature_arrays(spec, val, spec.val_path or f"{spec.path} (validation)", errors, classes or None)
    return DataBundle(_classes_meta(list(x.shape[1:]), y, vy, classes, spec.path), Split(x, y), Split(vx, vy))


def _images(spec, errors: RowErrors) -> DataBundle:
    from raybig.data.images import read_image_folder

    x, y, classes = read_image_folder(spec, spec.path, "data.path", errors)
    meta = DataMeta("classification", list(x.shape[1:]), len(classes), labels=classes)
    if spec.val_path is None:
        return _bundle(meta, x, y, spec.val_fraction)
    vx, vy, _ = read_image_folder(spec, spec.val_path, "data.val_path", errors, classes, tuple(x.shape[1:]))
    return DataBundle(meta, Split(x, y), Split(vx, vy))


def _classes_meta(shape: list[int], y: np.ndarray, val_y: np.ndarray | None, classes: list[str],
                  name: str) -> DataMeta:
    if len(y) == 0:
        raise SpecError(f"{name} has no rows to train on", "data.path")
    count = len(classes) or int(max(y.max(), val_y.max() if val_y is not None and len(val_y) else 0)) + 1
    if count < 2:
        raise SpecError(f"{name} has one class only; a classifier needs two or more", "data.label")
    return DataMeta("classification", shape, count, labels=classes)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn ships the 8x8 digits; keep them as Parquet after the first use."""
    path = cache_dir() / "digits.parquet"
    if not path.exists():
        from sklearn.datasets import load_digits

        d = load_digits()
        table = pa.table({**{f"p{i}": d.data[:, i].astype(np.float32) / 16.0 for i in range(64)}, "label": d.target})
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return _read_parquet(path, [f"p{i}" for i in range(64)], "label", [8, 8])


def _read_parquet(path, features, label, shape) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path, columns=[*features, label])
    x = np.stack([table.column(f).to_numpy().astype(np.float32) for f in features], axis=1)
    return x.reshape(len(x), *shape), table.column(label).to_numpy().astype(np.int64)


def _synthetic(spec: SyntheticData) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    centers = rng.normal(0, 3, size=(spec.classes, spec.features))
    y = rng.integers(0, spec.classes, size=spec.samples)
    x = centers[y] + rng.normal(0, spec.noise, size=(spec.samples, spec.features))
    return x.astype(np.float32), y.astype(np.int64)


def _bundle(meta: DataMeta, x: np.ndarray, y: np.ndarray, val_fraction: float,
            train_fraction: float = 1.0) -> DataBundle:
    """A split with a fixed seed, stratified by class: every run and every layout validates on the same rows.
    `train_fraction` keeps that share of each class's training rows (the first of a seeded shuffle)."""
    rng = np.random.default_rng(SPLIT_SEED)
    if meta.task == "regression":  # numbers, not classes: a plain random split
        val = np.sort(rng.permutation(len(y))[: max(1, round(len(y) * val_fraction))])
        train = np.setdiff1d(np.arange(len(y)), val)
        return DataBundle(meta, Split(x[train], y[train]), Split(x[val], y[val]))
    val_idx, train_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:][: max(1, round((len(idx) - n_val) * train_fraction))])
    val, train = np.sort(np.concatenate(val_idx)), np.sort(np.concatenate(train_idx))
    return DataBundle(meta, Split(x[train], y[train]), Split(x[val], y[val]))
