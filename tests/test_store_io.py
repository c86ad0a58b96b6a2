"""A model store in an object store: training writes a run to s3:// (a real S3-compatible server on loopback),
a second process resumes from it, and `raybig pull` brings it back. No Ray: the one training loop in-process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raybig.errors import SpecError
from raybig.store_io import SyncedRunStore, is_uri, join, open_run_store, pull_run
from raybig.train.checkpoint import RunStore, load_trained_model
from s3server import S3_ENV, s3_bucket

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_store():
    with s3_bucket() as uri:
        yield uri


def train(location: str, epochs: int):
    """The training loop in this process, into the store at `location`; returns (history, store)."""
    from raybig.data.datasets import load
    from raybig.data.loader import MemorySource
    from raybig.spec import parse_spec
    from raybig.train.loop import WorkerEnv, fit

    spec = parse_spec({"name": "s3run", "model": {"kind": "mlp", "hidden": [32]}, "data": {"source": "digits"},
                       "train": {"epochs": epochs, "batch_size": 64, "seed": 0},
                       "checkpoint": {"every_epochs": 1, "keep": 2}})
    bundle = load(spec.data)
    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 64, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 64, 0, 1, 0))
    store = open_run_store(location)
    store.write_spec(spec.to_yaml())
    return fit(spec, bundle.meta, env, store), store


def remote_files(store: SyncedRunStore) -> set[str]:
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(store.remote, recursive=True, allow_not_found=True))
    return {i.path[len(store.remote) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_locations():
    assert is_uri("s3://b/p") and is_uri("gs://b/p") and not is_uri("/data/runs") and not is_uri("runs")
    assert join("s3://b/store?endpoint_override=h:1&scheme=http", "x") == "s3://b/store/x?endpoint_override=h:1&scheme=http"
    assert join("/data/runs", "x") == "/data/runs/x"
    assert type(open_run_store("/tmp/somewhere/x")) is RunStore


@pytest.mark.timeout(300)
def test_a_run_lives_in_the_object_store_resumes_from_it_and_is_pulled_back(s3_store, tmp_path):
    location = join(s3_store, "s3run")
    first, store = train(location, epochs=2)
    files = remote_files(store)
    assert {"spec.yaml", "metrics.json", "model.json", "model.safetensors",
            "checkpoints/epoch-0002/meta.json", "checkpoints/epoch-0002/model.safetensors"} <= files
    assert not any(".pending" in f for f in files)

    # another process (here: another store object with its own local copy) resumes after epoch 2
    more, store = train(location, epochs=4)
    assert [r["epoch"] for r in more] == [1, 2, 3, 4] and more[:2] == first
    remaining = {f.split("/")[1] for f in remote_files(store) if f.startswith("checkpoints/")}
    assert remaining == {"epoch-0003", "epoch-0004"}  # keep: 2, pruned in the object store too
    assert [r["epoch"] for r in json.loads(store.fs.open_input_stream(f"{store.remote}/metrics.json").read())] \
        == [1, 2, 3, 4]

    pulled = pull_run(s3_store, "s3run", str(tmp_path / "runs"))
    model, info = load_trained_model(pulled)
    assert info["epoch"] == 4 and (pulled / "checkpoints" / "epoch-0004" / "meta.json").is_file()
    assert torch.equal(model.state_dict()[next(iter(model.state_dict()))],
                       RunStore(pulled).load_model_state()[next(iter(model.state_dict()))])

    store.discard()  # what --fresh does
    assert remote_files(store) == set()


def test_a_model_is_served_from_the_object_store_without_a_local_copy_of_the_run(s3_store, tmp_path):
    from raybig.serve.app import entry_from_arg
    from raybig.store_io import local_model

    location = join(s3_store, "served")
    train(location, epochs=1)
    entry = entry_from_arg(location)  # a URI with ?endpoint_override=...: its '=' is not a name:version label
    assert entry.run_dir == location and entry.name == "s3run" and entry.info["epoch"] == 1
    local = local_model(location)  # what each Serve replica does for itself
    assert sorted(p.name for p in local.iterdir()) == ["model.json", "model.safetensors", "spec.yaml"]
    model, info = load_trained_model(local)
    assert info["epoch"] == 1 and sum(p.numel() for p in model.parameters()) > 0
    named = entry_from_arg(f"digits:v7={location}")
    assert (named.name, named.version, named.run_dir) == ("digits", "v7", location)
    with pytest.raises(SpecError, match="no trained model"):
        local_model(join(s3_store, "nothing-here"))


def test_pull_errors_are_one_line(s3_store, tmp_path):
    with pytest.raises(SpecError, match="no run named 'nope'"):
        pull_run(s3_store, "nope", str(tmp_path))
    with pytest.raises(SpecError, match="no run named 'nope'"):
        pull_run(str(tmp_path / "no-store"), "nope", str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "raybig", "pull", "nope", "--store", s3_store, "--to", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, **S3_ENV})
    assert proc.returncode == 2 and "no run named 'nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["pipeline2", "fsdp2 resumed"])
def test_ranks_in_separate_processes_meet_in_the_object_store(s3_store, tmp_path, layout):
    """What several nodes do: each stage writes its part of a checkpoint, or each FSDP rank its shards of the
    weights and optimizer state, from its own disk; rank 0 merges them. A sharded run resumed from the
    object store reads every rank's optimizer shards back, and goes on as the run on one disk."""
    from multiproc import run_local
    from test_pipeline import job, losses_and_weights

    name = layout.split()[0]  # the bucket outlives a test: a run of its own for each
    if layout == "pipeline2":
        raw = job(tmp_path, name, pipeline={"stages": 2, "microbatches": 4, "schedule": "1f1b"})
        run_local(raw, join(s3_store, name))
    else:
        raw = job(tmp_path, name, data=2, epochs=2)
        raw["parallelism"]["data_mode"] = "fsdp"
        run_local({**raw, "train": {**raw["train"], "epochs": 1}}, join(s3_store, name))
        run_local(raw, join(s3_store, name))
    run_local(raw, tmp_path / "pp")  # the same run on one disk
    pulled = pull_run(s3_store, name, str(tmp_path / "pulled"))
    losses, weights = losses_and_weights(pulled)
    ref_losses, ref_weights = losses_and_weights(tmp_path / "pp")
    assert len(losses) == len(ref_losses) >= 5 and weights.keys() == ref_weights.keys()
    assert (losses == ref_losses).all() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert not any(".pending" in str(p) for p in pulled.rglob("*"))


def test_data_in_the_object_store_is_mirrored_once_and_reads_as_the_local_files_do(s3_store, tmp_path, monkeypatch):
    """data.path as an s3:// prefix or glob: the same windows as the local files; a second read downloads
    nothing; an edited object is downloaded again and gives new windows; a missing prefix is named."""
    import numpy as np
    import pyarrow.fs as pafs

    from raybig.data import datasets, samples
    from raybig.spec import parse_spec
    from raybig.store_io import _upload_file, open_filesystem

    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "data"
    samples.write_text(local, {k: v for k, v in list(samples.docstrings().items())[:2]})
    fs, root = open_filesystem(join(s3_store, "corpus"))
    for name in ("docs.jsonl", "qa.jsonl"):
        _upload_file(local / name, fs, f"{root}/{name}")

    def bundle(path: str, fmt: str = "text"):
        datasets._read.cache_clear()
        spec = parse_spec({"name": "r", "model": {"kind": "transformer", "task": "lm", "dim": 16, "heads": 2,
                                                  "layers": 1},
                           "data": {"source": "jsonl", "path": path, "format": fmt, "seq_len": 16}})
        return datasets.load(spec.data, spec.model)

    remote, plain = bundle(join(s3_store, "corpus/docs.jsonl")), bundle(str(local / "docs.jsonl"))
    np.testing.assert_array_equal(remote.train.x, plain.train.x)
    np.testing.assert_array_equal(remote.val.y, plain.val.y)
    globbed = bundle(join(s3_store, "corpus/qa*.jsonl"), "prompt_completion")
    np.testing.assert_array_equal(globbed.train.y, bundle(str(local / "qa.jsonl"), "prompt_completion").train.y)

    mirrored = sorted((tmp_path / "cache" / "remote").rglob("*.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in mirrored]
    bundle(join(s3_store, "corpus/docs.jsonl"))
    assert [p.stat().st_mtime_ns for p in mirrored] == stamps  # nothing downloaded again
    edited = tmp_path / "edited.jsonl"
    edited.write_text((local / "docs.jsonl").read_text().replace("the", "th\u00e9"))  # a character new to it
    _upload_file(edited, fs, f"{root}/docs.jsonl")
    again = bundle(join(s3_store, "corpus/docs.jsonl"))
    assert "\u00e9" in again.meta.vocab and "\u00e9" not in remote.meta.vocab

    with pytest.raises(SpecError) as info:
        bundle(join(s3_store, "nothing/here"))
    assert info.value.problems[0][0] == "data.path" and "no such object" in str(info.value)
    assert pafs.FileType.File == fs.get_file_info(f"{root}/qa.jsonl").type


def test_a_damaged_newest_checkpoint_in_the_object_store_is_passed_over_for_the_one_before(s3_store):
    location = join(s3_store, "damaged")
    _, store = train(location, epochs=2)
    remote = f"{store.remote}/checkpoints/epoch-0002/model.safetensors"
    whole = store.fs.open_input_stream(remote).read()
    with store.fs.open_output_stream(remote) as out:  # an upload cut short
        out.write(whole[: len(whole) // 2])
    resumed = open_run_store(location)  # a new process's store: its own local copy, fetched afresh
    assert resumed.latest().name == "epoch-0001"
    assert resumed.damaged() == [f"checkpoints/epoch-0002 cannot be used: model.safetensors has {len(whole) // 2} "
                                 f"bytes where its manifest says {len(whole)} (cut short or overwritten)"]
    more, _ = train(location, epochs=3)
    assert [r["epoch"] for r in more] == [1, 2, 3]
