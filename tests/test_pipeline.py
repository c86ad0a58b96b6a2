"""Pipeline and 2-D (data x pipeline) layouts: the same losses and weights as one process."""
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from multiproc import run_local
from raybig.data.datasets import describe
from raybig.errors import SpecError
from raybig.models import build_model
from raybig.models.parts import model_parts
from raybig.spec import parse_spec
from raybig.train.checkpoint import RunStore
from raybig.train.parallel import balanced_split, split_model, stage_starts
from raybig.train.runner import check_plan

pytestmark = pytest.mark.timeout(180)


def job(tmp_path, name, data=1, pipeline=None, epochs=1, **model):
    return {
        "name": name,
        "model": {"kind": "mlp", "hidden": [64, 64, 64], **model},
        "data": {"source": "digits"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": {"name": "adam", "lr": 2e-3}, "seed": 0,
                  "regularization": {"l2": 1e-4}, "grad_clip": 5.0},
        "parallelism": {"data": data, "pipeline": pipeline or {"stages": 1}},
        "output": {"dir": str(tmp_path)},
    }


def losses_and_weights(store_dir):
    store = RunStore(store_dir)
    return np.concatenate([r["step_losses"] for r in store.history()]), load_file(store.root / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_local(job(out, "single"), out / "single")
    return losses_and_weights(out / "single")


LAYOUTS = {
    "gpipe": (1, {"stages": 2, "microbatches": 4, "schedule": "gpipe"}),
    "1f1b": (1, {"stages": 2, "microbatches": 4, "schedule": "1f1b"}),
    "interleaved": (1, {"stages": 2, "microbatches": 4, "schedule": "interleaved_1f1b", "virtual_stages": 2}),
    "data2 x pipeline2": (2, {"stages": 2, "microbatches": 2, "schedule": "1f1b"}),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_process(tmp_path, single, layout):
    data, pipeline = LAYOUTS[layout]
    run_local(job(tmp_path, "p", data=data, pipeline=pipeline), tmp_path / "p")
    losses, weights = losses_and_weights(tmp_path / "p")
    ref_losses, ref_weights = single
    assert len(losses) == len(ref_losses) >= 5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert weights.keys() == ref_weights.keys()  # the stages were reassembled into the full model
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-3, atol=1e-5)


def test_fsdp_data2_matches_one_process_and_resumes_under_fsdp_or_ddp(tmp_path, single):
    """parallelism.data_mode: fsdp shards each block over the data ranks (FSDP2); with gradient clipping and
    an L2 penalty on the shards it trains the same steps, and its layout-free checkpoint resumes under DDP."""
    raw = job(tmp_path, "f", data=2)
    raw["parallelism"]["data_mode"] = "fsdp"
    run_local(raw, tmp_path / "f")
    losses, weights = losses_and_weights(tmp_path / "f")
    ref_losses, ref_weights = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert weights.keys() == ref_weights.keys()  # gathered whole, under the model's own names
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-3, atol=1e-5)
    total = sum(w.numel() for w in ref_weights.values())
    held = RunStore(tmp_path / "f").history()[0]["parameters_per_rank"]
    assert len(held) == 2 and sum(held) == total and max(held) < 0.6 * total  # each rank holds its half
    # resumed as it was (fsdp 2, its optimizer state gathered into the checkpoint and sharded again) it goes on
    # as a run that never stopped; under ddp 1 it takes the weights (the optimizer state is per layout)
    shutil.copytree(tmp_path / "f", tmp_path / "g")
    again = {**raw, "train": {**raw["train"], "epochs": 2}}
    run_local(again, tmp_path / "f")
    run_local(job(tmp_path, "g", data=1, epochs=2), tmp_path / "g")
    run_local(job(tmp_path, "s", epochs=2), tmp_path / "straight")
    np.testing.assert_allclose(losses_and_weights(tmp_path / "f")[0], losses_and_weights(tmp_path / "straight")[0],
                               rtol=1e-4)
    history = RunStore(tmp_path / "g").history()
    assert [r["epoch"] for r in history] == [1, 2] and len({r["attempt"] for r in history}) == 2
    assert history[1]["train_loss"] < history[0]["train_loss"]


def test_pipeline_run_resumes_from_its_checkpoint(tmp_path, single):
    pipeline = {"stages": 2, "microbatches": 4, "schedule": "1f1b"}
    run_local(job(tmp_path, "r", pipeline=pipeline, epochs=1), tmp_path / "r")
    run_local(job(tmp_path, "r", pipeline=pipeline, epochs=2), tmp_path / "r")
    history = RunStore(tmp_path / "r").history()
    assert [r["epoch"] for r in history] == [1, 2] and len({r["attempt"] for r in history}) == 2
    straight = tmp_path / "straight"
    run_local(job(tmp_path, "s", epochs=2), straight)
    np.testing.assert_allclose(losses_and_weights(tmp_path / "r")[0], losses_and_weights(straight)[0], rtol=1e-4)


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [0, 2]
    assert balanced_split([10, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_split([1, 1, 1, 9], 2) == [0, 3]
    assert balanced_split([3, 3, 3], 3) == [0, 1, 2]


@pytest.mark.parametrize("model, stages", [
    ({"kind": "mlp", "hidden": [64, 64]}, 3), ({"kind": "cnn"}, 4), ({"kind": "lstm", "layers": 2}, 3),
    ({"kind": "transformer", "layers": 4}, 3),
])
def test_every_model_kind_splits_into_stages_that_compose(model, stages):
    spec = parse_spec({"name": "x", "model": model, "data": {"source": "digits"}})
    net = build_model(spec.model, describe(spec.data), seed=0).eval()
    parts = split_model(model_parts(net), stage_starts(model_parts(net), stages, None))
    assert len(parts) == stages
    merged = {}
    for part in parts:
        merged.update(part.state_dict())
    assert merged.keys() == net.state_dict().keys()
    x = torch.rand(3, 8, 8)
    h = x
    for part in parts:
        h = part(h)
    assert torch.equal(h, net(x))


def test_transformer_splits_between_its_layers():
    spec = parse_spec({"name": "x", "model": {"kind": "transformer", "layers": 4}, "data": {"source": "digits"}})
    net = build_model(spec.model, describe(spec.data))
    starts = stage_starts(model_parts(net), 2, None)
    # blocks: embed, 4 layers, head: a balanced cut falls between two attention layers
    assert starts == [0, 3] and type(net.blocks[3]).__name__ == "Layer"


def plan_problems(raw, cpus=16):
    try:
        spec = parse_spec(raw)
        check_plan(spec, describe(spec.data), cpus)
    except SpecError as err:
        return err.problems
    return []


@pytest.mark.parametrize("pipeline, data, path", [
    ({"stages": 5, "microbatches": 2, "schedule": "gpipe"}, 1, "parallelism.pipeline.stages"),  # 4 blocks
    ({"stages": 2, "microbatches": 3}, 1, "train.batch_size"),
    ({"stages": 2, "microbatches": 4, "schedule": "interleaved_1f1b", "virtual_stages": 1}, 1,
     "parallelism.pipeline.virtual_stages"),
    ({"stages": 2, "microbatches": 4, "schedule": "1f1b", "virtual_stages": 2}, 1, "parallelism.pipeline.virtual_stages"),
    ({"stages": 2, "microbatches": 8, "schedule": "interleaved_1f1b", "virtual_stages": 3}, 1,
     "parallelism.pipeline.stages"),
    ({"stages": 2, "microbatches": 2, "split_points": [3, 1]}, 1, "parallelism.pipeline.split_points"),
    ({"stages": 4, "microbatches": 4}, 8, "parallelism.data"),
])
def test_pipeline_spec_errors_name_the_field(tmp_path, pipeline, data, path):
    raw = job(tmp_path, "e", data=data, pipeline=pipeline)
    raw["train"]["batch_size"] = 64 if path != "parallelism.data" else 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bubble warning some of these layouts also earn
        problems = plan_problems(raw)
    assert problems and problems[0][0] == path, problems


def test_fewer_microbatches_than_stages_is_only_a_warning_for_gpipe(tmp_path):
    raw = job(tmp_path, "w", pipeline={"stages": 2, "microbatches": 1, "schedule": "gpipe"})
    with pytest.warns(UserWarning, match="bubble"):
        check_plan(parse_spec(raw), describe(parse_spec(raw).data), 16)
    assert plan_problems(job(tmp_path, "w", pipeline={"stages": 2, "microbatches": 1, "schedule": "1f1b"}))


def test_compiled_blocks_train_as_the_eager_model_does(tmp_path, single):
    """train.compile: blocks compiles each block in place (names, checkpoints unchanged) and trains the
    same steps as the eager run, within the float differences of generated kernels."""
    raw = job(tmp_path, "c")
    raw["train"]["compile"] = "blocks"
    run_local(raw, tmp_path / "c")
    losses, weights = losses_and_weights(tmp_path / "c")
    ref_losses, ref_weights = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    assert weights.keys() == ref_weights.keys()


def test_compile_is_applied_from_outside_to_blocks_or_to_what_each_rank_runs():
    from types import SimpleNamespace

    from raybig.train.parallel import compile_blocks, parallelize
    from raybig.train.precision import Precision

    spec = parse_spec({"name": "x", "model": {"kind": "transformer", "layers": 2}, "data": {"source": "digits"},
                       "train": {"compile": "model"}})
    net = build_model(spec.model, describe(spec.data), seed=0)
    compile_blocks(model_parts(net))
    compiled = [type(block).__name__ for block in net.blocks if block._compiled_call_impl is not None]
    assert compiled == ["Layer", "Layer"]  # the repeated blocks; the embedding and head stay eager
    env = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), distributed=False)
    other = build_model(spec.model, describe(spec.data), seed=0)
    layout = parallelize(other, spec, env, None, Precision("fp32", env.device))
    assert layout.local[0] is other and other._compiled_call_impl is not None


def test_a_pipeline_run_stopped_mid_epoch_resumes_at_the_very_next_batch(tmp_path, single):
    """max_steps ends a pipeline run 15 batches into its epoch (22 batches); raising it to 22 resumes from
    that checkpoint at batch 16, and the run is the one-process run that never stopped. (Ray workers killed
    mid-epoch, data 2 and data 2 x pipeline 2: tests/test_train_ray.py.)"""
    def steps(max_steps):
        raw = job(tmp_path, "r", pipeline={"stages": 2, "microbatches": 4, "schedule": "1f1b"})
        raw["train"]["max_steps"] = max_steps
        return {**raw, "eval": {"every_steps": 10}, "checkpoint": {"every_steps": 10}}

    run_local(steps(15), tmp_path / "r")
    assert [p.name for p in RunStore(tmp_path / "r").checkpoint_dirs()] == ["epoch-0000+0000010", "epoch-0000+0000015"]
    run_local(steps(22), tmp_path / "r")
    history = RunStore(tmp_path / "r").history()
    assert [r["step"] for r in history] == [10, 15, 20, 22] and [r["epoch"] for r in history] == [1, 1, 1, 1]
    assert len({r["attempt"] for r in history}) == 2
    losses, weights = losses_and_weights(tmp_path / "r")
    ref_losses, ref_weights = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-3, atol=1e-5)


def test_streamed_rows_train_data2_x_pipeline2_as_one_process_streaming_them(tmp_path, monkeypatch):
    """data.loader stream: every stage of a replica reads that replica's slice of the same global batches from
    the shards, so the layout reproduces one process reading the same shards."""
    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))  # the processes' shards are this test's
    streamed = {"source": "digits", "loader": "stream", "memory_mb": 1}
    run_local({**job(tmp_path, "one"), "data": streamed}, tmp_path / "one")
    data, pipeline = LAYOUTS["data2 x pipeline2"]
    run_local({**job(tmp_path, "p", data=data, pipeline=pipeline), "data": streamed}, tmp_path / "p")
    assert len(list((tmp_path / "cache" / "shards").glob("rows-*/train/*.arrow"))) >= 3
    (losses, weights), (ref_losses, ref_weights) = losses_and_weights(tmp_path / "p"), losses_and_weights(tmp_path / "one")
    assert len(losses) == len(ref_losses) >= 5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-3, atol=1e-5)
