"""Tokens per second delivered to the 2 ranks of a data-parallel run: raybig's text pipeline (read the JSONL,
tokenize, pack into windows, each rank its slice of every global batch) against the plain Hugging Face way
(`datasets.load_dataset("json")`, `.map(tokenize)`, `.map(group_texts)` as transformers' run_clm.py packs,
then one `DataLoader` per rank over `dataset.shard(2, rank)`), on the same corpus with the same
tokenizer.json, in one run. Each side is timed cold (an empty cache: everything is tokenized) and warm (its
cache filled by the cold pass: raybig's token cache, datasets' map cache). Both ranks are drained in this
process one after the other, for both sides alike: what is measured is the pipeline, not the transport.

    python benchmarks/data_pipeline.py [--copies 20] [--seq-len 128] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def corpus(root: Path, copies: int) -> Path:
    """Python's docstrings, `copies` times over (each copy numbered, so no two documents are the same)."""
    from raybig.data.samples import docstrings

    rows = [doc for entries in docstrings().values() for _, doc in entries]
    path = root / "corpus.jsonl"
    with path.open("w") as f:
        for copy in range(copies):
            for row in rows:
                f.write(json.dumps({"text": f"{row}\n(copy {copy})"}) + "\n")
    return path


def tokenizer_dir(root: Path, path: Path) -> Path:
    """One BPE for both sides, saved as a tokenizer.json directory."""
    from raybig.data.tokenizer import trained_bpe

    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    out = root / "tokenizer"
    out.mkdir()
    (out / "tokenizer.json").write_text(trained_bpe(texts[:2000], 4096, None).to_json())
    return out


def raybig_pass(path: Path, tokenizer: Path, seq_len: int, batch: int) -> tuple[int, float]:
    from raybig.data import datasets
    from raybig.data.loader import MemorySource
    from raybig.spec import parse_spec

    datasets._read.cache_clear()  # what a new run's process starts with: only what is on disk
    started = time.perf_counter()
    spec = parse_spec({"name": "b", "model": {"kind": "transformer", "task": "lm"},
                       "data": {"source": "jsonl", "path": str(path), "seq_len": seq_len,
                                "tokenizer": {"path": str(tokenizer)}}, "train": {"batch_size": batch}})
    bundle = datasets.load(spec.data)
    tokens = 0
    for rank in (0, 1):
        for x, y in MemorySource(bundle.train.x, bundle.train.y, batch, rank, 2, 0).train_batches(1):
            tokens += x.numel()
    return tokens, time.perf_counter() - started


def plain_pass(path: Path, tokenizer: Path, seq_len: int, batch: int, cache: Path) -> tuple[int, float]:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    started = time.perf_counter()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer / "tokenizer.json"), eos_token="<|endoftext|>")
    raw = datasets.load_dataset("json", data_files=str(path), cache_dir=str(cache))["train"]
    split = raw.train_test_split(test_size=0.2, seed=0)["train"]
    ids = split.map(lambda b: {"input_ids": [t + [tok.eos_token_id] for t in tok(b["text"])["input_ids"]]},
                    batched=True, remove_columns=["text"])

    def group_texts(b):
        flat = [t for seq in b["input_ids"] for t in seq]
        n = (len(flat) - 1) // seq_len
        return {"x": [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)],
                "y": [flat[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n)]}

    windows = ids.map(group_texts, batched=True, batch_size=1000, remove_columns=["input_ids"]).with_format("torch")
    tokens = 0
    for rank in (0, 1):
        loader = torch.utils.data.DataLoader(windows.shard(2, rank), batch_size=batch // 2, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(0))
        for item in loader:
            tokens += item["x"].numel()
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import os

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["RAYBIG_CACHE"] = str(root / "raybig-cache")
        path = corpus(root, args.copies)
        tokenizer = tokenizer_dir(root, path)
        print(f"corpus: {path.stat().st_size / 2**20:.1f} MB of JSONL, seq_len {args.seq_len}, "
              f"global batch {args.batch_size} over 2 ranks")
        rows = []
        for label in ("cold", "warm"):
            ours = raybig_pass(path, tokenizer, args.seq_len, args.batch_size)
            theirs = plain_pass(path, tokenizer, args.seq_len, args.batch_size, root / "hf-cache")
            rows.append((label, ours, theirs))
        print(f"{'':6} {'raybig tokens/s':>16} {'plain tokens/s':>16} {'ratio':>7}   (tokens delivered, seconds)")
        for label, (t1, s1), (t2, s2) in rows:
            print(f"{label:6} {t1 / s1:16,.0f} {t2 / s2:16,.0f} {t1 / s1 / (t2 / s2):6.2f}x   "
                  f"(raybig {t1:,} in {s1:.2f} s, plain {t2:,} in {s2:.2f} s)")


if __name__ == "__main__":
    main()
