"""Hugging Face Transformers models (`model: {kind: hf, ...}`): a tiny Llama built offline from its config,
trained by raybig in one process, data 2 and pipeline 2 reproducing a plain transformers loop on the same
batches, trained on real Ray workers, written as a save_pretrained directory that transformers loads back
with the same logits, and loaded again with `pretrained:`."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import RAY_CPUS
from multiproc import run_local
from raybig.cli import app
from raybig.data.datasets import load
from raybig.data.loader import memory_sources
from raybig.spec import parse_spec
from raybig.train.checkpoint import RunStore, load_trained_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
SEED, LR = 0, 3e-3


def job(out, name, data=1, pipeline=None, epochs=1, model=None, **train):
    return {
        "name": name,
        "model": model or {"kind": "hf", "config": LLAMA},
        "data": {"source": "text", "seq_len": 32, "max_chars": 24_000, "modules": ["textwrap"]},
        "train": {"epochs": epochs, "batch_size": 16, "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.0},
                  "seed": SEED, **train},
        "parallelism": {"data": data, "pipeline": pipeline or {"stages": 1}},
        "output": {"dir": str(out)},
    }


def step_losses(store_dir) -> np.ndarray:
    return np.concatenate([r["step_losses"] for r in RunStore(store_dir).history()])


def plain_transformers_losses(raw, steps: int) -> list[float]:
    """The reference: transformers' own model and loss in a plain loop over the batches raybig trains on."""
    spec = parse_spec(raw)
    bundle = load(spec.data)
    source, _ = memory_sources(spec, (bundle.train.x, bundle.train.y), (bundle.val.x, bundle.val.y), rank=0)
    torch.manual_seed(SEED)
    config = transformers.AutoConfig.for_model(**{**LLAMA, "vocab_size": bundle.meta.num_classes})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for x, y in source.train_batches(1):
        optimizer.zero_grad()
        loss = model(input_ids=x, labels=y, shift_labels=y).loss  # targets come shifted by the data
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == steps
    return losses


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-single")
    run_local(job(out, "one"), out / "one")
    return out / "one"


def test_one_process_reproduces_a_plain_transformers_loop(single):
    losses = step_losses(single)
    assert len(losses) >= 10
    np.testing.assert_allclose(losses, plain_transformers_losses(job(single, "one"), len(losses)), rtol=1e-4)


@pytest.mark.parametrize("data, pipeline", [(2, None), (1, {"stages": 2, "microbatches": 2, "schedule": "1f1b"})],
                         ids=["data2", "pipeline2"])
def test_data_and_pipeline_layouts_reproduce_one_process(tmp_path, single, data, pipeline):
    run_local(job(tmp_path, "p", data=data, pipeline=pipeline), tmp_path / "p")
    np.testing.assert_allclose(step_losses(tmp_path / "p"), step_losses(single), rtol=1e-4)
    from safetensors.torch import load_file

    mine, ref = load_file(tmp_path / "p" / "model.safetensors"), load_file(single / "model.safetensors")
    assert mine.keys() == ref.keys()  # stages reassemble into transformers' own names
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-3, atol=1e-5)


def test_the_finished_run_is_a_save_pretrained_directory_transformers_loads(single):
    hf_dir = single / "hf"
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, _ = load_trained_model(single)
    x = torch.as_tensor(load(parse_spec(job(single, "one")).data).val.x[:4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(x), rtol=1e-5, atol=1e-5)
        greedy = loaded.generate(x[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = x[:1, :8]
    for _ in range(8):  # the same greedy continuation from raybig's own model
        with torch.no_grad():
            tokens = torch.cat([tokens, ours(tokens)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, greedy)
    assert json.loads((hf_dir / "raybig_vocab.json").read_text())["vocab"] == info_vocab(single)


def info_vocab(run) -> str:
    return json.loads((run / "model.json").read_text())["data"]["vocab"]


def test_a_pretrained_directory_starts_where_its_run_ended(tmp_path, single):
    """`pretrained:` loads the weights transformers would: step 0's loss is transformers' loss on that batch."""
    raw = job(tmp_path, "tuned", model={"kind": "hf", "pretrained": str(single / "hf")}, epochs=1)
    run_local(raw, tmp_path / "tuned")
    first = step_losses(tmp_path / "tuned")[0]
    spec = parse_spec(raw)
    bundle = load(spec.data)
    source, _ = memory_sources(spec, (bundle.train.x, bundle.train.y), (bundle.val.x, bundle.val.y), rank=0)
    x, y = next(iter(source.train_batches(1)))
    model = transformers.AutoModelForCausalLM.from_pretrained(single / "hf")
    with torch.no_grad():
        expected = float(model(input_ids=x, labels=y, shift_labels=y).loss)
    assert first == pytest.approx(expected, rel=1e-6)
    assert first < step_losses(single)[0] - 0.5  # it starts trained, not from scratch


@pytest.mark.parametrize("model, path, expected", [
    ({"config": {**LLAMA, "hiden_size": 8}}, "model.config.hiden_size", "no setting 'hiden_size'"),
    ({"config": {**LLAMA, "model_type": "no-such"}}, "model.config.model_type", "no model type 'no-such'"),
    ({"config": {**LLAMA, "vocab_size": 7}}, "model.config.vocab_size", "vocabulary has"),
    ({"config": {"hidden_size": 8}}, "model", "set config.model_type"),
    ({"pretrained": "no/such/dir"}, "model.pretrained", "no/such/dir"),
])
def test_a_bad_hf_model_section_names_the_field(tmp_path, model, path, expected):
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job(tmp_path, "bad", model={"kind": "hf", **model})))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert path in result.output and expected in result.output, result.output
    assert "Traceback" not in result.output


def test_pipeline_stages_of_a_model_raybig_cannot_cut_are_refused_with_the_reason(tmp_path):
    import yaml

    gpt2 = {"kind": "hf", "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}}
    tied = {"kind": "hf", "config": {**LLAMA, "tie_word_embeddings": True}}
    for model, reason in [(gpt2, "not a Llama-style decoder"), (tied, "tie_word_embeddings: false")]:
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(job(tmp_path, "pp", model=model, pipeline={"stages": 2, "microbatches": 2})))
        result = CliRunner().invoke(app, ["validate", str(spec)])
        assert result.exit_code == 2 and "parallelism.pipeline.stages" in result.output, result.output
        assert reason in result.output, result.output
        spec.write_text(yaml.safe_dump(job(tmp_path, "dp", model=model, data=2)))
        assert CliRunner().invoke(app, ["validate", str(spec)]).exit_code == 0  # it still trains data-parallel


@pytest.mark.ray
def test_a_tied_gpt2_trains_data_parallel_on_ray_workers(ray_local, tmp_path):
    """Real transformers models through real Ray workers: GPT-2's tied embedding and head are checkpointed
    (once per name) and the run's save_pretrained directory loads back."""
    from raybig.train.runner import run

    gpt2 = {"kind": "hf", "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                     "n_positions": 64}}
    outcome = run(parse_spec(job(tmp_path, "gpt2", data=2, epochs=2, model=gpt2)), num_cpus=RAY_CPUS)
    history = outcome.history
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["val_loss"] < history[0]["step_losses"][0]
    assert history[-1]["val_perplexity"] == pytest.approx(np.exp(history[-1]["val_loss"]), rel=1e-6)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(outcome.store.root / "hf",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied


def test_model_config_paths_are_sweepable_and_a_bad_value_stops_the_sweep_before_it_starts(tmp_path):
    import yaml

    from raybig.sweep.space import trial_spec

    good = {**job(tmp_path, "sw"), "sweep": {"space": {"model.config.hidden_size": {"choice": [32, 64]},
                                                       "model.config.num_hidden_layers": {"randint": [1, 3]}}}}
    spec = parse_spec(good)
    trial = trial_spec(good, {"model.config.hidden_size": 64, "model.config.num_hidden_layers": 1}, "t", str(tmp_path))
    assert trial.model.config["hidden_size"] == 64 and trial.model.config["num_attention_heads"] == 4
    from raybig.data.datasets import describe
    from raybig.models import build_model

    assert build_model(trial.model, describe(trial.data)).hf.config.num_hidden_layers == 1
    assert spec.sweep.space["model.config.hidden_size"].choice == [32, 64]
    bad = {**good, "sweep": {"space": {"model.config.hidden_size": {"choice": [32, 30]}}}}  # 30 heads of 4 do not divide
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    assert "sweep.space.model.config.hidden_size" in result.output and "30" in result.output, result.output
    assert not (tmp_path / "sw").exists()
