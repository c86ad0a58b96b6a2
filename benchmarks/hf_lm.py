"""A Hugging Face causal LM under raybig data 2, plain `torchrun` DDP and the Hugging Face Trainer, in one run.

The same tiny Llama (transformers, built from one config), the same text windows, global batch and AdamW, 2
workers, gloo on CPU. Prints each one's steady-state tokens/s (after warm-up; raybig: its second epoch) and
raybig's ratio to the faster of the two.

    python benchmarks/hf_lm.py [--hidden 256] [--layers 4] [--seq 128] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def spec_of(args, out: Path) -> dict:
    return {
        "name": "hf-bench",
        "model": {"kind": "hf", "config": {"model_type": "llama", "hidden_size": args.hidden,
                                           "intermediate_size": int(args.hidden * 2.6875) // 8 * 8,
                                           "num_hidden_layers": args.layers, "num_attention_heads": 4,
                                           "num_key_value_heads": 4, "max_position_embeddings": args.seq}},
        "data": {"source": "text", "seq_len": args.seq, "max_chars": args.chars},
        "train": {"epochs": 2, "batch_size": args.batch, "optimizer": {"name": "adamw", "lr": 1e-3,
                                                                     "weight_decay": 0.0}, "seed": 0},
        "parallelism": {"data": 2},
        "checkpoint": {"every_epochs": 2, "keep": 1},
        "output": {"dir": str(out / "runs")},
    }


def plain(mode: str, workdir: Path, steps: int, args) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "plain" / "hf_lm_torchrun.py"), mode, str(workdir), "--steps", str(steps), "--warmup", "5",
           "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"tokens_per_s=(\d+)", proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chars", type=int, default=150_000, help="corpus size: sets raybig's steps per epoch")
    args = parser.parse_args()

    from raybig.data.datasets import load
    from raybig.models.hf import hf_config
    from raybig.spec import parse_spec

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec = spec_of(args, workdir)
        (workdir / "hf-bench.yaml").write_text(yaml.safe_dump(spec))
        parsed = parse_spec(spec)
        bundle = load(parsed.data)
        np.save(workdir / "x.npy", bundle.train.x)
        np.save(workdir / "y.npy", bundle.train.y)
        (workdir / "config.json").write_text(json.dumps(hf_config(parsed.model, bundle.meta).to_dict()))
        steps = len(bundle.train.x) // args.batch - 5  # as many timed steps as raybig's epoch has

        subprocess.run([sys.executable, "-m", "raybig", "run", str(workdir / "hf-bench.yaml"), "--fresh",
                        "--num-cpus", "2"], capture_output=True, text=True, check=True)
        history = json.loads((workdir / "runs" / "hf-bench" / "metrics.json").read_text())
        rates = {"raybig data 2": history[-1]["tokens_per_s"],
                 "torchrun DDP": plain("plain", workdir, steps, args),
                 "HF Trainer": plain("trainer", workdir, steps, args)}
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers, vocab {bundle.meta.num_classes}, seq {args.seq}, "
          f"global batch {args.batch}, 2 workers, gloo, {steps} timed steps")
    for name, rate in rates.items():
        print(f"{name:15} {rate:10,.0f} tokens/s")
    best = max(rates["torchrun DDP"], rates["HF Trainer"])
    print(f"ratio raybig / faster of torchrun DDP and HF Trainer: {rates['raybig data 2'] / best:.3f}")


if __name__ == "__main__":
    main()
