"""Fine-tuning vs training from scratch, a distilled student vs the same student on its labels, and each
compression method vs the model it compresses, on the digits, in one run (one embedded Ray).

- fine-tune: jobs/digits_finetune.yaml (from jobs/digits_0to4_cnn.yaml) vs the same spec without init_from,
  both for --steps optimizer steps, over --seeds seeds;
- distil: jobs/digits_distill.yaml (teacher: the demo's CNN, jobs/digits_cnn.yaml) vs it without distill;
- compress: jobs/digits_mlp.yaml, then `raybig compress` quantize, prune (--sparsity, 2 epochs of fine-tune)
  and low_rank (--rank): parameters, bytes on disk, CPU ms per batch of 64, accuracy.

    python benchmarks/lifecycle.py [--steps 20] [--seeds 3] [--sparsity 0.8] [--rank 16] [--cpus 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOBS = ROOT / "jobs"


def train(job: str, out: Path, cpus: int, sets: list[str]) -> dict:
    from raybig.spec import load_spec
    from raybig.train.runner import run

    spec = load_spec(JOBS / job, [f"output.dir={out}", *sets])
    return run(spec, num_cpus=cpus).final


def paired(job: str, out: Path, cpus: int, seeds: int, sets: list[str], without: str) -> tuple[list, list]:
    """The job's val accuracy, and the job's without the `without` section, per seed."""
    name = job.removesuffix(".yaml")
    with_it, without_it = [], []
    for seed in range(seeds):
        common = [*sets, f"train.seed={seed}"]
        with_it.append(train(job, out, cpus, [*common, f"name={name}-{seed}"])["val_accuracy"])
        without_it.append(train(job, out, cpus, [*common, f"name={name}-plain-{seed}", f"{without}=null"])["val_accuracy"])
    return with_it, without_it


def gain_table(title: str, label: str, plain: str, ours: list, theirs: list) -> str:
    lines = [f"{title}", "", f"| seed | {label} | {plain} | gain (points) |", "|---|---|---|---|"]
    for seed, (a, b) in enumerate(zip(ours, theirs)):
        lines.append(f"| {seed} | {a:.2%} | {b:.2%} | {100 * (a - b):+.1f} |")
    lines.append(f"| mean | {statistics.mean(ours):.2%} | {statistics.mean(theirs):.2%} | "
                 f"{100 * (statistics.mean(ours) - statistics.mean(theirs)):+.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Fine-tune and from-scratch budget, in steps.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=4)
    args = parser.parse_args()

    from rich.console import Console

    from raybig.cluster import ray_session
    from raybig.lifecycle.compress import compress, default_name, table

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=args.cpus):
        out = Path(tmp)
        teacher = train("digits_cnn.yaml", out, args.cpus, [])
        train("digits_0to4_cnn.yaml", out, args.cpus, [])
        budget = [f"train.max_steps={args.steps}", f"eval.every_steps={args.steps}",
                  f"checkpoint.every_steps={args.steps}"]
        tuned, scratch = paired("digits_finetune.yaml", out, args.cpus, args.seeds, budget, "init_from")
        taught, alone = paired("digits_distill.yaml", out, args.cpus, args.seeds, [], "distill")
        train("digits_mlp.yaml", out, args.cpus, [])
        parent = out / "digits-mlp"
        compressed = []
        for method, options in (("quantize", {}), ("prune", {"sparsity": args.sparsity, "scope": "global"}),
                                ("low_rank", {"rank": args.rank})):
            target = out / default_name(parent.name, method, args.sparsity, args.rank, None)
            _, rows = compress(parent, target, method, finetune_epochs=2, num_cpus=args.cpus, console=console,
                               **options)
            compressed.append(rows if not compressed else rows[1:])
    print(gain_table(f"Fine-tuning from the 0-4 model vs from scratch, all ten digits, {args.steps} steps:",
                     "fine-tuned", "from scratch", tuned, scratch))
    print()
    print(gain_table(f"A distilled student (teacher: the demo CNN, {teacher['val_accuracy']:.2%}) vs the same "
                     "student on its labels alone, 3% of the training rows:", "distilled", "labels alone",
                     taught, alone))
    print()
    print("Compression of the digits MLP (jobs/digits_mlp.yaml):\n")
    print(table([row for rows in compressed for row in rows]))


if __name__ == "__main__":
    main()
