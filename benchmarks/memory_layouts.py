"""Memory per rank of one model under each parallel layout, in one run: ddp, fsdp, tensor and pipeline, each
over 2 ranks (gloo on CPU), and one process for reference.

Each layout is raybig's own (`parallelize`, the optimizer it builds) taking a few AdamW steps of a
parameter-dominated char transformer (wide, short sequences). Per rank it counts what the model's state
costs exactly, parameters + gradients + optimizer state as this rank holds them (its shard, stage or slice),
and the peak resident memory the process grew by from before the model was built (activations, communication
buffers and the whole model each rank builds before sharding it included, so noisier). Prints each layout's figures and its ratio to ddp's.

    python benchmarks/memory_layouts.py [--dim 512] [--layers 4] [--seq 16] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

LAYOUTS = {
    "one process": {},
    "ddp 2": {"data": 2},
    "fsdp 2": {"data": 2, "data_mode": "fsdp"},
    "tensor 2": {"tensor": 2},
    "pipeline 2": {"pipeline": {"stages": 2, "microbatches": 2, "schedule": "1f1b"}},
    "fsdp 2 x tensor 2": {"data": 2, "data_mode": "fsdp", "tensor": 2},
}


def spec_of(args, parallelism: dict) -> dict:
    return {"name": "memory", "model": {"kind": "transformer", "task": "lm", "dim": args.dim, "heads": 8,
                                        "layers": args.layers},
            "data": {"source": "text", "seq_len": args.seq, "max_chars": 20_000, "modules": ["textwrap"]},
            "train": {"batch_size": args.batch, "optimizer": {"name": "adamw", "lr": 1e-3}, "seed": 0},
            "parallelism": parallelism}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(rank: int, world: int, port: int, raw: dict, out: str, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from raybig.data.datasets import describe
    from raybig.models import build_model
    from raybig.spec import parse_spec
    from raybig.train.loop import WorkerEnv, loss_fn
    from raybig.train.optim import build_optimizer
    from raybig.train.parallel import local_part, parallelize, parameters
    from raybig.train.precision import Precision

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    spec = parse_spec(raw)
    meta = describe(spec.data)
    before = _rss_mb()
    model = build_model(spec.model, meta, seed=0)
    env = WorkerEnv(rank, world, torch.device("cpu"), None, None)
    layout = parallelize(model, spec, env, lambda o, y: loss_fn(spec, o, y), Precision("fp32", env.device))
    params = parameters(layout)
    optimizer = build_optimizer(params, spec.train.optimizer)
    per_replica = spec.train.batch_size // spec.parallelism.data
    generator = torch.Generator().manual_seed(rank // (spec.parallelism.pipeline.stages * spec.parallelism.tensor))
    for _ in range(steps):
        x = torch.randint(0, meta.num_classes, (per_replica, spec.data.seq_len), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        layout.train_step(x, x)
        optimizer.step()

    def mb(tensors) -> float:
        return sum(local_part(t).numel() * local_part(t).element_size() for t in tensors) / 2**20

    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    figures = {"params_mb": mb(params), "grads_mb": mb([p.grad for p in params if p.grad is not None]),
               "optimizer_mb": mb(states), "peak_growth_mb": _rss_mb() - before}
    Path(out, f"{rank}.json").write_text(json.dumps(figures))
    if world > 1:
        dist.destroy_process_group()


def measure(raw: dict, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    p = raw["parallelism"]
    world = p.get("data", 1) * p.get("pipeline", {}).get("stages", 1) * p.get("tensor", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, port, raw, out, steps), nprocs=world, join=True,
                           start_method="spawn")
        return [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), help="which of: " + ", ".join(LAYOUTS))
    args = parser.parse_args()
    # glibc keeps freed blocks for reuse (and per-thread arenas for gloo's threads), so resident memory would
    # track the most ever allocated, not what is live: the ranks (spawned, so they read this) return large
    # blocks to the system at once
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    print(f"char transformer dim {args.dim}, {args.layers} layers, seq {args.seq}, global batch {args.batch}, "
          f"AdamW, fp32, {args.steps} steps; per rank, the largest rank's figures (MB)")
    print(f"{'layout':<20} {'ranks':>5} {'params':>8} {'grads':>8} {'optim':>8} {'state':>8} {'x ddp':>6} "
          f"{'peak growth':>12} {'x ddp':>6}")
    rows = {}
    for name in args.layouts:
        ranks = measure(spec_of(args, LAYOUTS[name]), args.steps)
        top = max(ranks, key=lambda r: r["params_mb"] + r["grads_mb"] + r["optimizer_mb"])
        state = top["params_mb"] + top["grads_mb"] + top["optimizer_mb"]
        peak = max(r["peak_growth_mb"] for r in ranks)
        rows[name] = (state, peak)
        ddp = rows.get("ddp 2")
        ratios = (f"{state / ddp[0]:>6.2f}", f"{peak / ddp[1]:>6.2f}") if ddp else ("     -", "     -")
        print(f"{name:<20} {len(ranks):>5} {top['params_mb']:>8.1f} {top['grads_mb']:>8.1f} "
              f"{top['optimizer_mb']:>8.1f} {state:>8.1f} {ratios[0]} {peak:>12.1f} {ratios[1]}", flush=True)


if __name__ == "__main__":
    main()
