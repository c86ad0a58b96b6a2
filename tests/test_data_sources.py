"""Your data: text files, JSONL (text, prompt/completion, chat), CSV, Parquet, a `datasets` directory and image
folders; tokenizers (a tokenizer.json, a BPE trained once and cached); bad data named by file, row and field;
a language model's metrics. No Ray here: the data is read where `raybig run` reads it, and trained through
the one loop in this process."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from raybig.data import datasets, samples
from raybig.data.datasets import load
from raybig.data.documents import IGNORE, Document, chat_document, split_documents
from raybig.data.files import BadRow
from raybig.data.loader import MemorySource
from raybig.data.tokenizer import TOKENIZER_FILE
from raybig.errors import SpecError
from raybig.spec import parse_spec
from raybig.train.checkpoint import RunStore, load_trained_model
from raybig.train.loop import WorkerEnv, fit

LM = {"kind": "transformer", "task": "lm", "dim": 32, "heads": 2, "layers": 1}
CLASSIFIER = {"kind": "mlp", "hidden": [32]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The example data of every kind, as `python -m raybig.data.samples` writes it for jobs/."""
    root = tmp_path_factory.mktemp("data")
    docs = samples.docstrings()
    samples.write_text(root, docs)
    samples.write_tables(root, docs)
    samples.write_images(root, per_class=12)
    samples.write_hf_disk(root, docs)
    return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own tokenizer cache, and no data set read by an earlier test reused."""
    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))
    datasets._read.cache_clear()


def bundle_of(data_section, model=LM):
    spec = parse_spec({"name": "x", "model": model, "data": data_section})
    return load(spec.data, spec.model), spec


def stream(split):
    """The token stream a split's windows were cut from: the windows, then the last target."""
    return np.concatenate([split.x.reshape(-1), split.y[-1:, -1]])


def spec_error(data_section, model=LM) -> SpecError:
    with pytest.raises(SpecError) as info:
        bundle_of(data_section, model)
    return info.value


# ----------------------------------------------------------------------------- documents and tokenizers
@pytest.mark.parametrize("document", ["file", "line"])
def test_a_folder_of_text_splits_into_whole_documents(data, document):
    bundle, _ = bundle_of({"source": "text", "path": str(data / "docs"), "document": document, "seq_len": 16})
    files = sorted((data / "docs").glob("*.txt"))
    texts = [f.read_text() for f in files]
    docs = texts if document == "file" else [line for t in texts for line in t.splitlines() if line.strip()]
    vocab = bundle.meta.vocab
    decoded = {name: "".join(vocab[i] for i in stream(getattr(bundle, name))) for name in ("train", "val")}
    # whole documents to validation (a fifth, chosen with the split's seed), each split the documents in file
    # order, each followed by the separator (the char tokenizer's newline), cut into windows
    train, val = split_documents([Document([(d, True)]) for d in docs], 0.2, datasets.SPLIT_SEED)
    assert len(val) == round(len(docs) * 0.2) and len(train) + len(val) == len(docs)
    for name, split in (("train", train), ("val", val)):
        whole = "".join(d.text + "\n" for d in split)
        assert decoded[name] == whole[: len(decoded[name])] and len(whole) - len(decoded[name]) <= 16
    assert bundle.meta.task == "lm" and bundle.meta.num_classes == len(vocab)


def test_bpe_is_trained_on_the_training_documents_once_then_taken_from_the_cache(data, tmp_path):
    section = {"source": "jsonl", "path": str(data / "docs.jsonl"), "seq_len": 32,
               "tokenizer": {"train": "bpe", "vocab_size": 600}}
    bundle, _ = bundle_of(section)
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))
    assert len(cached) == 1 and bundle.meta.num_classes == 600 and bundle.meta.eos_token == "<|endoftext|>"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cached[0]))
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = [json.loads(line)["text"] for line in (data / "docs.jsonl").read_text().splitlines()]
    # the stream is the documents' tokens, each document ended by the end-of-text token
    train = stream(bundle.train).tolist()
    ends = [i for i, t in enumerate(train) if t == eos]
    first = tokenizer.decode(train[: ends[0]], skip_special_tokens=False)
    assert first in rows and len(ends) >= 0.7 * len(rows) * 0.8
    stamp = cached[0].stat().st_mtime_ns
    datasets._read.cache_clear()
    again, _ = bundle_of(section)
    assert cached[0].stat().st_mtime_ns == stamp and again.meta.tokenizer == bundle.meta.tokenizer
    np.testing.assert_array_equal(again.train.x, bundle.train.x)
    # other text is another tokenizer, trained and cached beside the first
    datasets._read.cache_clear()
    edited = tmp_path / "edited.jsonl"
    edited.write_text((data / "docs.jsonl").read_text().replace("Return", "Give back"))
    other, _ = bundle_of({**section, "path": str(edited)})
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))) == 2
    assert other.meta.tokenizer != bundle.meta.tokenizer


def test_a_tokenizer_json_from_a_directory_gives_its_own_ids(data, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([(data / "docs" / "textwrap.txt").read_text()],
                                  trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "</s>"],
                                                      show_progress=False))
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / TOKENIZER_FILE))
    text = (data / "docs" / "difflib.txt").read_text()
    one_file = {"source": "text", "path": str(data / "docs" / "difflib.txt"), "seq_len": 16,
                "tokenizer": {"path": str(tmp_path / "tok")}}
    bundle, _ = bundle_of(one_file)
    # one document: the training split is its head, the validation split its tail
    ids = tokenizer.encode(text[: int(len(text) * 0.8)], add_special_tokens=False).ids
    assert stream(bundle.train).tolist() == (ids + [tokenizer.token_to_id("</s>")])[: len(stream(bundle.train))]
    assert bundle.meta.eos_token == "</s>" and bundle.meta.num_classes == tokenizer.get_vocab_size()
    datasets._read.cache_clear()
    err = spec_error({**one_file, "tokenizer": {"path": str(tmp_path / "tok"), "eos_token": "<eot>"}})
    assert err.problems[0][0] == "data.tokenizer.eos_token" and "<eot>" in err.problems[0][1]
    assert spec_error({**one_file, "tokenizer": {"path": str(tmp_path)}}).problems[0][0] == "data.tokenizer.path"


def test_prompt_completion_rows_train_on_the_completion_only(tmp_path):
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}? ", "completion": f"It is {2 * i}."} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle, _ = bundle_of({"source": "jsonl", "path": str(tmp_path / "qa.jsonl"), "format": "prompt_completion",
                           "seq_len": 8})
    vocab = bundle.meta.vocab
    for split in (bundle.train, bundle.val):
        targets = "".join(vocab[t] for t in split.y.reshape(-1) if t != IGNORE)
        inputs = "".join(vocab[t] for t in split.x.reshape(-1))
        answers = [r["completion"] + "\n" for r in rows if r["prompt"] in inputs]
        # what the loss is on: each answer and the end of its document, nothing of the prompts
        assert targets.startswith("".join(answers)[: len(targets) - 20]) and len(targets) > 0.9 * len("".join(answers))
        assert "what is" not in targets


def test_a_chat_trains_on_the_assistants_turns_under_the_template():
    from raybig.data.chat import DEFAULT_CHAT_TEMPLATE

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    doc = chat_document(DEFAULT_CHAT_TEMPLATE, messages)
    assert [text for text, trained in doc.segments if trained] == ["Hello.\n", "Goodbye.\n"]
    assert doc.text == "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Bye\nassistant: Goodbye.\n"
    shuffled = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"  # not rendered turn by turn
    with pytest.raises(BadRow, match="turn by turn"):
        chat_document(shuffled, messages)
    assert isinstance(doc, Document)


def test_a_table_text_column_and_a_datasets_directory_are_documents(data):
    parquet, _ = bundle_of({"source": "parquet", "path": str(data / "docs.parquet"), "field": "text", "seq_len": 16})
    datasets._read.cache_clear()
    hf, _ = bundle_of({"source": "hf_disk", "path": str(data / "docs_hf"), "field": "text", "seq_len": 16})
    import datasets as hf_datasets

    saved = hf_datasets.load_from_disk(str(data / "docs_hf"))
    vocab = hf.meta.vocab
    val_text = "".join(vocab[t] for t in stream(hf.val))
    # the DatasetDict's validation split is the validation data, whole and in order
    assert val_text == "".join(t + "\n" for t in saved["validation"]["text"])[: len(val_text)]
    assert len(val_text) > 0.95 * sum(len(t) + 1 for t in saved["validation"]["text"])
    assert parquet.meta.task == hf.meta.task == "lm"
    err = spec_error({"source": "parquet", "path": str(data / "docs.parquet"), "field": "body"})
    assert err.problems[0][0] == "data.field" and "text" in err.problems[0][1]  # the columns it has


def test_local_files_through_datasets_builders_read_as_raybigs_own_sources_do(data):
    """hf_disk with builder: json and csv files loaded by datasets' own builders give the same windows and
    rows as the jsonl and csv sources; a file the builder cannot parse is named, exit 2 style."""
    own, _ = bundle_of({"source": "jsonl", "path": str(data / "docs.jsonl"), "seq_len": 16})
    datasets._read.cache_clear()
    built, _ = bundle_of({"source": "hf_disk", "builder": "json", "path": str(data / "docs.jsonl"), "field": "text",
                          "seq_len": 16})
    np.testing.assert_array_equal(built.train.x, own.train.x)
    np.testing.assert_array_equal(built.val.y, own.val.y)
    table = {"path": str(data / "digits.csv"), "label": "label"}
    csv, _ = bundle_of({"source": "csv", **table}, CLASSIFIER)
    datasets._read.cache_clear()
    built, _ = bundle_of({"source": "hf_disk", "builder": "csv", **table}, CLASSIFIER)
    np.testing.assert_array_equal(built.train.x, csv.train.x)
    np.testing.assert_array_equal(built.val.y, csv.val.y)
    err = spec_error({"source": "hf_disk", "builder": "parquet", "path": str(data / "docs.jsonl"), "field": "text"})
    assert err.problems[0][0] == "data.path" and "docs.jsonl" in err.problems[0][1]


# ----------------------------------------------------------------------------- tables and images
def test_a_csv_with_class_names_trains_a_classifier(data, tmp_path):
    bundle, _ = bundle_of({"source": "csv", "path": str(data / "digits.csv"), "shape": [8, 8]}, CLASSIFIER)
    assert bundle.meta.labels == sorted(samples.DIGIT_NAMES) and bundle.meta.num_classes == 10
    assert bundle.train.x.shape[1:] == (8, 8) and len(bundle.train) + len(bundle.val) == datasets.DIGITS_ROWS
    digits, _ = bundle_of({"source": "digits"}, CLASSIFIER)
    pixels = np.concatenate([bundle.train.x, bundle.val.x]).reshape(-1, 64)
    expected = np.concatenate([digits.train.x, digits.val.x]).reshape(-1, 64)
    np.testing.assert_allclose(np.sort(pixels @ np.arange(64)), np.sort(expected @ np.arange(64)), atol=1e-3)
    lines = (data / "digits.csv").read_text().splitlines()
    (tmp_path / "ragged.csv").write_text("\n".join([*lines[:5], "0.5,0.25,one", *lines[5:40]]) + "\n")
    section = {"source": "csv", "path": str(tmp_path / "ragged.csv")}
    datasets._read.cache_clear()
    err = spec_error(section, CLASSIFIER)
    assert err.problems[0][0] == "data.path" and "ragged.csv: line 6: 3 values, expected 65" in str(err)
    datasets._read.cache_clear()
    skipped, _ = bundle_of({**section, "on_error": "skip"}, CLASSIFIER)
    assert skipped.meta.skipped_rows == 1 and len(skipped.train) + len(skipped.val) == 39  # the header and 39 rows kept


def test_an_image_folder_decodes_at_its_own_size_and_augments_the_same_for_any_rank_split(data, tmp_path):
    bundle, spec = bundle_of({"source": "image_folder", "path": str(data / "digits_images"),
                              "augment": {"flip": True, "crop_padding": 2}}, {"kind": "cnn"})
    assert bundle.meta.shape == [1, 8, 8] and bundle.meta.labels == sorted(samples.DIGIT_NAMES)
    assert bundle.train.x.min() >= 0 and bundle.train.x.max() <= 1 and bundle.train.x.max() > 0.9
    from raybig.data.loader import rank_sources

    def batches(rank, world):
        raw = spec.model_dump(mode="json")
        raw["parallelism"]["data"] = world
        source, _ = rank_sources(parse_spec(raw), bundle.train, bundle.val,
                                   rank)
        return list(source.train_batches(epoch=1))

    whole = batches(0, 1)
    halves = zip(batches(0, 2), batches(1, 2))
    for (x, _), ((x0, _), (x1, _)) in zip(whole, halves):
        torch.testing.assert_close(x, torch.cat([x0, x1]))
    plain = MemorySource(bundle.train.x, bundle.train.y, spec.train.batch_size, 0, 1, spec.train.seed)
    unchanged = [bool(torch.equal(a, b)) for (x, _), (p, _) in zip(whole, plain.train_batches(epoch=1))
                 for a, b in zip(x, p)]
    assert sum(unchanged) < len(unchanged) / 4  # most images were flipped or moved
    datasets._read.cache_clear()
    resized, _ = bundle_of({"source": "image_folder", "path": str(data / "digits_images"), "size": [12, 10],
                            "channels": 3}, {"kind": "cnn"})
    assert resized.meta.shape == [3, 12, 10]


def test_bad_images_are_named_and_can_be_skipped(data, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "images"
    shutil.copytree(data / "digits_images", root)
    (root / "one" / "broken.png").write_bytes(b"not a png at all")
    section = {"source": "image_folder", "path": str(root)}
    err = spec_error(section, {"kind": "cnn"})
    assert err.problems[0][0] == "data.path" and "broken.png" in str(err)
    datasets._read.cache_clear()
    skipped, _ = bundle_of({**section, "on_error": "skip"}, {"kind": "cnn"})
    assert skipped.meta.skipped_rows == 1
    (root / "one" / "broken.png").unlink()
    Image.new("L", (9, 9)).save(root / "two" / "big.png")
    datasets._read.cache_clear()
    err = spec_error(section, {"kind": "cnn"})
    assert err.problems[0][0] == "data.size" and "big.png is 9x9" in str(err)


# ----------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("case, field, words", [
    ("missing", "data.path", "no such file or directory"),
    ("glob", "data.path", "matches no files"),
    ("bad_json", "data.path", "bad.jsonl:2: not JSON"),
    ("no_field", "data.field", "bad.jsonl:1: no field 'text' (fields: body)"),
    ("not_utf8", "data.path", "latin.txt: line 2: not UTF-8 text"),
    ("empty", "data.path", "no documents"),
    ("no_answer", "data.completion_field", "bad.jsonl:1: no field 'completion'"),
])
def test_bad_text_data_is_named_by_file_row_and_field(tmp_path, case, field, words):
    bad = tmp_path / "bad.jsonl"
    sections = {
        "missing": {"source": "text", "path": str(tmp_path / "nowhere")},
        "glob": {"source": "text", "path": str(tmp_path / "*.md")},
        "bad_json": {"source": "jsonl", "path": str(bad)},
        "no_field": {"source": "jsonl", "path": str(bad)},
        "not_utf8": {"source": "text", "path": str(tmp_path / "latin.txt")},
        "empty": {"source": "text", "path": str(tmp_path / "empty"), "document": "line"},
        "no_answer": {"source": "jsonl", "path": str(bad), "format": "prompt_completion"},
    }
    bad.write_text({"bad_json": '{"text": "fine"}\n{"text": oops}\n', "no_field": '{"body": "x"}\n',
                    "no_answer": '{"prompt": "x"}\n'}.get(case, '{"text": "x"}\n'))
    (tmp_path / "latin.txt").write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    err = spec_error(sections[case])
    assert err.problems[0][0] == field and words in err.problems[0][1], err.problems


def test_bad_rows_can_be_skipped_and_are_counted_in_the_metrics(tmp_path):
    rows = [json.dumps({"text": f"line number {i} of the corpus, long enough to train on."}) for i in range(60)]
    rows[3], rows[17] = "{broken", json.dumps({"other": 1})
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    section = {"source": "jsonl", "path": str(tmp_path / "rows.jsonl"), "seq_len": 16, "on_error": "skip"}
    history, _, _ = train_in_process(tmp_path, section)
    assert all(record["skipped_rows"] == 2 for record in history)


def test_validate_names_bad_data_with_exit_2_and_no_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    job = {"name": "x", "model": LM, "data": {"source": "jsonl", "path": str(tmp_path / "bad.jsonl")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    proc = subprocess.run([sys.executable, "-m", "raybig", "validate", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.path" in proc.stderr and "bad.jsonl:2: a JSON list, expected an object" in proc.stderr


# ----------------------------------------------------------------------------- a language model's metrics
def train_in_process(tmp_path, data_section, model=LM, epochs=1, **train):
    spec = parse_spec({"name": "x", "model": model, "data": data_section,
                       "train": {"epochs": epochs, "batch_size": 16, "seed": 0, **train}})
    bundle = load(spec.data, spec.model)
    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 16, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 16, 0, 1, 0))
    store = RunStore(tmp_path / "run")
    return fit(spec, bundle.meta, env, store), store, bundle


def test_a_language_model_reports_perplexity_and_token_accuracy_over_the_trained_targets(data, tmp_path):
    section = {"source": "jsonl", "path": str(data / "qa.jsonl"), "format": "prompt_completion", "seq_len": 32,
               "tokenizer": {"train": "bpe", "vocab_size": 400}}
    history, store, bundle = train_in_process(tmp_path, section, epochs=2)
    record = history[-1]
    assert record["val_perplexity"] == pytest.approx(math.exp(record["val_loss"]))
    assert record["tokens_per_s"] == pytest.approx(record["samples_per_s"] * 32)
    assert not {"val_accuracy", "val_precision", "val_recall", "val_f1"} & record.keys()
    model, info = load_trained_model(store.root)
    assert info["data"]["tokenizer"] == bundle.meta.tokenizer
    with torch.no_grad():
        logits = model(torch.as_tensor(bundle.val.x))
    y = torch.as_tensor(bundle.val.y)
    counted = y != IGNORE
    accuracy = float((logits.argmax(-1) == y)[counted].float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    assert record["val_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert record["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert 0 < counted.float().mean() < 1  # the prompts' targets were left out


def test_a_hugging_face_model_on_chats_keeps_its_tokenizer_and_template_for_transformers(data, tmp_path):
    import transformers

    from raybig.data.chat import render_chat

    llama = {"kind": "hf", "task": "causal_lm",
             "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}}
    section = {"source": "jsonl", "path": str(data / "chat.jsonl"), "format": "chat", "seq_len": 32,
               "tokenizer": {"train": "bpe", "vocab_size": 400}}
    _, store, bundle = train_in_process(tmp_path, section, model=llama)
    hf_dir = store.root / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(bundle.meta.extra["tokenizer_json"])
    text = (data / "docs" / "textwrap.txt").read_text()[:500]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
    assert tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == bundle.meta.num_classes
    chat = [{"role": "user", "content": "What does textwrap.dedent do?"}]
    template = json.loads((store.root / "model.json").read_text())["chat_template"]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == render_chat(template, chat)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model, _ = load_trained_model(store.root)
    x = torch.as_tensor(bundle.val.x[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_a_regression_on_a_numeric_column_reports_mse_and_mae(data, tmp_path):
    section = {"source": "csv", "path": str(data / "diabetes.csv"), "label": "progression", "task": "regression"}
    spec = parse_spec({"name": "x", "model": CLASSIFIER, "data": section,
                       "sweep": {"space": {"train.optimizer.lr": {"choice": [1e-3, 1e-2]}}}})
    assert spec.train.loss == "mse" and spec.sweep.metric == "val_loss"  # a regression's defaults
    history, store, bundle = train_in_process(tmp_path, section, model=CLASSIFIER, epochs=20,
                                              optimizer={"name": "adam", "lr": 1e-2})
    assert bundle.meta.task == "regression" and bundle.meta.num_classes == 1 and bundle.val.y.dtype == np.float32
    record = history[-1]
    assert not {"val_accuracy", "val_precision", "val_recall", "val_f1"} & record.keys()
    model, _ = load_trained_model(store.root)
    with torch.no_grad():
        predicted = model(torch.as_tensor(bundle.val.x)).reshape(-1).double()
    error = predicted - torch.as_tensor(bundle.val.y).double()
    assert record["val_mse"] == pytest.approx(float(error.pow(2).mean()), rel=1e-6) == record["val_loss"]
    assert record["val_mae"] == pytest.approx(float(error.abs().mean()), rel=1e-6)
    baseline = float(((bundle.val.y - bundle.train.y.mean()) ** 2).mean())  # predicting the mean
    assert record["val_mse"] < 0.8 * baseline
    err = spec_error({"source": "csv", "path": str(data / "digits.csv"), "task": "regression"}, CLASSIFIER)
    assert err.problems[0][0] == "data.label" and "predicts a number" in str(err)
    with pytest.raises(SpecError, match="train.loss: a regression trains with mse"):
        parse_spec({"name": "x", "model": CLASSIFIER, "data": section, "train": {"loss": "cross_entropy"}})


def test_tokenized_windows_are_cached_by_the_files_contents_and_reused(data, tmp_path, monkeypatch):
    import shutil

    from raybig.data import language

    corpus = tmp_path / "corpus"
    shutil.copytree(data / "docs", corpus)
    section = {"source": "text", "path": str(corpus), "seq_len": 32, "tokenizer": {"train": "bpe", "vocab_size": 500}}
    first, _ = bundle_of(section)

    def entries():
        return sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())

    assert len(entries()) == 1
    # moved elsewhere, the same files are the same windows: read back, neither parsed nor tokenized
    moved = tmp_path / "moved"
    corpus.rename(moved)

    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(language, "_tokenized", no_tokenizing)
    datasets._read.cache_clear()
    again, _ = bundle_of({**section, "path": str(moved)})
    np.testing.assert_array_equal(again.train.x, first.train.x)
    np.testing.assert_array_equal(again.val.y, first.val.y)
    assert again.meta.extra["tokenizer_json"] == first.meta.extra["tokenizer_json"] and len(entries()) == 1
    # an edited file, or other settings, are other windows
    monkeypatch.undo()
    monkeypatch.setenv("RAYBIG_CACHE", str(tmp_path / "cache"))
    (moved / "heapq.txt").write_text((moved / "heapq.txt").read_text() + "\nOne more line.\n")
    for changed in ({**section, "path": str(moved)}, {**section, "path": str(moved), "seq_len": 16}):
        datasets._read.cache_clear()
        bundle_of(changed)
    assert len(entries()) == 3


def test_stream_is_refused_for_text_it_cannot_cut_into_pieces():
    err = spec_error({"source": "text", "loader": "stream"})  # the standard-library demo corpus
    assert err.problems[0][0] == "data.loader" and "data.path" in err.problems[0][1]
    err = spec_error({"source": "hf_disk", "path": "examples", "builder": "json", "field": "text", "loader": "stream"})
    assert err.problems[0][0] == "data.loader" and "source jsonl" in err.problems[0][1]
