"""The model store: runs/<name>/ holds the spec, metrics, plots, epoch checkpoints and the current model.

    runs/<name>/
      spec.yaml                 the resolved spec that produced everything here
      model.safetensors         the newest weights (what serving and fine-tuning load)
      model.json                the model's kind, data shape/classes/vocab, epoch and metrics
      metrics.json              one record per finished epoch
      checkpoints/epoch-0003/   model.safetensors (merged) and its model.json, part-K.safetensors and
                                part-K-trainer.pt per pipeline rank K, meta.json, manifest.json; a sharded
                                layout's (fsdp, tensor): model.safetensors consolidated from every rank's
                                shards, optimizer/ (each rank's shard of the optimizer state), part-K-trainer.pt
      checkpoints/epoch-0003+0000120/   the same, 120 batches into the 4th epoch (checkpoint.every_steps)

Writes go to a temporary name first and are renamed into place, so a crash mid-write never
damages the last good checkpoint. What happens to the files afterwards (a full disk, a bad copy, a
sync cut short) is caught by the manifest: every file's size and SHA-256, checked before a checkpoint is
resumed from; a damaged one is passed over for the newest one that checks out. Loading never unpickles
arbitrary objects: weights are safetensors, the optimizer state is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "epoch-"
MANIFEST = "manifest.json"
SHARDS = "shards"  # where a sharded layout's ranks write their shards of the weights, in a pending checkpoint
OPTIMIZER_SHARDS = "optimizer"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """Every file of a checkpoint (its optimizer/ shards too) with its size and checksum, so damage done
    after it was written shows."""
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))


def checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (the first file found wrong, named),
    or None. A checkpoint written before manifests existed is taken as it is."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"its {MANIFEST} is not readable JSON"
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes where its manifest says {expected['bytes']} (cut short or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its manifest's checksum (corrupted)"
    return None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: on the CPU, contiguous, and each with its own storage (tied weights,
    such as an embedding shared with the output head, appear under both names)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _consolidate(shards: Path, target: Path) -> None:
    """Every rank's shards of every stage into one file of whole tensors, written piece by piece (torch's
    consolidation), never the whole model in memory."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.hf_storage import consolidate_safetensors_files

    names = set()
    for shard in shards.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    out = shards / "consolidated"
    out.mkdir()
    consolidate_safetensors_files(str(shards), str(out), fqn_to_index_mapping=dict.fromkeys(names, 1))
    (written,) = out.glob("*.safetensors")
    os.replace(written, target)


def _copy_with_metadata(source: Path, target: Path, metadata: dict[str, str]) -> None:
    """A safetensors file copied with `metadata` in its header, streamed: its tensors are never loaded."""
    with source.open("rb") as src:
        header = json.loads(src.read(struct.unpack("<Q", src.read(8))[0]))
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data that follows stays 8-byte aligned
        with target.open("wb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(src, dst, 16 * 2**20)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        # checked checkpoints, by the files' (name, size, mtime): the driver and each rank ask more than once
        self._checked: dict[tuple, str | None] = {}

    # -- checkpoints
    def checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir()
                      if p.name.startswith(CHECKPOINT_PREFIX) and (p / "meta.json").is_file())

    @staticmethod
    def checkpoint_name(epoch: int, batch: int = 0) -> str:
        """After `epoch` whole epochs and `batch` batches of the next: names sort in training order."""
        return f"{CHECKPOINT_PREFIX}{epoch:04d}" + (f"+{batch:07d}" if batch else "")

    def checkpoint_dir(self, epoch: int, batch: int = 0) -> Path:
        return self.checkpoints / self.checkpoint_name(epoch, batch)

    @staticmethod
    def epoch_of(checkpoint: Path) -> int:
        """The whole epochs trained at `checkpoint`."""
        return int(checkpoint.name[len(CHECKPOINT_PREFIX):].split("+")[0])

    def latest(self) -> Path | None:
        """The newest checkpoint whose files match its manifest; those newer than it are in `damaged()`."""
        good = [d for d in self.checkpoint_dirs() if self._problem(d) is None]
        return good[-1] if good else None

    def damaged(self) -> list[str]:
        """One line for each checkpoint newer than the one resumed from that cannot be used, and why."""
        latest = self.latest()
        return [f"{d.relative_to(self.root)} cannot be used: {self._problem(d)}" for d in self.checkpoint_dirs()
                if (latest is None or d.name > latest.name) and self._problem(d) is not None]

    def _problem(self, directory: Path) -> str | None:
        try:
            stamp = (directory, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                      for p in sorted(directory.iterdir())))
        except FileNotFoundError:  # pruned while it was looked at
            return "it was deleted while it was checked"
        if stamp not in self._checked:
            self._checked[stamp] = checkpoint_problem(directory)
        return self._checked[stamp]

    def pending_checkpoint(self, epoch: int, batch: int = 0) -> Path:
        """Where the parts of a checkpoint are written before it is renamed into place.
        The name is fixed so that every rank finds it without talking to the others."""
        return self.checkpoints / f".pending-{self.checkpoint_name(epoch, batch)}"

    @staticmethod
    def clear(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)  # leftovers of a crash mid-write
        path.mkdir(parents=True)

    @staticmethod
    def write_shards(pending: Path, model_state: dict, optimizer_state: dict) -> None:
        """Every rank's shards of a sharded model's weights and optimizer state (DTensors), with
        torch.distributed.checkpoint (a collective: every rank calls it); nothing is gathered. The weights'
        shards are safetensors files (torch's Hugging Face writer), which finish_checkpoint consolidates."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save(model_state, storage_writer=HuggingFaceStorageWriter(str(pending / SHARDS), save_distributed=True))
        dcp.save({"optimizer": optimizer_state}, checkpoint_id=str(pending / OPTIMIZER_SHARDS))

    @staticmethod
    def write_part(pending: Path, part: int, model_state: dict | None, trainer_state: dict) -> None:
        """One pipeline rank's weights (under the full model's names; None: written as shards) and its
        optimizer state (None: not kept)."""
        if model_state is not None:
            save_file(_contiguous(model_state), str(pending / f"part-{part}.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, pending / f"part-{part}-trainer.pt")

    def finish_checkpoint(self, pending: Path, meta: dict, info: dict, keep: int | None,
                          publish: dict | None = None) -> Path:
        """Merge the parts into one full model (a sharded layout's ranks wrote it consolidated), rename the
        checkpoint into place, publish the model (or `publish`, when what is served is not what is
        checkpointed: a LoRA run's merged weights), and keep the newest `keep` checkpoints (all of them when
        None: a sweep trial prunes once Tune has a copy)."""
        if (pending / SHARDS).is_dir():
            _consolidate(pending / SHARDS, pending / "model.safetensors")
            shutil.rmtree(pending / SHARDS)  # the per-rank shards it was made of
        else:
            model_state = {}
            for part in sorted(pending.glob("part-*.safetensors")):
                model_state.update(load_file(str(part)))
            save_file(model_state, str(pending / "model.safetensors"))
        (pending / "model.json").write_text(json.dumps(info, indent=1))  # a checkpoint can be published alone
        (pending / "meta.json").write_text(json.dumps(meta, indent=1))
        write_manifest(pending)
        final = self.checkpoint_dir(meta["epoch"], meta.get("batch", 0))
        if final.exists():  # the same point again after a restart: replace it
            shutil.rmtree(final)
        os.rename(pending, final)
        if keep is not None:
            self.prune(keep)
        self.publish_model(final / "model.safetensors" if publish is None else publish, info)
        return final

    def prune(self, keep: int, through_epoch: int | None = None) -> None:
        """Delete all but the newest `keep` of the checkpoints up to `through_epoch` (of all when None)."""
        dirs = [d for d in self.checkpoint_dirs() if through_epoch is None or self.epoch_of(d) <= through_epoch]
        for old in dirs[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def adopt(self, checkpoint: Path, name: str) -> dict:
        """Make a copy of `checkpoint` (another run's epoch checkpoint) this run's checkpoint, history and
        published model, under this run's `name`; returns the checkpoint's meta. A sweep trial continues
        from one this way, and a sweep's best trial becomes a run of its own."""
        meta = json.loads((checkpoint / "meta.json").read_text())
        target = self.checkpoint_dir(meta["epoch"], meta.get("batch", 0))
        shutil.copytree(checkpoint, target)
        self.write_history(meta["history"])
        info = json.loads((target / "model.json").read_text())
        self.publish_model(target / "model.safetensors", {**info, "name": name})
        return meta

    @staticmethod
    def load_checkpoint(path: Path, part: int = 0) -> tuple[dict, dict | None, dict]:
        """The full model's weights, this pipeline rank's trainer state (None if absent), and the metadata."""
        model_state = load_file(str(path / "model.safetensors"))
        trainer_file = path / f"part-{part}-trainer.pt"
        trainer_state = torch.load(trainer_file, weights_only=True) if trainer_file.exists() else None
        meta = json.loads((path / "meta.json").read_text())
        return model_state, trainer_state, meta

    # -- the published model and run records
    def publish_model(self, model_state: dict | Path, info: dict) -> None:
        """The run's current model: weights, or a safetensors file of them (copied, not loaded)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".model.{uuid.uuid4().hex[:8]}.tmp"
        # "format": what transformers reads to tell a PyTorch checkpoint, so hf/ can take this file as it is
        if isinstance(model_state, Path):
            _copy_with_metadata(model_state, tmp, {"format": "pt"})
        else:
            save_file(_contiguous(model_state), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.root / "model.safetensors")
        _atomic_write_text(self.root / "model.json", json.dumps(info, indent=1))

    def write_history(self, history: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / "metrics.json", json.dumps(history, indent=1))

    def history(self) -> list[dict]:
        path = self.root / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else []

    def write_spec(self, spec_yaml: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / "spec.yaml", spec_yaml)

    def model_info(self) -> dict | None:
        path = self.root / "model.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load_model_state(self) -> dict:
        return load_file(str(self.root / "model.safetensors"))

    # -- hooks for stores that live elsewhere (raybig.store_io.SyncedRunStore: s3://, gs://)
    @property
    def location(self) -> str:
        """Where the run lives, as the user names it: this path, or an object-store URI."""
        return str(self.root.resolve())

    def saved(self, *names: str) -> None:
        """Files written straight into root by the caller (curves.png): here they already are in the store."""

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def load_trained_model(run_dir: str | Path, trust_code: bool = False):
    """The published model of a run, ready for inference: (model in eval mode, model.json info).

    Everything needed to rebuild it is in model.json (model section and data shape/classes/vocab),
    so serving and fine-tuning never need the training data or code paths. A python model is rebuilt by
    importing its factory, which runs the user's code: only with `trust_code`.
    """
    from pydantic import TypeAdapter

    from raybig.data.datasets import DataMeta
    from raybig.models import build_model
    from raybig.spec import ModelSpec

    store = RunStore(run_dir)
    info = store.model_info()
    if info is None:
        raise FileNotFoundError(f"{store.root} holds no trained model (no model.json)")
    model_spec = TypeAdapter(ModelSpec).validate_python(info["model"])
    if model_spec.kind == "python" and not trust_code:
        from raybig.models.user import UntrustedCode

        raise UntrustedCode(f"{store.root} holds a python model ({model_spec.factory}): loading it runs that "
                            "code; pass trust_code=True (raybig serve --trust-code) if you trust it")
    if model_spec.kind == "hf":  # from the config recorded with the run: a pretrained directory may be elsewhere
        from raybig.models.hf import model_from_config

        model = model_from_config(info["hf_config"], model_spec.task)
    else:
        model = build_model(model_spec, DataMeta(**info["data"]))
    compression = info.get("compression")
    if compression:  # a compressed run (raybig compress): shaped, loaded and finished as it was made
        from raybig.lifecycle.compress import decoded, finish, prepare

        prepare(model, compression).load_state_dict(decoded(store.load_model_state(), compression))
        return finish(model, compression).eval(), info
    model.load_state_dict(store.load_model_state())
    return model.eval(), info
