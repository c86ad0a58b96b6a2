"""How close raybig's pipeline comes to the bubble bound, in one run.

A deep MLP (64 -> 1024, then 8 layers of 1024 x 1024: an even split) trained by raybig as one stage on
one worker, then split over p = 2 pipeline stages (2 workers) with m microbatches. For each m the measured speed-up over the one-stage run,
divided by p, is printed beside the bound m / (m + p - 1), and beside the same figure for plain
torch.distributed.pipelining under torchrun (benchmarks/plain/pp_torchrun.py). Peak memory per stage
(resident set of each worker) is compared for gpipe and 1f1b at the same m.

    python benchmarks/pipeline_bubble.py [--batch 8192] [--hidden 1024] [--layers 9] [--steps 6]
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import ray
from rich.console import Console

from raybig.spec import parse_spec
from raybig.train.runner import run


def spec(args, out: Path, name: str, stages: int, microbatches: int, schedule: str):
    return parse_spec({
        "name": name,
        "model": {"kind": "mlp", "hidden": [args.hidden] * args.layers},
        "data": {"source": "synthetic", "samples": int(args.batch * args.steps / 0.8) + args.batch,
                 "features": 64, "classes": 10},
        "train": {"epochs": 2, "batch_size": args.batch, "optimizer": {"name": "sgd", "lr": 0.01}, "seed": 0},
        "parallelism": {"data": 1, "pipeline": {"stages": stages, "microbatches": microbatches, "schedule": schedule}},
        "checkpoint": {"every_epochs": 2, "keep": 1},
        "output": {"dir": str(out)},
    })


QUIET = Console(quiet=True)
PLAIN = Path(__file__).resolve().parent / "plain" / "pp_torchrun.py"


def plain(args, world: int, microbatches: int, schedule: str) -> float:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), str(PLAIN),
                          "--schedule", schedule, "--microbatches", str(microbatches), "--batch", str(args.batch),
                          "--hidden", str(args.hidden), "--layers", str(args.layers), "--steps", str(args.steps)],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"samples_per_s=(\d+)", out).group(1))


def measure(args, out: Path, name: str, stages: int = 1, microbatches: int = 1, schedule: str = "1f1b") -> dict:
    history = run(spec(args, out, name, stages, microbatches, schedule), num_cpus=2, console=QUIET).history
    last = history[-1]  # epoch 1 is the warm-up
    return {"samples_per_s": last["samples_per_s"], "peak_rss_mb": last["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=9,
                        help="hidden layers; the first maps the 64 inputs, the rest are H x H (the plain script builds the same)")
    parser.add_argument("--steps", type=int, default=6, help="steps per epoch")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    p = 2
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = measure(args, out, "one-stage")
        rows = []
        for m in args.microbatches:
            schedule = "gpipe" if m < p else "1f1b"  # 1F1B needs at least as many microbatches as stages
            rows.append((m, schedule, measure(args, out, f"pp-m{m}", p, m, schedule)))
        m_mem = 8 if 8 in args.microbatches else args.microbatches[-1]
        gpipe = measure(args, out, "gpipe-mem", p, m_mem, "gpipe")
    ray.shutdown()
    plain_base = plain(args, 1, 1, "gpipe")
    plain_rows = {m: plain(args, p, m, schedule) for m, schedule, _ in rows}

    print(f"deep MLP 64-{args.hidden} + {args.layers - 1} x {args.hidden}, global batch {args.batch}, p = {p} stages, gloo on CPU")
    print(f"one stage, one worker: {base['samples_per_s']:.0f} samples/s, peak RSS {base['peak_rss_mb'][0]:.0f} MB")
    print(f"plain torchrun, one process: {plain_base:.0f} samples/s")
    print(f"{'m':>3} {'schedule':>9} {'samples/s':>10} {'speed-up':>9} {'speed-up/p':>11} {'bound':>7} {'of bound':>9}"
          f" {'torchrun of bound':>18}")
    for m, schedule, r in rows:
        speedup = r["samples_per_s"] / base["samples_per_s"]
        bound = m / (m + p - 1)
        plain_of_bound = plain_rows[m] / plain_base / p / bound
        print(f"{m:>3} {schedule:>9} {r['samples_per_s']:>10.0f} {speedup:>9.2f} {speedup / p:>11.2f} {bound:>7.2f} "
              f"{speedup / p / bound:>9.2f} {plain_of_bound:>18.2f}")
    one_f_one_b = next(r for m, s, r in rows if m == m_mem)
    print(f"peak RSS per stage at m = {m_mem} (MB): gpipe {', '.join(f'{v:.0f}' for v in gpipe['peak_rss_mb'])}; "
          f"1f1b {', '.join(f'{v:.0f}' for v in one_f_one_b['peak_rss_mb'])}")
    print(f"median of bound at m >= 4: "
          f"{statistics.median(r['samples_per_s'] / base['samples_per_s'] / p / (m / (m + p - 1)) for m, _, r in rows if m >= 4):.2f}")


if __name__ == "__main__":
    main()
