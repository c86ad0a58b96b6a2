"""A model's life after its first training: fine-tuning (init_from), distillation (distill), compression."""
import json

import numpy as np
import pytest
import torch
from conftest import RAY_CPUS
from multiproc import run_local
from safetensors.torch import load_file
from typer.testing import CliRunner

from raybig.cli import app
from raybig.spec import parse_spec
from raybig.train.checkpoint import RunStore, load_trained_model

CNN = {"kind": "cnn"}  # 22,602 parameters on the digits
STUDENT = {"kind": "mlp", "hidden": [64]}  # 4,810: about a fifth of the CNN


def job(tmp, name, model, data=None, steps=None, epochs=None, lr=2e-3, seed=0, **sections) -> dict:
    train = {"batch_size": 32, "optimizer": {"name": "adam", "lr": lr}, "seed": seed}
    train.update({"max_steps": steps} if steps else {"epochs": epochs} if epochs else {})
    out = {"name": name, "model": model, "data": {"source": "digits", **(data or {})}, "train": train,
           "output": {"dir": str(tmp)}}
    if steps:  # one evaluation and one checkpoint, at the end
        out.update(eval={"every_steps": steps}, checkpoint={"every_steps": steps})
    return {**out, **sections}


def trained(raw: dict, tmp) -> dict:
    """`raw` trained in this process by the one loop; the final record."""
    run_local(raw, tmp / raw["name"])
    RunStore(tmp / raw["name"]).write_spec(parse_spec(raw).to_yaml())
    return RunStore(tmp / raw["name"]).history()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CNN trained on the digits 0-4 only (to fine-tune from), and one on all ten (a teacher)."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    trained(job(tmp, "cnn-0to4", CNN, {"classes": [0, 1, 2, 3, 4]}, epochs=9), tmp)
    teacher = trained(job(tmp, "teacher", CNN, epochs=14), tmp)
    assert teacher["val_accuracy"] > 0.95
    return tmp


# ----------------------------------------------------------------------------- fine-tuning
def test_fine_tuning_a_0_to_4_model_on_all_ten_beats_training_from_scratch(runs):
    from raybig.data.datasets import describe
    from raybig.train.runner import check_plan

    raw = job(runs, "ft-all", CNN, steps=20, init_from={"source": "cnn-0to4"})
    spec = parse_spec(raw)
    assert spec.init_from.source == str((runs / "cnn-0to4").resolve())  # a run's name, in output.dir
    note, = check_plan(spec, describe(spec.data), None)
    # the head's class count changed (5 -> 10): it is the one tensor pair kept fresh
    assert "6 tensors loaded" in note and "blocks.3.weight, blocks.3.bias" in note
    tuned = trained(raw, runs)
    scratch = trained(job(runs, "scratch-all", CNN, steps=20), runs)
    assert tuned["val_accuracy"] > scratch["val_accuracy"] + 0.1, (tuned["val_accuracy"], scratch["val_accuracy"])


def test_frozen_parts_keep_their_weights_in_a_pipeline_fine_tune_on_ray(ray_local, runs):
    from raybig.train.runner import run

    raw = job(runs, "ft-pipe", CNN, steps=8, init_from={"source": "cnn-0to4", "train_last": 2},
              parallelism={"pipeline": {"stages": 2, "microbatches": 2}})
    outcome = run(parse_spec(raw), num_cpus=RAY_CPUS)
    assert outcome.final["step"] == 8
    source, tuned = load_file(runs / "cnn-0to4" / "model.safetensors"), load_file(outcome.store.root / "model.safetensors")
    for key in ("blocks.0.1.weight", "blocks.1.0.weight", "blocks.1.0.bias"):  # frozen: the first two parts
        torch.testing.assert_close(tuned[key], source[key], rtol=0, atol=0)
    assert not torch.equal(tuned["blocks.2.1.weight"], source["blocks.2.1.weight"])  # trained
    assert tuned["blocks.3.weight"].shape == (10, 128)
    model, info = load_trained_model(outcome.store.root)  # what serving loads: every weight is in the run
    assert info["data"]["num_classes"] == 10 and model(torch.zeros(2, 8, 8)).shape == (2, 10)


def test_loaded_weights_train_at_their_scaled_learning_rate():
    from raybig.models import build_model
    from raybig.data.datasets import DataMeta
    from raybig.spec import AdamW
    from raybig.train.finetune import parameter_groups
    from raybig.train.optim import apply_spec_hyperparameters, build_optimizer, build_scheduler
    from raybig.spec import LRSchedule

    model = build_model(parse_spec(job("/tmp", "x", STUDENT)).model, DataMeta("classification", [8, 8], 10))
    pretrained = {"blocks.0.1.weight", "blocks.0.1.bias"}
    opt = AdamW(name="adamw", lr=0.01)
    optimizer = build_optimizer(parameter_groups([model], pretrained, 0.1), opt)
    scheduler = build_scheduler(optimizer, LRSchedule(), 10, 100)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.01])
    apply_spec_hyperparameters(optimizer, scheduler, opt)  # as a resumed run does: the scale stays
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.01])


@pytest.mark.parametrize("sections, field, words", [
    ({"init_from": {"source": "no-such-run"}}, "init_from.source", "is not a run"),
    ({"init_from": {"source": "cnn-0to4", "freeze": ["encoder"]}}, "init_from.freeze.0", "names no parameter"),
    ({"init_from": {"source": "cnn-0to4", "train_last": 4}}, "init_from.train_last", "4 parts"),
    ({"distill": {"teacher": "cnn-0to4"}}, "distill.teacher", "other data"),
    ({"distill": {"teacher": "no-such-run"}}, "distill.teacher", "holds no trained model"),
])
def test_a_source_or_teacher_that_cannot_serve_is_refused_before_anything_starts(runs, tmp_path, sections, field,
                                                                                 words):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(runs, "bad", CNN, steps=5, **sections)))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert field in result.output and words in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- distillation
def test_a_student_distilled_on_a_small_labelled_set_beats_it_trained_on_the_labels(runs):
    small = {"train_fraction": 0.03}  # 43 labelled rows: the labels alone overfit
    distilled = trained(job(runs, "student-kd", STUDENT, small, steps=600,
                            distill={"teacher": "teacher", "temperature": 4, "alpha": 0.9}), runs)
    alone = trained(job(runs, "student", STUDENT, small, steps=600), runs)
    # 0.894 vs 0.825 here (seeds 1 and 2: +5.0 and +3.6 points)
    assert distilled["val_accuracy"] > alone["val_accuracy"] + 0.02, (distilled["val_accuracy"], alone["val_accuracy"])


def test_distillation_in_pipeline_stages_computes_what_one_process_does(runs):
    """The teacher's logits travel with the labels, split into the schedule's microbatches."""
    kd = {"teacher": "teacher", "temperature": 2, "alpha": 0.5}
    losses = {}
    for name, layout in (("kd-1", {}), ("kd-pp2", {"pipeline": {"stages": 2, "microbatches": 2}})):
        raw = job(runs, name, STUDENT | {"hidden": [64, 64]}, steps=12, distill=kd, parallelism=layout)
        run_local(raw, runs / name)
        losses[name] = RunStore(runs / name).history()[-1]["step_losses"]
    np.testing.assert_allclose(losses["kd-pp2"], losses["kd-1"], rtol=1e-5)


# ----------------------------------------------------------------------------- compression
def test_compressed_runs_are_smaller_keep_their_accuracy_and_load_as_any_run(ray_local, runs):
    base = trained(job(runs, "mlp", {"kind": "mlp", "hidden": [128, 128]}, epochs=10), runs)
    cli = CliRunner()
    reports = {}
    for args in (["--method", "quantize"], ["--method", "prune", "--sparsity", "0.8", "--finetune-epochs", "2"],
                 ["--method", "low_rank", "--rank", "16"]):
        result = cli.invoke(app, ["compress", str(runs / "mlp"), *args, "--num-cpus", str(RAY_CPUS)])
        assert result.exit_code == 0, result.output
        assert "| mlp |" in result.output
    for name in ("mlp-int8", "mlp-pruned80", "mlp-rank16"):
        record = json.loads((runs / name / "compression.json").read_text())
        assert (runs / name / "compression.png").stat().st_size > 0
        original, compressed = record["comparison"]
        assert original["accuracy"] == pytest.approx(base["val_accuracy"], abs=1e-4)
        reports[name] = (record, original, compressed)
        model, info = load_trained_model(runs / name)  # as serving loads it
        assert info["compression"]["method"] == record["method"] and model(torch.zeros(3, 8, 8)).shape == (3, 10)
    record, original, int8 = reports["mlp-int8"]
    assert original["bytes"] / int8["bytes"] >= 2 and int8["accuracy"] >= original["accuracy"] - 0.005
    int8_model, _ = load_trained_model(runs / "mlp-int8")
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in int8_model.modules())  # int8 kernels
    record, original, pruned = reports["mlp-pruned80"]
    assert record["achieved"] == pytest.approx(0.8, abs=0.01)
    weights = load_file(runs / "mlp-pruned80" / "model.safetensors")  # after the fine-tune, zeros kept
    matrices = [w for k, w in weights.items() if k.endswith("weight")]
    assert sum(int((w == 0).sum()) for w in matrices) / sum(w.numel() for w in matrices) >= 0.79
    assert pruned["accuracy"] >= original["accuracy"] - 0.01
    assert len(RunStore(runs / "mlp-pruned80").history()) == 2  # the fine-tune's epochs
    record, original, low = reports["mlp-rank16"]
    assert record["ranks"] == {"blocks.0.1": 16, "blocks.1.0": 16}  # the head (128 -> 10) would grow: kept
    assert low["parameters"] < original["parameters"] and low["bytes"] < original["bytes"]


def test_compress_refuses_bad_options_naming_them(runs):
    cli = CliRunner()
    for args, words in ((["--method", "zip"], "--method"), (["--method", "prune", "--sparsity", "1.5"], "--sparsity"),
                        (["--method", "low_rank", "--rank", "4", "--energy", "0.5"], "--energy")):
        result = cli.invoke(app, ["compress", str(runs / "teacher"), *args])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    result = cli.invoke(app, ["compress", str(runs / "nothing-here"), "--method", "quantize"])
    assert result.exit_code == 2 and "holds no trained model" in result.output


def test_pruning_per_layer_low_rank_by_energy_and_an_lstm_quantized_do_what_they_say():
    from raybig.data.datasets import DataMeta
    from raybig.lifecycle.compress import chosen_ranks, decoded, finish, prepare, prunable, prune_state, quantize_state
    from raybig.models import build_model

    meta = DataMeta("classification", [8, 8], 10)
    mlp = build_model(parse_spec(job("/tmp", "x", {"kind": "mlp", "hidden": [128, 32]})).model, meta, seed=0)
    state, record = prune_state(mlp, 0.6, "layer")
    for name in prunable(mlp):  # each layer at the sparsity on its own, not one threshold for all
        assert float((state[name] == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    ranks = chosen_ranks(mlp, None, 0.9)
    for path, r in ranks.items():  # the smallest rank keeping 90% of the squared singular values
        s = torch.linalg.svdvals(mlp.get_submodule(path).weight.detach()) ** 2
        assert s[:r].sum() / s.sum() >= 0.9 > s[:r - 1].sum() / s.sum()

    lstm_spec = parse_spec(job("/tmp", "x", {"kind": "lstm", "hidden": 32})).model
    lstm = build_model(lstm_spec, meta, seed=0).eval()
    state, record = quantize_state(lstm)
    assert state["blocks.0.lstm.weight_ih_l0"].dtype == torch.int8 and record["weights"] == 3  # ih, hh, head
    rebuilt = prepare(build_model(lstm_spec, meta), record)  # as load_trained_model rebuilds a quantized run
    rebuilt.load_state_dict(decoded(state, record))
    quantized = finish(rebuilt.eval(), record)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") and "LSTM" in type(m).__name__
               for m in quantized.modules())
    x = torch.rand(16, 8, 8)
    with torch.no_grad():
        assert (quantized(x).argmax(-1) == lstm(x).argmax(-1)).float().mean() >= 0.9
