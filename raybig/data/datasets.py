"""Built-in and user datasets, all local: nothing is downloaded at run time.

Every source becomes the same thing: float (or token) inputs `x` with a per-sample shape and
integer targets `y`, split into train and validation with a fixed seed so every run (and every
data-parallel degree) sees the same split.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybig.errors import SpecError
from raybig.spec import DigitsData, ParquetData, SyntheticData, TextData

SPLIT_SEED = 0
DIGITS_ROWS = 1797


@dataclass
class DataMeta:
    """What a model and a server need to know about the data, recorded beside every checkpoint."""
    task: str  # "classification" or "lm"
    shape: list[int]  # one sample's input shape
    num_classes: int  # classes, or the vocabulary size for the lm
    vocab: str = ""  # lm only: the characters, in token order
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"task": self.task, "shape": self.shape, "num_classes": self.num_classes, "vocab": self.vocab}


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    meta: DataMeta
    train: Split
    val: Split

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.train.x, self.train.y, self.val.x, self.val.y))


def cache_dir() -> Path:
    d = Path(os.environ.get("RAYBIG_CACHE", Path.home() / ".cache" / "raybig"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- describe (cheap, before Ray)
def describe(spec) -> DataMeta:
    """The data's shape and classes without loading it all; raises SpecError for missing files or columns."""
    if isinstance(spec, DigitsData):
        return DataMeta("classification", [8, 8], 10)
    if isinstance(spec, SyntheticData):
        return DataMeta("classification", [spec.features], spec.classes)
    if isinstance(spec, TextData):
        text = _corpus(spec)
        return DataMeta("lm", [spec.seq_len], len(sorted(set(text))), vocab="".join(sorted(set(text))))
    if isinstance(spec, ParquetData):
        return _parquet_meta(spec)[0]
    raise TypeError(spec)


def _stdlib_file(module: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"


def _corpus(spec: TextData) -> str:
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


def _parquet_meta(spec: ParquetData) -> tuple[DataMeta, list[str]]:
    for key in ("path", "val_path"):
        value = getattr(spec, key)
        if value is not None and not Path(value).exists():
            raise SpecError(f"no such Parquet file or directory: {value}", f"data.{key}")
    try:
        schema = pq.read_schema(spec.path) if Path(spec.path).is_file() else pq.ParquetDataset(spec.path).schema
    except (pa.ArrowInvalid, OSError) as err:
        raise SpecError(f"{spec.path} is not readable as Parquet: {err}", "data.path") from None
    names = schema.names
    if spec.label not in names:
        raise SpecError(f"column {spec.label!r} is not in {spec.path} (columns: {', '.join(names)})", "data.label")
    features = spec.features or [n for n in names if n != spec.label]
    for i, name in enumerate(features):
        if name not in names:
            raise SpecError(f"column {name!r} is not in {spec.path}", f"data.features.{i}")
        if not (pa.types.is_integer(schema.field(name).type) or pa.types.is_floating(schema.field(name).type)):
            raise SpecError(f"column {name!r} is {schema.field(name).type}, expected a number", f"data.features.{i}")
    shape = spec.shape or [len(features)]
    if int(np.prod(shape)) != len(features):
        raise SpecError(f"shape {shape} holds {int(np.prod(shape))} values but there are {len(features)} features",
                        "data.shape")
    labels = pq.read_table(spec.path, columns=[spec.label]).column(0).to_numpy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise SpecError(f"column {spec.label!r} must hold class indices 0..C-1", "data.label")
    return DataMeta("classification", shape, int(labels.max()) + 1), features


# ----------------------------------------------------------------------------- load
def load(spec) -> DataBundle:
    if isinstance(spec, DigitsData):
        x, y = _digits()
        return _bundle(DataMeta("classification", [8, 8], 10), x, y, spec.val_fraction)
    if isinstance(spec, SyntheticData):
        x, y = _synthetic(spec)
        return _bundle(describe(spec), x, y, spec.val_fraction)
    if isinstance(spec, TextData):
        return _text(spec)
    if isinstance(spec, ParquetData):
        meta, features = _parquet_meta(spec)
        x, y = _read_parquet(spec.path, features, spec.label, meta.shape)
        if spec.val_path:
            vx, vy = _read_parquet(spec.val_path, features, spec.label, meta.shape)
            return DataBundle(meta, Split(x, y), Split(vx, vy))
        return _bundle(meta, x, y, spec.val_fraction)
    raise TypeError(spec)


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


def _text(spec: TextData) -> DataBundle:
    text = _corpus(spec)
    vocab = "".join(sorted(set(text)))
    ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lookup = {ord(c): i for i, c in enumerate(vocab)}
    tokens = np.array([lookup[int(c)] for c in ids], dtype=np.int64)
    n = (len(tokens) - 1) // spec.seq_len
    x = tokens[: n * spec.seq_len].reshape(n, spec.seq_len)
    y = tokens[1: n * spec.seq_len + 1].reshape(n, spec.seq_len)
    n_val = max(1, int(n * spec.val_fraction))  # the tail of the text, so no window overlaps the train part
    meta = DataMeta("lm", [spec.seq_len], len(vocab), vocab=vocab)
    return DataBundle(meta, Split(x[:-n_val], y[:-n_val]), Split(x[-n_val:], y[-n_val:]))


def _bundle(meta: DataMeta, x: np.ndarray, y: np.ndarray, val_fraction: float) -> DataBundle:
    """A stratified split with a fixed seed: every run and every layout validates on the same rows."""
    rng = np.random.default_rng(SPLIT_SEED)
    val_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val_idx.append(idx[: max(1, round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val_idx))
    train = np.setdiff1d(np.arange(len(y)), val)
    return DataBundle(meta, Split(x[train], y[train]), Split(x[val], y[val]))
