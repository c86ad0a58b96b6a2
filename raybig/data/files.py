"""Finding a source's files and reading their text, with errors that name the file and the spec field."""
from __future__ import annotations

import glob
from pathlib import Path

from raybig.errors import SpecError


class BadRow(ValueError):
    """One row (a line, a record, an image) that cannot be read; `field` is the spec field it is about."""

    def __init__(self, message: str, field: str = "data.path"):
        super().__init__(message)
        self.field = field


def source_files(path: str, field: str = "data.path", suffixes: tuple[str, ...] = ()) -> list[Path]:
    """A file, the files under a directory (those ending in `suffixes` when given; hidden ones never), or a
    glob's matches, sorted so every run reads them in the same order."""
    if any(c in path for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not found:
            raise SpecError(f"{path} matches no files", field)
        return found
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SpecError(f"no such file or directory: {path}", field)
    found = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root))
                   and (not suffixes or p.suffix.lower() in suffixes))
    if not found:
        wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
        raise SpecError(f"{path} holds no files{wanted}", field)
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_text(file: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> str:
    """The file (or its bytes start..end, whole lines from line `first_line`) as UTF-8 text; BadRow naming the
    first line that is not."""
    with open(file, "rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data[: err.start].count(b"\n")
        raise BadRow(f"{file}: line {line}: not UTF-8 text (byte {start + err.start})") from None


class RowErrors:
    """What `data.on_error` asks for a bad row: fail at once, naming it, or count it and go on."""

    def __init__(self, on_error: str):
        self.skip, self.skipped = on_error == "skip", 0

    def bad(self, err: BadRow) -> None:
        if not self.skip:
            raise SpecError(str(err), err.field)
        self.skipped += 1
