"""End to end on a real local Ray: a rank per actor, DDP over gloo, Ray Data, checkpoints, failures."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import RAY_CPUS, spec_dict
from raybig.cli import app
from raybig.data.datasets import load
from raybig.data.loader import rank_sources
from raybig.data.shards import ShardedSplit
from raybig.data.streaming import streams
from raybig.errors import SpecError
from raybig.spec import load_spec, parse_spec
from raybig.train.checkpoint import load_trained_model
from raybig.train.runner import run

JOBS = Path(__file__).resolve().parents[1] / "jobs"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(480)]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    spec = load_spec(JOBS / "digits_cnn.yaml", [f"output.dir={out}"])
    return spec, run(spec, num_cpus=RAY_CPUS)


def test_demo_reaches_95_percent_with_two_data_parallel_workers(demo):
    spec, outcome = demo
    assert spec.parallelism.data == 2
    assert [r["epoch"] for r in outcome.history] == list(range(1, spec.train.epochs + 1))
    assert outcome.final["val_accuracy"] >= 0.95
    for key in ("val_loss", "val_precision", "val_recall", "val_f1", "samples_per_s"):
        assert outcome.final[key] > 0


def test_demo_leaves_a_complete_model_store(demo):
    spec, outcome = demo
    root = outcome.store.root
    for name in ("spec.yaml", "model.safetensors", "model.json", "metrics.json", "curves.png"):
        assert (root / name).is_file(), name
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert parse_spec(__import__("yaml").safe_load((root / "spec.yaml").read_text())) == spec
    # the stored weights, loaded into a fresh model, reproduce the reported validation accuracy
    bundle = load(spec.data)
    model, info = load_trained_model(root)
    assert info["epoch"] == spec.train.epochs and info["data"]["num_classes"] == 10
    with torch.no_grad():
        preds = model(torch.as_tensor(bundle.val.x)).argmax(-1).numpy()
    assert (preds == bundle.val.y).mean() == pytest.approx(outcome.final["val_accuracy"], abs=1e-9)


def test_cli_reports_an_already_complete_run(demo):
    spec, outcome = demo
    result = CliRunner().invoke(app, ["run", str(JOBS / "digits_cnn.yaml"), "--set",
                                      f"output.dir={outcome.store.root.parent}"])
    assert result.exit_code == 0, result.output
    assert "already holds all" in result.output and "model.safetensors" in result.output


def test_data_parallel_degree_2_matches_degree_1_step_for_step(ray_local, tmp_path):
    losses, weights = {}, {}
    for degree in (1, 2):
        raw = spec_dict(tmp_path, name=f"dp{degree}", parallelism={"data": degree},
                        train={"epochs": 2, "batch_size": 64, "optimizer": {"name": "adam", "lr": 2e-3}, "seed": 0})
        outcome = run(parse_spec(raw), num_cpus=RAY_CPUS)
        losses[degree] = np.concatenate([r["step_losses"] for r in outcome.history])
        weights[degree] = load_file(outcome.store.root / "model.safetensors")
    assert len(losses[1]) == len(losses[2]) >= 40
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-5)


def test_char_lm_pipeline_job_learns(ray_local, tmp_path):
    spec = load_spec(JOBS / "charlm_pipeline.yaml", [f"output.dir={tmp_path}"])
    assert spec.parallelism.pipeline.stages == 2
    history = run(spec, num_cpus=RAY_CPUS).history
    first_steps = np.mean(history[0]["step_losses"][:5])
    assert history[-1]["train_loss"] < 0.6 * first_steps
    assert history[-1]["val_loss"] < 0.6 * first_steps


# ----------------------------------------------------------------------------- a corpus that streams
WORDS = "the a model trains on data ray shards each rank reads its window and the next step".split()
BUDGET_MB = 1


@pytest.fixture(scope="module")
def stream_cache(tmp_path_factory):
    """This module's own RAYBIG_CACHE from here on: the shards its streaming tests write are theirs."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYBIG_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def corpus(ray_local, stream_cache, tmp_path_factory):
    """16 files of one-sentence lines, 10 MB in all, with a memory budget of 1 MB: it streams, tokenized by
    Ray Data tasks into shards."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for f in range(16):
        words = np.array(WORDS)[rng.integers(0, len(WORDS), size=(15_000, 9))]
        (root / f"part{f}.txt").write_text("\n".join(" ".join(line) for line in words) + "\n")
    raw = {"name": "streamed", "model": {"kind": "transformer", "task": "lm", "dim": 32, "heads": 2, "layers": 1},
           "data": {"source": "text", "path": str(root), "document": "line", "seq_len": 32, "memory_mb": BUDGET_MB},
           "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "adam", "lr": 3e-3}, "seed": 0}}
    spec = parse_spec(raw)
    return root, raw, spec, load(spec.data, spec.model)


def test_a_corpus_larger_than_its_memory_budget_is_tokenized_into_shards(corpus):
    root, _, spec, bundle = corpus
    files = sum(p.stat().st_size for p in root.iterdir())
    assert files > 8 * BUDGET_MB * 2**20 and streams(spec.data)  # auto chose to stream
    assert isinstance(bundle.train, ShardedSplit) and isinstance(bundle.val, ShardedSplit)
    on_disk = sum(p.stat().st_size for p in bundle.train.directory.iterdir())
    assert on_disk > 32 * BUDGET_MB * 2**20 and len(bundle.train.shards) > 16
    assert 0.15 < len(bundle.val) / (len(bundle.train) + len(bundle.val)) < 0.25  # val_fraction 0.2, by document
    lines = set(line for p in root.iterdir() for line in p.read_text().splitlines())
    vocab = bundle.meta.vocab
    for shard in (0, len(bundle.train.shards) - 1):  # a shard's windows: the corpus's lines, one after another
        x, y = bundle.train.read(shard)
        text = "".join(vocab[i] for i in np.concatenate([x[3:9].reshape(-1), y[8, -1:]]))
        assert all(line in lines for line in text.split("\n")[1:-1]) and len(text.split("\n")) > 2
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets: the next tokens, all trained


def test_a_streaming_rank_holds_about_its_memory_budget_not_the_corpus(corpus):
    """A fresh process reads a whole epoch of the shards: its peak memory grows by a few budgets (about 4 MB
    here: the windows and the allocator's slack), while it reads more than 32 budgets."""
    _, raw, _, bundle = corpus
    script = f"""
import json, resource, numpy as np
from raybig.data.loader import rank_sources
from raybig.data.shards import open_split
from raybig.spec import parse_spec
spec = parse_spec(json.loads({json.dumps(json.dumps(raw))}))
train, val = rank_sources(spec, open_split({str(bundle.train.directory)!r}), open_split({str(bundle.val.directory)!r}), 0)
next(iter(train.train_batches(2)))  # imports and first allocations done
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = sum(len(y) for _, y in train.train_batches(1)) + sum(len(y) for _, y in val.eval_batches())
print(json.dumps({{"rows": rows, "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rows"] == len(bundle.train) // 16 * 16 + len(bundle.val)
    assert report["grew_kb"] * 2**10 < 8 * BUDGET_MB * 2**20, report


def test_streamed_batches_are_the_same_for_any_data_degree_and_resume_exactly(corpus):
    _, raw, _, bundle = corpus

    def batches(degree: int, rank: int, epoch: int = 1, start: int = 0) -> list[np.ndarray]:
        spec = parse_spec({**raw, "parallelism": {"data": degree}})
        train, _ = rank_sources(spec, bundle.train, bundle.val, rank)
        return [x.numpy() for x, _ in train.train_batches(epoch, start)]

    one = batches(1, 0)
    assert len(one) == len(bundle.train) // 16
    halves = [batches(2, 0), batches(2, 1)]
    assert all(np.array_equal(np.concatenate([a, b]), x) for a, b, x in zip(*halves, one))  # degree 2 = 1
    assert all(np.array_equal(a, b) for a, b in zip(batches(1, 0, start=1234), one[1234:]))  # resume: the rest
    # an epoch reads every window once (bar the last partial batch's), in an order of its own
    rows = Counter(r.tobytes() for r in np.concatenate(one))
    every = Counter(r.tobytes() for i in range(len(bundle.train.shards)) for r in bundle.train.read(i)[0].astype(np.int64))
    assert sum(rows.values()) == len(one) * 16 and all(every[r] >= n for r, n in rows.items())
    assert not np.array_equal(np.concatenate(batches(1, 0, epoch=2)[:50]), np.concatenate(one[:50]))


def test_a_streamed_lm_trains_data_parallel_on_ray_as_in_one_process(corpus, tmp_path):
    from multiproc import run_local
    from raybig.train.checkpoint import RunStore

    _, raw, _, _ = corpus
    steps = {"train": {**raw["train"], "max_steps": 40}, "eval": {"every_steps": 20, "max_batches": 4},
             "output": {"dir": str(tmp_path)}}
    outcome = run(parse_spec({**raw, **steps, "parallelism": {"data": 2}}), num_cpus=RAY_CPUS)
    losses = np.concatenate([r["step_losses"] for r in outcome.history])
    assert [r["step"] for r in outcome.history] == [20, 40] and len(losses) == 40
    assert {"val_perplexity", "val_token_accuracy", "tokens_per_s"} <= outcome.final.keys()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean()
    run_local({**raw, **steps, "name": "one"}, tmp_path / "one")
    np.testing.assert_allclose(losses, np.concatenate([r["step_losses"] for r in RunStore(tmp_path / "one").history()]),
                               rtol=1e-4)


def test_a_parquet_text_column_streams_from_its_row_groups(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, raw, _, text = corpus
    lines = [line for p in sorted(root.iterdir()) for line in p.read_text().splitlines()]
    pq.write_table(pa.table({"text": lines}), tmp_path / "corpus.parquet", row_group_size=5000)
    spec = parse_spec({**raw, "data": {"source": "parquet", "path": str(tmp_path / "corpus.parquet"), "field": "text",
                                       "seq_len": 32, "memory_mb": BUDGET_MB, "loader": "stream"}})
    bundle = load(spec.data, spec.model)
    assert isinstance(bundle.train, ShardedSplit) and bundle.meta.vocab == text.meta.vocab
    total = len(bundle.train) + len(bundle.val)
    assert abs(total - (len(text.train) + len(text.val))) < 0.01 * total  # the same text, cut elsewhere
    x, y = bundle.train.read(len(bundle.train.shards) // 2)
    decoded = "".join(bundle.meta.vocab[i] for i in np.concatenate([x[3:9].reshape(-1), y[8, -1:]]))
    assert all(line in set(lines) for line in decoded.split("\n")[1:-1]) and len(decoded.split("\n")) > 2


def test_a_bad_row_in_a_streamed_corpus_is_named_by_file_and_line_or_skipped_and_counted(stream_cache, ray_local,
                                                                                      tmp_path):
    rows = [json.dumps({"text": f"document {i} " * 20}) for i in range(400)]
    rows[250] = '{"text": "unterminated'
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    data = {"source": "jsonl", "path": str(tmp_path / "rows.jsonl"), "seq_len": 16, "loader": "stream"}
    model = {"kind": "transformer", "task": "lm", "dim": 16, "heads": 2, "layers": 1}
    with pytest.raises(SpecError) as info:
        load(parse_spec({"name": "bad", "model": model, "data": data}).data)
    (field, message), = info.value.problems
    assert field == "data.path" and message.startswith(f"{(tmp_path / 'rows.jsonl').resolve()}:251: not JSON")
    skipped = load(parse_spec({"name": "bad", "model": model, "data": {**data, "on_error": "skip"}}).data)
    assert isinstance(skipped.train, ShardedSplit) and skipped.meta.skipped_rows == 1
    assert not list((stream_cache / "shards").glob(".text-*"))  # the failed attempt left no partial entry


def _all_rows(split) -> Counter:
    """A split's (x, y) rows as a multiset, in memory or on disk."""
    parts = [split.read(i) for i in range(len(split.shards))] if isinstance(split, ShardedSplit) else [(split.x, split.y)]
    return Counter((x.tobytes(), int(y)) for xs, ys in parts for x, y in zip(xs, ys))


def test_tables_and_image_folders_larger_than_memory_are_read_in_pieces_by_ray_data_tasks(stream_cache, ray_local,
                                                                                      tmp_path):
    """A CSV of class names, a datasets directory and an image folder, each with loader stream and a 1 MB
    budget: Ray Data tasks read them piece by piece into shards holding exactly the rows the memory loader
    reads (a val_path's rows all validation), with the same classes; a bad row is named by its file's line."""
    from PIL import Image
    import datasets as hf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 4)).round(3).astype(np.float32)
    names = np.array(["cat", "dog", "eel"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)]
    lines = ["a,b,c,d,label"] + [f"{a},{b},{c},{d},{n}" for (a, b, c, d), n in zip(x.tolist(), names)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    hf.DatasetDict({"train": hf.Dataset.from_dict({"a": x[:15_000, 0], "b": x[:15_000, 1], "label": (x[:15_000, 0] > 0).astype(int)}),
                    "test": hf.Dataset.from_dict({"a": x[15_000:, 0], "b": x[15_000:, 1], "label": (x[15_000:, 0] > 0).astype(int)})}
                   ).save_to_disk(str(tmp_path / "hf"))
    for split, count in (("train", 60), ("val", 10)):
        for c in ("circle", "square"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / split / c / f"{i}.png")
    sources = {"csv": {"source": "csv", "path": str(tmp_path / "t.csv")},
               "hf_disk": {"source": "hf_disk", "path": str(tmp_path / "hf")},
               "image_folder": {"source": "image_folder", "path": str(tmp_path / "img" / "train"),
                                "val_path": str(tmp_path / "img" / "val"), "memory_mb": 1}}
    model = {"kind": "mlp", "hidden": [8]}
    for name, data in sources.items():
        memory = load(parse_spec({"name": name, "model": model, "data": {**data, "loader": "memory"}}).data)
        spec = parse_spec({"name": name, "model": model, "data": {**data, "loader": "stream", "memory_mb": 1}})
        assert streams(spec.data)
        streamed = load(spec.data)
        assert isinstance(streamed.train, ShardedSplit) and streamed.meta.labels == memory.meta.labels
        assert streamed.meta.num_classes == memory.meta.num_classes and streamed.meta.shape == memory.meta.shape
        both = _all_rows(streamed.train) + _all_rows(streamed.val)
        assert both == _all_rows(memory.train) + _all_rows(memory.val), name
        if name != "csv":  # a val_path or a validation split: the same validation rows
            assert _all_rows(streamed.val) == _all_rows(memory.val), name
        else:  # each piece drew its own share
            assert len(streamed.train.shards) > 4 and 0.15 < len(streamed.val) / sum(both.values()) < 0.25
    lines[12_345] = "1.0,2.0"
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        load(parse_spec({"name": "bad", "model": model, "data": {**sources["csv"], "loader": "stream", "memory_mb": 1}}).data)
    (field, message), = info.value.problems
    assert field == "data.path" and "t.csv: line 12346: 2 values, expected 5" in message
