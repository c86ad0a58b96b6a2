"""Model stores beyond one disk: a run can live under a path (one node, or a shared file system) or under an
object-store URI (s3://, gs://) read and written through pyarrow filesystems, so that every node of a
cluster sees the same runs.

A run in an object store is worked on in a local copy: each process (the driver, each rank)
downloads what it needs (spec, metrics, the newest complete checkpoint) into a temporary directory, and every
write of the model store is uploaded right after it happens. A checkpoint's meta.json goes up last, so a
checkpoint without one is an interrupted upload and is never resumed from.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import weakref
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from raybig.errors import SpecError
from raybig.train.checkpoint import CHECKPOINT_PREFIX, OPTIMIZER_SHARDS, SHARDS, RunStore

URI_SCHEMES = ("s3", "gs", "gcs", "file")


def is_uri(store: str) -> bool:
    return urlsplit(str(store)).scheme in URI_SCHEMES


def join(store: str, name: str) -> str:
    """<store>/<name>, keeping a URI's query (e.g. ?endpoint_override=... for an S3-compatible server)."""
    if not is_uri(store):
        return str(Path(store) / name)
    parts = urlsplit(store)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); credentials come from the usual environment (AWS_*, GOOGLE_*)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError, ValueError) as err:  # an unknown scheme, a bad option, no credentials
        raise SpecError(f"cannot open the store {uri}: {str(err).splitlines()[0]}", "store") from None


def open_run_store(location: str | Path) -> RunStore:
    """The run store at a path (RunStore) or at an object-store URI (SyncedRunStore)."""
    return SyncedRunStore(str(location)) if is_uri(str(location)) else RunStore(location)


# ----------------------------------------------------------------------------- copying between filesystems
_LOCAL = pafs.LocalFileSystem()


def _files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File]


def _upload_file(local: Path, fs: pafs.FileSystem, remote: str) -> None:
    with local.open("rb") as src, fs.open_output_stream(remote) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _download_file(fs: pafs.FileSystem, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.download")
    with fs.open_input_stream(remote) as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(local)


def _download_dir(fs: pafs.FileSystem, remote: str, local: Path) -> int:
    count = 0
    for info in _files(fs, remote):
        _download_file(fs, info.path, local / info.path[len(remote):].lstrip("/"))
        count += 1
    return count


def _delete_dir(fs: pafs.FileSystem, remote: str) -> None:
    if fs.get_file_info(remote).type != pafs.FileType.NotFound:
        fs.delete_dir(remote)


# ----------------------------------------------------------------------------- a run in an object store
class SyncedRunStore(RunStore):
    """A RunStore whose home is an object-store URI: written in a local copy, uploaded write by write."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.remote = open_filesystem(uri)
        self.remote = self.remote.rstrip("/")
        staging = Path(tempfile.mkdtemp(prefix="raybig-store-"))
        weakref.finalize(self, shutil.rmtree, staging, True)  # the local copy goes with this object
        super().__init__(staging / Path(self.remote).name)
        self.root.mkdir()
        self._fetch()

    @property
    def location(self) -> str:
        return self.uri

    def _remote(self, local: Path) -> str:
        return f"{self.remote}/{local.relative_to(self.root).as_posix()}" if local != self.root else self.remote

    def _upload(self, *paths: Path) -> None:
        for path in paths:
            if path.is_dir():  # meta.json last: a checkpoint is complete once it is there
                files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.name == "meta.json")
                for f in files:
                    _upload_file(f, self.fs, self._remote(f))
            elif path.is_file():
                _upload_file(path, self.fs, self._remote(path))

    def _remote_checkpoints(self) -> list[str]:
        """Names of the complete checkpoints in the object store, oldest first."""
        base = f"{self.remote}/checkpoints/"
        names = {i.path[len(base):].split("/")[0] for i in _files(self.fs, base.rstrip("/"))
                 if i.path.endswith("/meta.json")}
        return sorted(n for n in names if n.startswith(CHECKPOINT_PREFIX))

    def _fetch(self) -> None:
        """What resuming needs: the spec, the metrics and the newest complete checkpoint."""
        for name in ("spec.yaml", "metrics.json", "model.json"):
            if self.fs.get_file_info(f"{self.remote}/{name}").type == pafs.FileType.File:
                _download_file(self.fs, f"{self.remote}/{name}", self.root / name)
        for name in reversed(self._remote_checkpoints()):  # the newest whose files match its manifest
            _download_dir(self.fs, f"{self.remote}/checkpoints/{name}", self.checkpoints / name)
            if self._problem(self.checkpoints / name) is None:
                break

    # -- every write of RunStore, then its upload
    def clear(self, path: Path) -> None:
        super().clear(path)
        _delete_dir(self.fs, self._remote(path))

    def write_part(self, pending: Path, part: int, model_state: dict, trainer_state: dict) -> None:
        pending.mkdir(parents=True, exist_ok=True)  # rank 0 cleared its own copy, not this process's
        super().write_part(pending, part, model_state, trainer_state)
        self._upload(pending / f"part-{part}.safetensors", pending / f"part-{part}-trainer.pt")

    def write_shards(self, pending: Path, model_state: dict, optimizer_state: dict) -> None:
        super().write_shards(pending, model_state, optimizer_state)
        # this process's local copy holds the shards it wrote, and only those
        self._upload(pending / SHARDS, pending / OPTIMIZER_SHARDS)

    def finish_checkpoint(self, pending: Path, meta: dict, info: dict, keep: int | None,
                          publish: dict | None = None) -> Path:
        _download_dir(self.fs, self._remote(pending), pending)  # the parts pipeline ranks on other nodes wrote
        final = super().finish_checkpoint(pending, meta, info, keep, publish)
        self._upload(final)
        _delete_dir(self.fs, self._remote(pending))
        if keep is not None:
            for old in self._remote_checkpoints()[:-keep]:
                _delete_dir(self.fs, f"{self.remote}/checkpoints/{old}")
        return final

    def publish_model(self, model_state: dict | Path, info: dict) -> None:
        super().publish_model(model_state, info)
        self._upload(self.root / "model.safetensors", self.root / "model.json")

    def write_history(self, history: list[dict]) -> None:
        super().write_history(history)
        self._upload(self.root / "metrics.json")

    def write_spec(self, spec_yaml: str) -> None:
        super().write_spec(spec_yaml)
        self._upload(self.root / "spec.yaml")

    def history(self) -> list[dict]:
        remote = f"{self.remote}/metrics.json"  # the workers (other processes, maybe other nodes) wrote it
        if self.fs.get_file_info(remote).type == pafs.FileType.File:
            _download_file(self.fs, remote, self.root / "metrics.json")
        return super().history()

    def saved(self, *names: str) -> None:
        for name in names:
            if (self.root / name).is_dir():  # rewritten whole (tensorboard/): no stale files left behind
                _delete_dir(self.fs, f"{self.remote}/{name}")
            self._upload(self.root / name)

    def discard(self) -> None:
        super().discard()
        self.root.mkdir(parents=True)
        _delete_dir(self.fs, self.remote)


# ----------------------------------------------------------------------------- serving a run from a store
MODEL_FILES = ("model.json", "model.safetensors", "spec.yaml", "tokenizer.json")


def local_model(run: str | Path, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """A run's published model (weights, model.json, spec.yaml; or just `files` of them) as a directory on this
    machine: a path run as it is, an s3:// / gs:// run copied into a temporary directory that lives as long as
    this process. Each Serve replica calls this for itself, so a replica on any node finds its weights."""
    if not is_uri(str(run)):
        return Path(run)
    fs, remote = open_filesystem(str(run))
    remote = remote.rstrip("/")
    if fs.get_file_info(f"{remote}/model.json").type != pafs.FileType.File:
        raise SpecError(f"{run} holds no trained model (no model.json)", "RUN")
    staging = Path(tempfile.mkdtemp(prefix="raybig-model-"))
    atexit.register(shutil.rmtree, staging, True)
    local = staging / Path(remote).name
    local.mkdir()
    for name in files:
        if fs.get_file_info(f"{remote}/{name}").type == pafs.FileType.File:
            _download_file(fs, f"{remote}/{name}", local / name)
    return local


# ----------------------------------------------------------------------------- raybig pull
def pull_run(store: str, name: str, dest_root: str) -> Path:
    """Copy <store>/<name>/ (weights, spec, metrics, checkpoints) to <dest_root>/<name>/."""
    source = join(store, name)
    fs, src = open_filesystem(source if is_uri(source) else f"file://{Path(source).resolve()}")
    try:
        kind = fs.get_file_info(src).type
    except OSError as err:  # e.g. the bucket does not exist or the credentials are refused
        raise SpecError(f"cannot read the store {store}: {str(err).splitlines()[0]}", "store") from None
    if kind != pafs.FileType.Directory:
        raise SpecError(f"no run named {name!r} in {store}", "NAME")
    dest = Path(dest_root) / name
    dest.mkdir(parents=True, exist_ok=True)
    if _download_dir(fs, src.rstrip("/"), dest) == 0:
        raise SpecError(f"the run {name!r} in {store} holds no files", "NAME")
    return dest
