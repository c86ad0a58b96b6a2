"""Tensor parallelism, FSDP x pipeline, and the memory levers (gradient accumulation, activation
checkpointing, fp16 loss scaling): each reproduces the one-process run, as every layout must
(tests/test_pipeline.py for data and pipeline)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from multiproc import run_local
from raybig.data.datasets import describe
from raybig.errors import SpecError
from raybig.models import build_model
from raybig.models.parts import model_parts
from raybig.spec import parse_spec
from raybig.train.checkpoint import RunStore
from raybig.train.runner import check_plan

pytestmark = pytest.mark.timeout(240)


def lm_job(out, name, parallelism=None, **train):
    return {
        "name": name,
        "model": {"kind": "transformer", "task": "lm", "dim": 32, "heads": 4, "layers": 4},
        "data": {"source": "text", "seq_len": 16, "max_chars": 12_000, "modules": ["textwrap"]},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
                  "seed": 0, "grad_clip": 1.0, **train},
        "parallelism": parallelism or {},
        "eval": {"max_batches": 2},
        "output": {"dir": str(out)},
    }


def losses_and_weights(store_dir):
    store = RunStore(store_dir)
    return np.concatenate([r["step_losses"] for r in store.history()]), load_file(store.root / "model.safetensors")


def assert_same_run(store_dir, reference, rtol=1e-4):
    losses, weights = losses_and_weights(store_dir)
    ref_losses, ref_weights = reference
    assert len(losses) == len(ref_losses) >= 8
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    assert weights.keys() == ref_weights.keys()  # shards and stages reassembled under the model's own names
    for key in ref_weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-single")
    run_local(lm_job(out, "one"), out / "one")
    return losses_and_weights(out / "one")


def predicted_parameters(raw) -> list[int]:
    """raybig plan's memory model: the parameters each rank holds, in rank order."""
    from raybig.plan import rank_parameters

    spec = parse_spec(raw)
    return rank_parameters(build_model(spec.model, describe(spec.data)), spec)[0]


def test_tensor2_splits_heads_and_mlps_and_trains_as_one_process(tmp_path, single):
    run_local(lm_job(tmp_path, "tp", {"tensor": 2}), tmp_path / "tp")
    assert_same_run(tmp_path / "tp", single)
    held = RunStore(tmp_path / "tp").history()[0]["parameters_per_rank"]
    total = sum(w.numel() for w in single[1].values())
    # both ranks hold the embeddings, norms and head whole, and half of every attention and MLP weight
    assert held[0] == held[1] < 0.8 * total
    assert held == predicted_parameters(lm_job(tmp_path, "tp", {"tensor": 2}))


def test_a_tensor2_run_resumes_as_it_was_and_under_one_process(tmp_path, single):
    """Its checkpoint is the whole model (and the optimizer state gathered by parameter name): resumed under
    tensor 2 it goes on as a run that never stopped; under one process it takes the weights."""
    import shutil

    run_local(lm_job(tmp_path, "tp", {"tensor": 2}), tmp_path / "tp")
    # each rank wrote its shards (torch.distributed.checkpoint), consolidated into the one layout-free file
    checkpoint = RunStore(tmp_path / "tp").latest()
    files = json.loads((checkpoint / "manifest.json").read_text())
    assert len([f for f in files if f.startswith("optimizer/") and f.endswith(".distcp")]) == 2
    assert not [f for f in files if f.startswith("part-") and f.endswith(".safetensors")]
    with safe_open(tmp_path / "tp" / "model.safetensors", "pt") as published:
        assert published.metadata() == {"format": "pt"}  # what transformers reads
    shutil.copytree(tmp_path / "tp", tmp_path / "one")
    run_local(lm_job(tmp_path, "tp", {"tensor": 2}, epochs=2), tmp_path / "tp")
    run_local(lm_job(tmp_path, "one", epochs=2), tmp_path / "one")
    run_local(lm_job(tmp_path, "straight", epochs=2), tmp_path / "straight")
    straight = losses_and_weights(tmp_path / "straight")
    assert_same_run(tmp_path / "tp", straight)
    history = RunStore(tmp_path / "one").history()
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["train_loss"] < history[0]["train_loss"]


def test_a_pipeline2_checkpoint_resumes_under_fsdp2(tmp_path):
    """The weights are layout-free: a pipeline run goes on sharded (its optimizer state, per stage, afresh)."""
    pipeline = {"pipeline": {"stages": 2, "microbatches": 2, "schedule": "1f1b"}}
    run_local(lm_job(tmp_path, "pp", pipeline), tmp_path / "pp")
    run_local(lm_job(tmp_path, "pp", {"data": 2, "data_mode": "fsdp"}, epochs=2), tmp_path / "pp")
    first, second = RunStore(tmp_path / "pp").history()
    assert (first["epoch"], second["epoch"]) == (1, 2) and first["attempt"] != second["attempt"]
    # it started where the pipeline run ended, not from a fresh model
    assert second["step_losses"][0] < first["step_losses"][0] - 0.5
    assert second["step_losses"][0] == pytest.approx(first["step_losses"][-1], abs=0.3)


@pytest.mark.parametrize("parallelism", [
    {"data": 2, "tensor": 2}, {"data": 2, "data_mode": "fsdp", "tensor": 2},
    {"pipeline": {"stages": 2, "microbatches": 2, "schedule": "gpipe"}, "tensor": 2}],
    ids=["data2 x tensor2", "fsdp2 x tensor2", "pipeline2 x tensor2"])
def test_tensor2_composes_with_data_and_pipeline_on_a_3d_mesh(tmp_path, single, parallelism):
    """4 processes each: shards' gradients averaged over the data ranks by hand (DDP takes no DTensors), FSDP2
    over the tensor-parallel DTensors, pipeline stages whose blocks are split."""
    run_local(lm_job(tmp_path, "3d", parallelism), tmp_path / "3d")
    assert_same_run(tmp_path / "3d", single)
    held = RunStore(tmp_path / "3d").history()[0]["parameters_per_rank"]
    assert held == predicted_parameters(lm_job(tmp_path, "3d", parallelism))  # raybig plan's memory model


def test_fsdp2_x_pipeline2_trains_as_one_process(tmp_path, single):
    """Each stage sharded over its two data ranks, torch's schedule driving FSDP2 (4 processes)."""
    raw = lm_job(tmp_path, "fp", {"data": 2, "data_mode": "fsdp",
                                  "pipeline": {"stages": 2, "microbatches": 2, "schedule": "1f1b"}})
    run_local(raw, tmp_path / "fp")
    assert_same_run(tmp_path / "fp", single)
    held = RunStore(tmp_path / "fp").history()[0]["parameters_per_rank"]
    total = sum(w.numel() for w in single[1].values())
    assert len(held) == 4 and sum(held) == total and max(held) < 0.4 * total
    assert held == predicted_parameters(raw)


@pytest.mark.parametrize("parallelism", [{}, {"data": 2}, {"data": 2, "data_mode": "fsdp"}],
                         ids=["one process", "data2", "fsdp data2"])
def test_grad_accumulation_4_is_the_whole_batch_at_once(tmp_path, single, parallelism):
    """The batch as 4 microbatches, gradients reduced across ranks once, after the last of them."""
    run_local(lm_job(tmp_path, "acc", parallelism, grad_accumulation=4 if not parallelism else 2), tmp_path / "acc")
    assert_same_run(tmp_path / "acc", single)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_the_same_steps(tmp_path, single, mode):
    run_local(lm_job(tmp_path, "ac", activation_checkpointing=mode), tmp_path / "ac")
    assert_same_run(tmp_path / "ac", single, rtol=1e-5)


def test_activation_checkpointing_full_keeps_least_and_selective_recomputes_no_matmul():
    """full keeps a block's input alone and recomputes the block in backward, matrix multiplies included;
    selective keeps those and recomputes only the element-wise work between them. Same gradients."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from raybig.train.activations import checkpoint_blocks

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    spec = parse_spec(lm_job("/tmp", "x"))
    meta = describe(spec.data)
    x = torch.randint(0, meta.num_classes, (8, 16))

    def backward_of(mode):
        net = build_model(spec.model, meta, seed=0)
        checkpoint_blocks(model_parts(net), mode)
        kept = []  # what autograd keeps outside checkpointed blocks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = net(x).logsumexp(-1).mean()
        with CountOps() as counted:
            loss.backward()
        matmuls = sum(counted.ops[op] for op in ("mm", "addmm", "bmm"))
        return sum(kept), matmuls, sum(counted.ops.values()), {n: p.grad for n, p in net.named_parameters()}

    none, full, selective = (backward_of(mode) for mode in ("none", "full", "selective"))
    assert full[0] < none[0]
    assert full[1] > selective[1] == none[1]  # full recomputes the matrix multiplies, selective kept them
    assert selective[2] > none[2]  # and recomputes the rest
    for name, grad in none[3].items():
        torch.testing.assert_close(full[3][name], grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(selective[3][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision, parallelism", [("bf16", {"data": 2, "data_mode": "fsdp"}), ("fp16", {})],
                         ids=["bf16 fsdp2", "fp16"])
def test_lower_precision_trains_near_fp32(tmp_path, single, precision, parallelism):
    """bf16 under FSDP2's mixed-precision policy (parameters gathered in bf16, gradients reduced in fp32), and
    fp16 with its loss scale, checkpointed with the run."""
    run_local(lm_job(tmp_path, "lp", parallelism, precision=precision), tmp_path / "lp")
    losses, weights = losses_and_weights(tmp_path / "lp")
    np.testing.assert_allclose(losses, single[0], rtol=3e-2)
    assert not np.allclose(losses, single[0], rtol=1e-6)  # it did run in the lower precision
    assert all(w.dtype == torch.float32 for w in weights.values())  # weights stay fp32
    trainer = torch.load(RunStore(tmp_path / "lp").latest() / "part-0-trainer.pt", weights_only=True)
    scale = trainer["precision"]
    # halved once per overflowed (skipped) step; 8 steps are too few to grow it (every 2,000 clean steps)
    assert scale["scale"] == 2.0 ** 16 / 2 ** scale["skipped"] and scale["skipped"] < 4


def test_fp16_loss_scaling_skips_an_overflowed_step_and_halves_the_scale():
    from raybig.train.precision import Precision

    precision = Precision("fp16", torch.device("cpu"), scale=1024.0, growth_interval=2)
    w = torch.nn.Parameter(torch.ones(3))
    precision.scale((w * 2).sum()).backward()
    assert precision.unscale([w]) and torch.equal(w.grad, torch.full((3,), 2.0))  # back to the true gradient
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not precision.unscale([w]) and w.grad is None and precision.value == 512.0  # skipped, halved
    for _ in range(2):
        w.grad = torch.ones(3)
        assert precision.unscale([w])
    assert precision.value == 1024.0  # growth_interval good steps in a row double it
    assert precision.unscaled(precision.scale(torch.tensor(3.0))) == 3.0
    again = Precision("fp16", torch.device("cpu"))
    again.load_state_dict(precision.state_dict())
    assert again.value == 1024.0 and again.skipped == 1


@pytest.mark.parametrize("model, parallelism, train, path", [
    ({"kind": "mlp"}, {"tensor": 2}, {}, "parallelism.tensor"),
    ({"kind": "transformer", "task": "lm", "heads": 3, "dim": 48}, {"tensor": 2}, {}, "parallelism.tensor"),
    ({"kind": "transformer", "task": "lm"}, {"pipeline": {"stages": 2}}, {"grad_accumulation": 2},
     "train.grad_accumulation"),
    ({"kind": "transformer", "task": "lm"}, {"data": 3}, {"grad_accumulation": 2, "batch_size": 32},
     "train.batch_size"),
])
def test_layout_errors_name_the_field(model, parallelism, train, path):
    raw = lm_job("/tmp", "bad", parallelism, **train)
    raw["model"] = model
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert path in str(err.value)


def test_two_ranks_on_one_gpu_are_refused_before_anything_starts():
    raw = {**lm_job("/tmp", "gpu", {"data": 2}), "resources": {"gpus_per_worker": 0.5}}
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert "resources.gpus_per_worker" in str(err.value) and "one rank per device" in str(err.value)
    parse_spec({**raw, "parallelism": {"data": 1}})  # one rank sharing a GPU with other work is fine


def test_a_model_without_a_tensor_plan_or_blocks_is_refused_by_the_plan_check(tmp_path):
    """A python model declares neither: the spec alone cannot tell, check_plan builds it and names the field."""
    (tmp_path / "flat.py").write_text(
        "import torch\n"
        "def build(meta):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, meta.num_classes))\n")
    raw = {"name": "flat", "model": {"kind": "python", "factory": "flat:build", "code": [str(tmp_path)]},
           "data": {"source": "digits"}, "parallelism": {"tensor": 2}, "train": {"activation_checkpointing": "full"},
           "output": {"dir": str(tmp_path)}}
    spec = parse_spec(raw)
    with pytest.raises(SpecError) as err:
        check_plan(spec, describe(spec.data), cpus=None)
    message = str(err.value)
    assert "parallelism.tensor" in message and "raybig_tp_plan" in message
    assert "train.activation_checkpointing" in message


def test_raybig_plan_lists_the_layouts_with_each_ranks_state_or_why_not(tmp_path):
    """Every factorisation of 4 workers: the MLP cannot split tensor-parallel (named), the rest get their
    ranks' exact state (adamw: value, gradient and two moments per parameter, fp32)."""
    import yaml
    from typer.testing import CliRunner

    from raybig.cli import app
    from raybig.plan import plan

    raw = {"name": "wide", "model": {"kind": "mlp", "hidden": [256, 256, 256]}, "data": {"source": "digits"},
           "train": {"batch_size": 64}, "output": {"dir": str(tmp_path)}}
    spec = parse_spec(raw)
    meta = describe(spec.data)
    candidates = {c.degrees: c for c in plan(spec, meta, 4)}
    total = sum(p.numel() for p in build_model(spec.model, meta).parameters())
    assert candidates["data 4"].held == [total] * 4 and candidates["data 4"].state_bytes == [16 * total] * 4
    assert max(candidates["data 4 (fsdp)"].held) < 0.3 * total
    assert sum(candidates["data 1 x pipeline 4"].held) == total
    assert all("parallelism.tensor" in c.problem for name, c in candidates.items() if "tensor" in name)
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "wide.yaml"), "--workers", "4", "--memory-mb", "1"])
    assert result.exit_code == 0, result.output
    assert "data 2 (fsdp) x pipeline 2" in result.output and "parallelism.tensor:" in result.output
