"""Data that streams lives on disk as Arrow IPC shards, written once and read by every rank.

An entry of RAYBIG_CACHE/shards/<key>/ holds `train/` and `val/` shards (each a file of rows `x` and targets
`y`, small enough that a few fit a rank's memory budget), `index.json` (every shard's rows, the row shape
and dtypes, in order) and `meta.json` (the DataMeta). The key is the source files' contents and the data
settings (raybig.data.token_cache.cache_key), so later runs and sweep trials read the same shards back.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

SPLITS = ("train", "val")
INDEX = "index.json"


@dataclass
class ShardedSplit:
    """One split on disk: its shards, in order, with their row counts."""
    directory: Path
    shards: list[tuple[str, int]]  # (file name, rows)
    shape: list[int]  # one row's x shape
    x_dtype: str
    y_dtype: str
    y_shape: list[int]

    def __len__(self) -> int:
        return sum(rows for _, rows in self.shards)

    @property
    def row_bytes(self) -> int:
        return (int(np.prod(self.shape)) * np.dtype(self.x_dtype).itemsize
                + int(np.prod(self.y_shape)) * np.dtype(self.y_dtype).itemsize)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard `i`'s rows, memory-mapped: only the pages a caller touches are read."""
        name, rows = self.shards[i]
        with pa.memory_map(str(self.directory / name)) as source:
            table = pa.ipc.open_file(source).read_all()
        return _unflatten(table, "x", rows, self.shape), _unflatten(table, "y", rows, self.y_shape)


def _unflatten(table: pa.Table, column: str, rows: int, shape: list[int]) -> np.ndarray:
    values = table.column(column).combine_chunks()
    if shape:
        values = values.values
    return values.to_numpy(zero_copy_only=False).reshape(rows, *shape)


def write_shard(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """One Arrow IPC file of rows x (fixed-size lists, a row's shape flattened) and y."""
    def column(a: np.ndarray) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(a).reshape(-1))
        width = int(np.prod(a.shape[1:])) if a.ndim > 1 else 0
        return pa.FixedSizeListArray.from_arrays(flat, width) if width else flat

    table = pa.table({"x": column(x), "y": column(y)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def shard_rows(row_bytes: int, memory_bytes: int) -> int:
    """Rows per shard: an eighth of the memory budget, so the shuffle window (half of it) mixes four shards."""
    return max(1, memory_bytes // 8 // max(1, row_bytes))


def write_split(directory: Path, x: np.ndarray, y: np.ndarray, memory_bytes: int, prefix: str = "") -> list[list]:
    """`x`, `y` as shards `directory/<prefix>NNNNN.arrow`; their index entries ([name, rows], ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    per = shard_rows(x[:1].nbytes + y[:1].nbytes, memory_bytes)
    out = []
    for k, start in enumerate(range(0, len(y), per)):
        name = f"{prefix}{k:05d}.arrow"
        write_shard(directory / name, x[start: start + per], y[start: start + per])
        out.append([name, len(y[start: start + per])])
    return out


def index_entry(x: np.ndarray, y: np.ndarray) -> dict:
    return {"shape": list(x.shape[1:]), "x_dtype": str(x.dtype), "y_shape": list(y.shape[1:]),
            "y_dtype": str(y.dtype)}


def open_entry(entry: Path) -> tuple[ShardedSplit, ShardedSplit] | None:
    """The train and validation splits of a finished entry, or None."""
    index_file = entry / INDEX
    if not index_file.is_file():
        return None
    index = json.loads(index_file.read_text())
    return tuple(ShardedSplit(entry / split, [tuple(s) for s in index[split]], index["shape"], index["x_dtype"],
                              index["y_dtype"], index["y_shape"]) for split in SPLITS)


def open_split(directory: str | Path) -> ShardedSplit:
    """A split by its directory (what the ranks are handed)."""
    directory = Path(directory)
    splits = open_entry(directory.parent)
    if splits is None:  # written by the driver on another node, into a cache this node does not share
        import socket

        raise FileNotFoundError(f"the streamed data's shards {directory.parent} are not on {socket.gethostname()}: "
                                "on more than one node RAYBIG_CACHE must be storage every node sees, at the same path")
    return splits[SPLITS.index(directory.name)]


def new_entry(root: Path, key: str) -> Path:
    tmp = root / f".{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
    return tmp


def finish_entry(tmp: Path, key: str, index: dict, meta: dict) -> Path:
    """The temporary entry renamed into place: a reader never sees half an entry."""
    (tmp / "meta.json").write_text(json.dumps(meta))
    (tmp / INDEX).write_text(json.dumps(index))
    final = tmp.parent / key
    try:
        os.rename(tmp, final)
    except OSError:  # another run wrote the same shards first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def shards_root() -> Path:
    from raybig.data.datasets import cache_dir

    return cache_dir() / "shards"


def sharded_bundle(bundle, key: str, memory_bytes: int):
    """An in-memory bundle (a table's or images' rows) as shards in the cache, for the ranks to stream."""
    from raybig.data.datasets import DataBundle
    from raybig.data.token_cache import meta_record

    entry = shards_root() / key
    splits = open_entry(entry)
    if splits is None:
        tmp = new_entry(shards_root(), key)
        index = {split: write_split(tmp / split, part.x, part.y, memory_bytes)
                 for split, part in zip(SPLITS, (bundle.train, bundle.val))}
        entry = finish_entry(tmp, key, {**index, **index_entry(bundle.train.x, bundle.train.y)},
                             meta_record(bundle.meta))
        splits = open_entry(entry)
    return DataBundle(bundle.meta, *splits)
