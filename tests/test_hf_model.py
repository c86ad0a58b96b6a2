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
from raybig.data.loader import rank_sources
from raybig.errors import SpecError
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
    source, _ = rank_sources(spec, bundle.train, bundle.val, rank=0)
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
    record = RunStore(single).history()[0]
    assert record["tokens_per_s"] == pytest.approx(record["samples_per_s"] * 32)  # seq_len 32
    assert record["val_perplexity"] == pytest.approx(np.exp(record["val_loss"]))
    np.testing.assert_allclose(losses, plain_transformers_losses(job(single, "one"), len(losses)), rtol=1e-4)


@pytest.mark.parametrize("data, pipeline, mode, tensor", [
    (2, None, "ddp", 1), (2, None, "fsdp", 1), (1, {"stages": 2, "microbatches": 2, "schedule": "1f1b"}, "ddp", 1),
    (1, None, "ddp", 2)], ids=["data2", "fsdp data2", "pipeline2", "tensor2"])
def test_data_pipeline_and_tensor_layouts_reproduce_one_process(tmp_path, single, data, pipeline, mode, tensor):
    raw = job(tmp_path, "p", data=data, pipeline=pipeline)
    raw["parallelism"]["data_mode"] = mode  # fsdp: each decoder layer is its own shard unit
    raw["parallelism"]["tensor"] = tensor  # from the config's own plan: q, k, v, gate, up by columns; o, down by rows
    run_local(raw, tmp_path / "p")
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
    vocab = info_vocab(single)
    assert json.loads((hf_dir / "raybig_vocab.json").read_text())["vocab"] == vocab
    # its tokenizer: the run's characters, so transformers alone turns text into the ids raybig trained on
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "".join(vocab[i] for i in x[0].tolist())
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == x[0].tolist()
    assert tokenizer.decode(greedy[0]) == "".join(vocab[i] for i in greedy[0].tolist())
    from raybig.data.chat import render_chat

    chat = [{"role": "user", "content": "def f"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        render_chat(json.loads((single / "model.json").read_text())["chat_template"], chat)


def info_vocab(run) -> str:
    return json.loads((run / "model.json").read_text())["data"]["vocab"]


def test_a_pretrained_directory_starts_where_its_run_ended(tmp_path, single):
    """`pretrained:` loads the weights transformers would: step 0's loss is transformers' loss on that batch."""
    raw = job(tmp_path, "tuned", model={"kind": "hf", "pretrained": str(single / "hf")}, epochs=1)
    run_local(raw, tmp_path / "tuned")
    first = step_losses(tmp_path / "tuned")[0]
    spec = parse_spec(raw)
    bundle = load(spec.data)
    source, _ = rank_sources(spec, bundle.train, bundle.val, rank=0)
    x, y = next(iter(source.train_batches(1)))
    model = transformers.AutoModelForCausalLM.from_pretrained(single / "hf")
    with torch.no_grad():
        expected = float(model(input_ids=x, labels=y, shift_labels=y).loss)
    assert first == pytest.approx(expected, rel=1e-6)
    assert first < step_losses(single)[0] - 0.5  # it starts trained, not from scratch


def test_lora_trains_only_the_adapters_data_parallel_and_publishes_the_merged_model(tmp_path, single):
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = {"kind": "hf", "pretrained": str(single / "hf"), "lora": lora}
    for name, data in [("one", 1), ("dp2", 2)]:
        run_local(job(tmp_path, name, data=data, model=model), tmp_path / name)
    np.testing.assert_allclose(step_losses(tmp_path / "dp2"), step_losses(tmp_path / "one"), rtol=1e-4)
    checkpoint = load_file(next((tmp_path / "dp2" / "checkpoints").glob("epoch-*/model.safetensors")))
    assert sorted(checkpoint) and all(".lora_" in key for key in checkpoint)  # the adapters alone
    assert len(checkpoint) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)

    base, merged = load_file(single / "model.safetensors"), load_file(tmp_path / "dp2" / "model.safetensors")
    assert merged.keys() == base.keys()  # published under the base model's own names
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    # peft's own merge of the checkpointed adapters into the pretrained model gives the published weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(single / "hf")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), reference)
    missing = reference.load_state_dict(checkpoint, strict=False).missing_keys
    assert not any(".lora_" in key for key in missing)
    for module in reference.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    torch.testing.assert_close(reference.model.layers[1].self_attn.v_proj.base_layer.weight,
                               merged["model.layers.1.self_attn.v_proj.weight"], rtol=1e-5, atol=1e-6)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dp2" / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_lora_with_pipeline_stages_is_refused():
    with pytest.raises(SpecError) as err:
        parse_spec(job("/tmp", "x", model={"kind": "hf", "config": LLAMA, "lora": {"r": 2}},
                       pipeline={"stages": 2, "microbatches": 2}))
    assert err.value.problems[0][0] == "parallelism.pipeline.stages" and "LoRA" in err.value.problems[0][1]


@pytest.fixture(scope="module")
def token_classes(tmp_path_factory):
    """Parquet columns of token ids (1..15, never the pad id 0) and a class that depends on the first token."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 16, size=(320, 12))
    path = tmp_path_factory.mktemp("tokens") / "tokens.parquet"
    pq.write_table(pa.table({**{f"t{i}": tokens[:, i] for i in range(12)}, "label": tokens[:, 0] % 3}), path)
    return str(path)


def classifier_job(out, name, data_path, data=1, pipeline=None):
    raw = job(out, name, data=data, pipeline=pipeline,
              model={"kind": "hf", "task": "sequence_classification", "config": {**LLAMA, "vocab_size": 16}})
    return {**raw, "data": {"source": "parquet", "path": data_path, "label": "label"}}


def test_sequence_classification_layouts_reproduce_transformers_on_token_ids(tmp_path, token_classes):
    runs = {}
    # data parallelism is the causal LM's (above); the pipeline's last stage here pools and scores
    for name, pipeline in [("one", None), ("pp2", {"stages": 2, "microbatches": 4, "schedule": "gpipe"})]:
        run_local(classifier_job(tmp_path, name, token_classes, 1, pipeline), tmp_path / name)
        runs[name] = step_losses(tmp_path / name)
    np.testing.assert_allclose(runs["pp2"], runs["one"], rtol=1e-4)

    spec = parse_spec(classifier_job(tmp_path, "one", token_classes))
    bundle = load(spec.data)
    source, _ = rank_sources(spec, bundle.train, bundle.val, rank=0)
    torch.manual_seed(SEED)
    config = transformers.AutoConfig.for_model(**{**LLAMA, "vocab_size": 16, "num_labels": 3, "pad_token_id": 0})
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    plain = []
    for x, y in source.train_batches(1):
        optimizer.zero_grad()
        loss = model(input_ids=x.long(), labels=y).loss
        loss.backward()
        optimizer.step()
        plain.append(loss.item())
    np.testing.assert_allclose(runs["one"], plain, rtol=1e-4)
    ours, _ = load_trained_model(tmp_path / "one")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "one" / "hf", pad_token_id=0)
    x = torch.as_tensor(bundle.val.x[:8]).long()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(x), rtol=1e-5, atol=1e-5)


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


def test_stop_strings_end_a_continuation_and_are_left_out():
    from raybig.serve.generation import text_stream

    def run(text, stop):
        pieces = list(text_stream(iter(text), stop))
        return "".join(t for t, _ in pieces), pieces[-1][1]

    assert run("abcdef", ("cd",)) == ("ab", "stop")
    assert run("abcdef", ("x", "ef", "bc")) == ("a", "stop")  # the earliest stop string wins
    assert run("abcdef", ("zz",)) == ("abcdef", "length")
    assert run("abcdef", ()) == ("abcdef", "length")


# ----------------------------------------------------------------------------- OpenAI-compatible serving
@pytest.fixture(scope="module")
def served(ray_local, single):
    from ray import serve

    from raybig.serve.app import entry_from_arg, start

    url = start([entry_from_arg(str(single))], "127.0.0.1", 8439)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(single):
    """transformers' own greedy decoding of the run's save_pretrained directory, in characters."""
    model = transformers.AutoModelForCausalLM.from_pretrained(single / "hf")
    vocab = json.loads((single / "hf" / "raybig_vocab.json").read_text())["vocab"]

    def greedy(prompt: str, tokens: int) -> str:
        ids = torch.tensor([[vocab.index(c) for c in prompt]])
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return "".join(vocab[i] for i in out[0, ids.shape[1]:].tolist())

    return greedy


def openai_client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.ray
def test_the_openai_client_completes_streamed_and_not_as_transformers_decodes(served, reference):
    client = openai_client(served)
    prompt = "def wrap(text"
    expected = reference(prompt, 12)
    done = client.completions.create(model="one", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.model == "one" and done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="one", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    stop = expected[4:6]
    cut = client.completions.create(model="one", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="one", prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.9,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 12  # a seed makes sampling repeatable


@pytest.mark.ray
def test_chat_completions_go_through_the_runs_chat_template(served, reference, single):
    from raybig.data.chat import render_chat

    client = openai_client(served)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def fill("}]
    template = json.loads((single / "model.json").read_text())["chat_template"]
    assert (single / "hf" / "chat_template.jinja").read_text() == template
    expected = reference(render_chat(template, messages), 8)
    done = client.chat.completions.create(model="one", messages=messages, max_tokens=8, temperature=0)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == expected
    stream = client.chat.completions.create(model="one", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


@pytest.mark.ray
@pytest.mark.parametrize("request_args, status, says", [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"prompt": "€uro"}, 400, "never saw"),
    ({"model": "nobody"}, 404, "no model named 'nobody'"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
])
def test_a_bad_completion_request_gets_openais_error_shape_and_the_server_stays_healthy(served, request_args,
                                                                                         status, says):
    import openai
    import urllib.request

    client = openai_client(served)
    args = {"model": "one", "prompt": "def ", "max_tokens": 4, **request_args}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**args)
    assert err.value.status_code == status and says in err.value.message, err.value.message
    assert set(err.value.body) >= {"message", "type", "param", "code"}  # OpenAI's error object
    with urllib.request.urlopen(f"{served}/healthz", timeout=10) as health:
        assert json.loads(health.read())["status"] == "ok"
    assert client.completions.create(model="one", prompt="def ", max_tokens=2, temperature=0).choices[0].text
