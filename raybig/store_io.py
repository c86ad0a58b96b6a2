"""Moving a run between model stores: a path on one node, or s3:// / gs:// through pyarrow filesystems."""
from pathlib import Path

import pyarrow.fs as pafs

from raybig.errors import SpecError


def pull_run(store: str, name: str, dest_root: str) -> Path:
    """Copy <store>/<name>/ (weights, spec, metrics, checkpoints) to <dest_root>/<name>/."""
    try:
        fs, base = pafs.FileSystem.from_uri(store if "://" in store else f"file://{Path(store).resolve()}")
    except (pafs.ArrowInvalid, OSError, ValueError) as err:  # e.g. no credentials, unknown scheme
        raise SpecError(f"cannot open the store {store}: {err}", "--store") from None
    src = f"{base.rstrip('/')}/{name}"
    info = fs.get_file_info(src)
    if info.type != pafs.FileType.Directory:
        raise SpecError(f"no run named {name!r} in {store}", "NAME")
    dest = Path(dest_root) / name
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src, str(dest.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
