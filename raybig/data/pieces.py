"""A source's files as pieces of a few MB, each read on its own by a Ray Data task, so no process ever holds
the whole data (raybig.data.streaming for text, raybig.data.stream_rows for tables and images).

Text and JSONL: whole small files grouped, a large line-document file cut at line ends. CSV: line-aligned
byte ranges, each read with its file's header. Parquet: row groups. A `datasets` directory: row ranges of
its memory-mapped Arrow table. An image folder: runs of image files with their class. A piece is plain
lists (JSON, so a task is handed it as text) and a "split": train or val where a val_path sets the
validation data apart, None where each piece draws its own share.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from raybig.data.documents import document_suffixes
from raybig.data.files import BadRow, RowErrors, source_files
from raybig.errors import SpecError

# a piece: large enough that a task's start costs little, small enough that a task holds little
PIECE_BYTES_MIN, PIECE_BYTES_MAX = 256 * 2**10, 16 * 2**20
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
VAL_SPLITS = ("validation", "valid", "val", "test")  # a DatasetDict's split that is validation data


def piece_bytes(spec) -> int:
    return int(np.clip(spec.memory_mb * 2**20 // 16, PIECE_BYTES_MIN, PIECE_BYTES_MAX))


def plan_pieces(spec) -> list[dict]:
    """The source as pieces, in file (row) order."""
    planners = {"text": _text_pieces, "jsonl": _text_pieces, "csv": _csv_pieces, "parquet": _row_group_pieces,
                "hf_disk": _hf_pieces, "image_folder": _image_pieces}
    return planners[spec.source](spec)


def source_bytes(spec) -> int:
    """What reading the source into memory would take, about: its files' bytes (an image folder: its images
    decoded, as float32)."""
    if spec.source == "image_folder":
        files = [f for _, f, _ in _images_of(spec)]
        return len(files) * 4 * int(np.prod(first_image_shape(spec)))
    if spec.source == "hf_disk":
        return sum(f.stat().st_size for f in Path(spec.path).rglob("*.arrow"))
    if spec.source in ("text", "jsonl"):
        return sum(f.stat().st_size for f in source_files(spec.path, suffixes=document_suffixes(spec)))
    return sum(f.stat().st_size for _, files, _ in _table_files(spec) for f in files)


def _sources(spec) -> list[tuple[str, str, str | None]]:
    """(path, its spec field, the split it is) for path and val_path."""
    val_path = getattr(spec, "val_path", None)
    return [(spec.path, "data.path", "train" if val_path else None)] + \
        ([(val_path, "data.val_path", "val")] if val_path else [])


# ----------------------------------------------------------------------------- text lines
def _text_pieces(spec) -> list[dict]:
    target, by_line = piece_bytes(spec), spec.source == "jsonl" or spec.document == "line"
    return [{"ranges": ranges, "split": None}
            for ranges in _grouped(source_files(spec.path, suffixes=document_suffixes(spec)), target, by_line)]


def _grouped(files: list[Path], target: int, by_line: bool, header: bool = False) -> list[list[list]]:
    """[file, start, end, first line] ranges, small files grouped to about `target` bytes, large ones cut at
    line ends (after their header line where `header`)."""
    pieces, small, small_bytes = [], [], 0
    for file in files:
        size = file.stat().st_size
        file = file.resolve()  # the tasks' working directory need not be this process's
        start, line = (header_end(file), 2) if header else (0, 1)
        if size - start > target and by_line:
            pieces += [[r] for r in _line_ranges(file, size, target, start, line)]
            continue
        small.append([str(file), start, size, line])
        small_bytes += size
        if small_bytes >= target:
            pieces.append(small)
            small, small_bytes = [], 0
    return pieces + ([small] if small else [])


def header_end(file: Path) -> int:
    with open(file, "rb") as f:
        return len(f.readline())


def _line_ranges(file: Path, size: int, target: int, start: int = 0, line: int = 1) -> list[list]:
    """Byte ranges of about `target` bytes from `start`, each ending after a newline, with the line each
    starts at."""
    ranges = []
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


# ----------------------------------------------------------------------------- tables
def _table_files(spec) -> list[tuple[str, list[Path], str | None]]:
    """(field, files, the split they are) of a parquet or csv source."""
    out = []
    for path, field, split in _sources(spec):
        if spec.source == "parquet":
            files = sorted(Path(path).rglob("*.parquet")) if Path(path).is_dir() else source_files(path, field)
            if not files:
                raise SpecError(f"{path} holds no .parquet files", field)
        else:
            files = source_files(path, field, suffixes=CSV_SUFFIXES)
        out.append((field, [f.resolve() for f in files], split))
    return out


def _csv_pieces(spec) -> list[dict]:
    return [{"csv": ranges, "split": split} for field, files, split in _table_files(spec)
            for ranges in _grouped(files, piece_bytes(spec), by_line=True, header=True)]


def _row_group_pieces(spec) -> list[dict]:
    """Row groups, grouped to about piece_bytes each; a file that is not Parquet is named."""
    import pyarrow.parquet as pq

    target, pieces = piece_bytes(spec), []
    for field, files, split in _table_files(spec):
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


def _hf_pieces(spec) -> list[dict]:
    """Row ranges of each split of a save_to_disk directory (its train, and its validation split if any)."""
    from raybig.data.tables import hf_splits

    pieces = []
    for name, dataset, split in hf_splits(spec):
        rows = len(dataset)
        per = max(1, int(piece_bytes(spec) * rows / max(1, dataset.data.nbytes)))
        pieces += [{"hf_rows": [str(Path(spec.path).resolve()), name, start, min(start + per, rows)], "split": split}
                   for start in range(0, rows, per)]
    return pieces


def piece_table(spec, piece: dict, errors: RowErrors) -> tuple[pa.Table, str]:
    """A table piece's rows, and how to name them in an error."""
    if "row_groups" in piece:
        import pyarrow.parquet as pq

        tables = [pq.ParquetFile(file).read_row_group(group) for file, group in piece["row_groups"]]
        (file, first), last = piece["row_groups"][0], piece["row_groups"][-1][1]
        return pa.concat_tables(tables, promote_options="permissive"), f"{file} (row groups {first}-{last})"
    if "hf_rows" in piece:
        import datasets

        path, name, start, stop = piece["hf_rows"]
        loaded = datasets.load_from_disk(path)
        dataset = loaded[name] if name else loaded
        return dataset.with_format("arrow")[start:stop], f"{path} ({name or 'rows'} {start + 1}-{stop})"
    return csv_table(spec, piece["csv"], errors), piece["csv"][0][0] + (" ..." if len(piece["csv"]) > 1 else "")


def csv_table(spec, ranges: list[list], errors: RowErrors, field: str = "data.path") -> pa.Table:
    """[file, start, end, first line] ranges of CSV files, as one table."""
    tables = [_csv_range(spec, *r, errors, field) for r in ranges]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as err:
        raise SpecError(f"the CSV files under {spec.path} have different columns: {err}", field) from None


def _csv_range(spec, file: str, start: int, end: int, first_line: int, errors: RowErrors,
              field: str = "data.path") -> pa.Table:
    """Lines start..end of a CSV file, read with the file's header; a bad row is named by its line."""
    from pyarrow import csv

    with open(file, "rb") as f:
        header = f.readline()
        f.seek(start)
        body = f.read(end - start)
    bad: list[BadRow] = []

    def invalid(row):
        at = body.find(row.text.encode())
        line = first_line + body[: at].count(b"\n") if at >= 0 else "?"
        bad.append(BadRow(f"{file}: line {line}: {row.actual_columns} values, expected {row.expected_columns}: "
                          f"{row.text[:80]!r}", field))
        return "skip"

    try:
        table = csv.read_csv(pa.BufferReader(header + body), read_options=csv.ReadOptions(use_threads=False),
                             parse_options=csv.ParseOptions(delimiter=spec.delimiter, invalid_row_handler=invalid))
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise SpecError(f"{file} (from line {first_line}) is not readable as CSV: {err}", field) from None
    for err in bad:
        errors.bad(err)
    return table


# ----------------------------------------------------------------------------- images
def _images_of(spec) -> list[tuple[int, Path, str | None]]:
    """(class index, image file, split) of path and val_path, class by class."""
    from raybig.data.images import image_files

    out, classes = [], None
    for path, field, split in _sources(spec):
        files, names = image_files(path, field, classes)
        classes = classes or names
        out += [(label, file, split) for label, file in files]
    return out


def first_image_shape(spec) -> tuple[int, int, int]:
    """(C, H, W) every image is decoded to: the first image's own unless data.size and data.channels say."""
    from raybig.data.images import decode_images

    first = [(label, file) for label, file, _ in _images_of(spec)[:16]]
    x, _ = decode_images(spec, first, "data.path", RowErrors(spec.on_error))
    if not len(x):
        raise SpecError(f"none of the first {len(first)} images under {spec.path} could be decoded", "data.path")
    return tuple(x.shape[1:])


def _image_pieces(spec) -> list[dict]:
    per = max(1, piece_bytes(spec) // (4 * int(np.prod(first_image_shape(spec)))))
    images = _images_of(spec)
    pieces = []
    for split in dict.fromkeys(s for _, _, s in images):
        mine = [[str(f.resolve()), label] for label, f, s in images if s == split]
        pieces += [{"images": mine[i: i + per], "split": split} for i in range(0, len(mine), per)]
    return pieces


# ----------------------------------------------------------------------------- the tasks
def map_pieces(fn, pieces: list, spec, **kwargs) -> list[dict]:
    """`fn(batch, spec_json, **kwargs)` over the pieces in Ray Data tasks, a piece each (on the Ray this
    process runs, else on one started for it); the rows they return."""
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


def data_spec(spec_json: str):
    from pydantic import TypeAdapter

    from raybig.spec import DataSpec

    return TypeAdapter(DataSpec).validate_json(spec_json)


def shard_index(results: list[dict], empty: str, field: str) -> dict:
    """The tasks' shards in piece order, per split; the first piece's error raised as the spec error it was;
    `empty` (naming the split) when a split got no rows."""
    failed = [r for r in results if r["error"]]
    if failed:
        first = min(failed, key=lambda r: r["index"])
        raise SpecError(first["error"], first["field"] or "data.path")
    ordered = sorted(results, key=lambda r: r["index"])
    index = {split: [entry for r in ordered for entry in json.loads(r[split])] for split in ("train", "val")}
    for split, name in (("train", "training"), ("val", "validation")):
        if not index[split]:
            raise SpecError(empty.format(split=name), field)
    return index


def task_rows(rows: list[dict]) -> dict:
    """A task's result rows as the columns Ray Data takes back."""
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
