"""Tokenized text, kept: a language model's packed windows are written once to RAYBIG_CACHE/tokens/, under a
key of the source files' contents (not their names), the data section and the tokenizer's files, and read
back by every later run and sweep trial, which then neither parse nor tokenize anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from raybig.data.files import source_files
from raybig.data.tokenizer import TOKENIZER_FILE, tokenizer_directory

ARRAYS = ("train_x", "train_y", "val_x", "val_y")
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja", "raybig_vocab.json")


def cache_key(spec, model) -> str:
    """What the windows depend on: every byte of the source files and of the tokenizer's, and the settings.
    A BPE trained from the text depends on the text alone, so it needs no files of its own."""
    digest = hashlib.sha256(json.dumps(_settings(spec, model), sort_keys=True).encode())
    for path in sorted(set(_source_paths(spec)) | set(_tokenizer_paths(spec, model))):
        digest.update(str(path.name).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def _settings(spec, model) -> dict:
    # where the data lives and how it is handed to the ranks do not change the windows
    data = spec.model_dump(mode="json", exclude={"path", "val_path", "loader"})
    return {"data": data, "pretrained": bool(getattr(model, "pretrained", None)), "format": 1}


def _source_paths(spec) -> list[Path]:
    if spec.source == "text" and spec.path is None:
        from raybig.data.datasets import _stdlib_file

        return [p for p in map(_stdlib_file, spec.modules) if p.is_file()]
    if getattr(spec, "path", None) is None:  # built in: the settings (and the installed packages) say it all
        return []
    paths = [(spec.path, "data.path")] + ([(spec.val_path, "data.val_path")] if getattr(spec, "val_path", None) else [])
    found = []
    for path, field in paths:
        if Path(path).is_dir() and spec.source in ("parquet", "hf_disk"):  # read whole, dot files included
            found += sorted(p for p in Path(path).rglob("*") if p.is_file())
        else:
            found += source_files(path, field)
    return found


def _tokenizer_paths(spec, model) -> list[Path]:
    if not spec.is_text:
        return []
    directory = tokenizer_directory(spec, model)
    pretrained = getattr(model, "pretrained", None)
    where = [d for d in (directory, Path(pretrained) if pretrained else None) if d is not None]
    return [d / name for d in where for name in TOKENIZER_FILES if (d / name).is_file()]


def load(key: str):
    """The bundle cached under `key`, or None."""
    from raybig.data.datasets import DataBundle, Split, cache_dir

    entry = cache_dir() / "tokens" / key
    if not (entry / "meta.json").is_file():
        return None
    meta = meta_of(json.loads((entry / "meta.json").read_text()))
    arrays = {name: np.load(entry / f"{name}.npy") for name in ARRAYS}
    return DataBundle(meta, Split(arrays["train_x"], arrays["train_y"]), Split(arrays["val_x"], arrays["val_y"]))


def store(key: str, bundle) -> None:
    """Written to a temporary directory renamed into place: a reader never sees half an entry."""
    from raybig.data.datasets import cache_dir

    root = cache_dir() / "tokens"
    tmp = root / f".{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in zip(ARRAYS, (bundle.train.x, bundle.train.y, bundle.val.x, bundle.val.y)):
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
    (tmp / "meta.json").write_text(json.dumps(meta_record(bundle.meta)))
    try:
        os.rename(tmp, root / key)
    except OSError:  # another run cached the same windows first
        shutil.rmtree(tmp, ignore_errors=True)


def meta_record(meta) -> dict:
    """What a cache entry's meta.json holds: the DataMeta, and the tokenizer the driver hands the run."""
    return {"meta": meta.to_dict(), "tokenizer_json": meta.extra.get("tokenizer_json")}


def meta_of(record: dict):
    from raybig.data.datasets import DataMeta

    meta = DataMeta(**record["meta"])
    if record.get("tokenizer_json"):
        meta.extra["tokenizer_json"] = record["tokenizer_json"]
    return meta
