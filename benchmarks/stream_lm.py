"""Does streaming cost training speed? The same small LM, the same corpus, trained for the same steps with
the data held in memory (`data.loader: memory`) and streamed from shards (`stream`: tokenized by Ray Data
tasks into RAYBIG_CACHE, each rank reading its slice of every global batch a window at a time), in one run,
alternating, on one embedded Ray. Reported: training steps/s (the loop's own clock, start-up excluded), the
ratio stream/memory, each rank's peak memory, and the one-off cost of reading and tokenizing the corpus.

    python benchmarks/stream_lm.py [--mb 16] [--steps 300] [--rounds 2] [--data 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("the a model trains on data ray shards each rank reads its window and the next step of every "
         "epoch batch token loss").split()


def write_corpus(root: Path, megabytes: int) -> Path:
    """Lines of random words, in 8 files."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines_per_file = megabytes * 2**20 // 8 // 48
    for f in range(8):
        words = np.array(WORDS)[rng.integers(0, len(WORDS), size=(lines_per_file, 9))]
        (root / f"part{f}.txt").write_text("\n".join(" ".join(line) for line in words) + "\n")
    return root


def job(corpus: Path, out: Path, loader: str, steps: int, data: int, memory_mb: int) -> dict:
    return {"name": f"lm-{loader}", "output": {"dir": str(out)},
            "model": {"kind": "transformer", "task": "lm", "dim": 128, "heads": 4, "layers": 2},
            "data": {"source": "text", "path": str(corpus), "document": "line", "seq_len": 128,
                     "loader": loader, "memory_mb": memory_mb},
            "train": {"epochs": 1, "max_steps": steps, "batch_size": 32, "seed": 0,
                      "optimizer": {"name": "adamw", "lr": 1e-3}},
            "eval": {"every_steps": steps, "max_batches": 2}, "checkpoint": {"every_steps": steps},
            "parallelism": {"data": data}, "resources": {"cpus_per_worker": 1}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=16, help="corpus size")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="raybig-stream-bench-"))
    os.environ["RAYBIG_CACHE"] = str(tmp / "cache")
    corpus = write_corpus(Path(tempfile.mkdtemp(dir=tmp)), args.mb)

    import ray

    from raybig.data import datasets
    from raybig.spec import parse_spec
    from raybig.train.runner import run

    ray.init(address="local", num_cpus=max(2, args.data), include_dashboard=False, log_to_driver=False)
    # the streamed run's shards hold far more than its budget: a quarter of the corpus's text
    memory_mb = max(1, args.mb // 4)
    prepare, speed, rss = {}, {"memory": [], "stream": []}, {}
    for loader in ("memory", "stream"):
        spec = parse_spec(job(corpus, tmp / "runs", loader, args.steps, args.data, memory_mb))
        datasets._read.cache_clear()
        started = time.perf_counter()
        datasets.load(spec.data, spec.model)  # cold: read, tokenized, packed (and for stream: written as shards)
        prepare[loader] = time.perf_counter() - started
    for round_ in range(args.rounds):
        for loader in ("memory", "stream"):
            spec = parse_spec(job(corpus, tmp / "runs", loader, args.steps, args.data, memory_mb))
            outcome = run(spec, fresh=True, console=None, on_item=lambda item: None)
            records = outcome.history
            steps = sum(len(r["step_losses"]) for r in records)
            speed[loader].append(steps / sum(r["train_seconds"] for r in records))
            rss[loader] = max(max(r["peak_rss_mb"]) for r in records)
    ray.shutdown()
    print(f"corpus {args.mb} MB of text, {args.steps} steps x {args.rounds} rounds, data {args.data}, "
          f"stream memory_mb {memory_mb}")
    print(f"{'loader':8} {'steps/s (median)':>17} {'rounds':>22} {'rank peak RSS':>14} {'read+tokenize':>14}")
    for loader in ("memory", "stream"):
        rounds = ", ".join(f"{s:.2f}" for s in speed[loader])
        print(f"{loader:8} {statistics.median(speed[loader]):17.2f} {rounds:>22} {rss[loader]:11.0f} MB "
              f"{prepare[loader]:12.1f} s")
    print(f"stream / memory steps/s: {statistics.median(speed['stream']) / statistics.median(speed['memory']):.3f}x")


if __name__ == "__main__":
    main()
