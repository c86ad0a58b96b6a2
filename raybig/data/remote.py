"""Data in an object store: a `data.path` (or `val_path`) of s3:// or gs:// — an object, a prefix, or a glob
such as s3://bucket/corpus/*.jsonl — is mirrored into RAYBIG_CACHE/remote/ and read from there as a local
path. An object is downloaded again only when its size or modification time changed, and objects gone
from the store leave the mirror; what the data becomes is still keyed by the files' contents
(raybig.data.token_cache), so an edited object gives new windows.

Credentials come from the environment, as for model stores (AWS_*, GOOGLE_*); a URI may carry pyarrow's
options (?endpoint_override=host:port&scheme=http for an S3-compatible server).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from raybig.errors import SpecError

GLOB = "*?["
REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(path: str | None) -> bool:
    return path is not None and urlsplit(str(path)).scheme in REMOTE_SCHEMES


def local_paths(spec):
    """The data section with each object-store path replaced by its local mirror, brought up to date."""
    updates = {field: mirror(getattr(spec, field), f"data.{field}")
               for field in ("path", "val_path") if is_remote(getattr(spec, field, None))}
    return spec.model_copy(update=updates) if updates else spec


def mirror(uri: str, field: str) -> str:
    """The local path standing for `uri`: a file, a directory, or a glob over the mirror."""
    import pyarrow.fs as pafs

    from raybig.data.datasets import cache_dir
    from raybig.store_io import _download_file, _files, open_filesystem

    parts = urlsplit(uri)
    segments = parts.path.split("/")
    glob_at = next((i for i, s in enumerate(segments) if any(c in s for c in GLOB)), len(segments))
    base, pattern = "/".join(segments[:glob_at]), "/".join(segments[glob_at:])
    try:
        fs, root = open_filesystem(urlunsplit(parts._replace(path=base)))
        info = fs.get_file_info(root)
    except (OSError, SpecError) as err:
        raise SpecError(f"cannot read {uri}: {str(err).splitlines()[0]}", field) from None
    if info.type == pafs.FileType.NotFound:
        raise SpecError(f"no such object or prefix: {uri}", field)
    single = info.type == pafs.FileType.File and not pattern
    listing = {("" if single else i.path[len(root):].lstrip("/")): i for i in ([info] if single else _files(fs, root))}
    wanted = {rel: i for rel, i in listing.items() if not pattern or fnmatch.fnmatch(rel, pattern)}
    if not wanted:
        raise SpecError(f"{uri} matches no objects", field)
    local = cache_dir() / "remote" / hashlib.sha256(urlunsplit(parts._replace(path=base)).encode()).hexdigest()[:16]
    target = local / (Path(root).name if single else "tree")
    manifest_file = local / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    for rel, i in wanted.items():
        path = target / rel if rel else target
        stamp = [i.size, i.mtime_ns]
        if manifest.get(rel) != stamp or not path.is_file():
            _download_file(fs, i.path, path)
            manifest[rel] = stamp
    for rel in set(manifest) - set(listing):  # gone from the store: gone from the mirror
        (target / rel).unlink(missing_ok=True)
        del manifest[rel]
    local.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(manifest))
    return str(target / pattern) if pattern else str(target)
