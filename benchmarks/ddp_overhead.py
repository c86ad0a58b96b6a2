"""raybig data parallel (2 workers, one Ray actor each) vs plain `torchrun --nproc-per-node 2` DDP, in one run.

Same model (MLP 64-H-H-10), same global batch, SGD with momentum, gloo on CPU. Prints the steady-state
samples/s of each (after warm-up), their ratio, and the start-up and tear-down time of each separately.

    python benchmarks/ddp_overhead.py [--hidden 1024] [--batch 256] [--steps 200] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def torchrun(args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(HERE / "plain" / "ddp_torchrun.py"), "--hidden", str(args.hidden), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", "20"]
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    rate = float(re.search(r"samples_per_s=(\d+)", out).group(1))
    timed = args.steps * args.batch / rate
    return {"samples_per_s": rate, "wall_s": wall, "overhead_s": wall - timed * (1 + 20 / args.steps)}


def raybig(args, workdir: Path) -> dict:
    steps = args.steps
    spec = {
        "name": "ddp-bench",
        "model": {"kind": "mlp", "hidden": [args.hidden, args.hidden]},
        "data": {"source": "synthetic", "samples": int(args.batch * steps / 0.8) + args.batch, "features": 64,
                 "classes": 10, "val_fraction": 0.2},
        "train": {"epochs": 3, "batch_size": args.batch, "optimizer": {"name": "momentum", "lr": 0.01}, "seed": 0},
        "parallelism": {"data": 2},
        "checkpoint": {"every_epochs": 3, "keep": 1},
        "output": {"dir": str(workdir / "runs")},
    }
    path = workdir / "ddp-bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raybig", "run", str(path), "--fresh", "--num-cpus", "2"],
                   capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    history = json.loads((workdir / "runs" / "ddp-bench" / "metrics.json").read_text())
    steady = [r["samples_per_s"] for r in history[1:]]  # epoch 1 is the warm-up
    return {"samples_per_s": statistics.median(steady), "wall_s": wall,
            "overhead_s": wall - sum(r["epoch_seconds"] for r in history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch (raybig) / timed steps (torchrun)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append((torchrun(args), raybig(args, Path(tmp))))
    plain = statistics.median(r[0]["samples_per_s"] for r in rows)
    ours = statistics.median(r[1]["samples_per_s"] for r in rows)
    print(f"model MLP 64-{args.hidden}-{args.hidden}-10, global batch {args.batch}, 2 workers, gloo, "
          f"{args.repeats} repeat(s)")
    print(f"{'':10} {'samples/s':>10} {'start+stop s':>13} {'wall s':>8}")
    for name, i in (("torchrun", 0), ("raybig", 1)):
        print(f"{name:10} {statistics.median(r[i]['samples_per_s'] for r in rows):10.0f} "
              f"{statistics.median(r[i]['overhead_s'] for r in rows):13.1f} "
              f"{statistics.median(r[i]['wall_s'] for r in rows):8.1f}")
    print(f"ratio raybig / torchrun (steady state): {ours / plain:.3f}")


if __name__ == "__main__":
    main()
