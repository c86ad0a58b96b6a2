"""raybig through Ray Train against the same model in a plain PyTorch loop, eager and compiled, in one run:
tokens/s, samples/s, MFU and peak memory, for char transformers from ~85 M parameters up.

The same model (raybig's transformer LM, built by raybig from the same spec and seed), batch, precision,
fused AdamW and gradient clipping on both sides; the plain loop feeds one random batch already on the
device, raybig its real data pipeline. raybig's figure is its steady state: the last of its records (each
covers `--steps` optimizer steps, evaluation excluded), so compilation and warm-up fall in the first. MFU is
nanoGPT's estimate (6 N + 12 L H Dh T flops per token) over the device's dense bf16 peak; on a CPU it
runs a tiny size, so the benchmark does not rot where CI runs, and prints no MFU.

    python benchmarks/gpu_mfu.py                      # GPU: every size below; CPU: tiny
    python benchmarks/gpu_mfu.py --sizes 304m --precision bf16 --steps 50
    python benchmarks/gpu_mfu.py --sizes 1.3b --activation-checkpointing full
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# name: (dim, layers, heads, seq, batch)
SIZES = {"tiny": (64, 2, 4, 32, 8), "85m": (768, 12, 12, 256, 64), "304m": (1024, 24, 16, 1024, 16),
         "474m": (1280, 24, 20, 1024, 16), "1.3b": (2048, 24, 16, 1024, 8)}
GPU_DEFAULT = ("85m", "304m", "474m")  # 1.3b: with --activation-checkpointing full, the largest tried for one GPU
PEAK_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}  # dense bf16


def spec_of(size: str, args, compile_mode: str, out: Path) -> dict:
    dim, layers, heads, seq, batch = SIZES[size]
    gpu = _gpu()
    return {"name": f"mfu-{size}-{compile_mode}", "output": {"dir": str(out)},
            "model": {"kind": "transformer", "task": "lm", "dim": dim, "heads": heads, "layers": layers},
            "data": {"source": "text", "seq_len": seq, "max_chars": max(200_000, 4 * seq * batch)},
            "train": {"epochs": 1, "max_steps": 3 * args.steps, "batch_size": batch, "seed": 0,
                      "precision": args.precision, "compile": compile_mode, "grad_clip": 1.0,
                      "activation_checkpointing": args.activation_checkpointing,
                      "optimizer": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05}},
            "eval": {"every_steps": args.steps, "max_batches": 1}, "checkpoint": {"every_steps": 3 * args.steps},
            "parallelism": {"data": 1},
            "resources": {"gpus_per_worker": 1 if gpu else 0, "cpus_per_worker": 1}}


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def flops_per_token(n_params: int, dim: int, layers: int, heads: int, seq: int) -> float:
    return 6 * n_params + 12 * layers * heads * (dim // heads) * seq


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def plain(spec, meta, compiled: bool, steps: int) -> dict:
    """The reference loop: no Ray, no data pipeline, one batch resident on the device; with activation
    checkpointing, each block wrapped in torch.utils.checkpoint as raybig wraps it."""
    import torch
    import torch.nn.functional as F

    from raybig.models import build_model
    from raybig.models.parts import model_parts
    from raybig.train.activations import checkpoint_blocks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # as many threads as the raybig worker has CPUs (Ray sets its OMP_NUM_THREADS)
        torch.set_num_threads(int(spec.resources.cpus_per_worker))
    t, vocab = spec.train, meta.num_classes
    model = build_model(spec.model, meta, dropout=0.0, seed=0).to(device)
    checkpoint_blocks(model_parts(model), t.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05,
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    run = torch.compile(model) if compiled else model
    x = torch.randint(0, vocab, (t.batch_size, spec.data.seq_len), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = run(x)
        loss = F.cross_entropy(out.reshape(-1, vocab).float(), x.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()

    for _ in range(max(3, steps // 5)):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"samples_per_s": t.batch_size / seconds, "params": sum(p.numel() for p in model.parameters()),
            "peak_mb": peak}


def raybig_run(spec) -> dict:
    from raybig.train.runner import run

    history = run(spec, fresh=True, console=None, on_item=lambda item: None).history
    last = history[-1]
    peak = max(last.get("peak_device_mb") or [float("nan")])
    return {"samples_per_s": last["samples_per_s"], "params": sum(last["parameters_per_rank"]), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=None, help=", ".join(SIZES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    args = parser.parse_args()
    gpu = _gpu()
    args.sizes = args.sizes or (list(GPU_DEFAULT) if gpu else ["tiny"])
    args.steps = args.steps or (50 if gpu else 10)
    args.precision = args.precision or ("bf16" if gpu else "fp32")

    import ray
    import torch

    from raybig.data.datasets import describe
    from raybig.spec import parse_spec

    device = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{time.strftime('%Y-%m-%d')} on {device}, torch {torch.__version__}, {args.precision}, "
          f"{args.steps} timed steps per figure, activation checkpointing {args.activation_checkpointing}")
    print(f"{'size':<6} {'params':>8} {'run':<22} {'samples/s':>10} {'tokens/s':>10} {'MFU':>6} {'peak MB':>9} "
          f"{'x plain':>8}")
    peak = peak_flops()
    ray.init(address="local", num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="raybig-mfu-"))
    try:
        for size in args.sizes:
            dim, layers, heads, seq, batch = SIZES[size]
            for compiled in (False, True):
                spec = parse_spec(spec_of(size, args, "model" if compiled else "off", out))
                meta = describe(spec.data)
                mine = raybig_run(spec)
                reference = plain(spec, meta, compiled, args.steps)
                for label, fig in ((f"plain {'compiled' if compiled else 'eager'}", reference),
                                   (f"raybig {'compile model' if compiled else 'eager'}", mine)):
                    tokens = fig["samples_per_s"] * seq
                    mfu = flops_per_token(reference["params"], dim, layers, heads, seq) * tokens / peak \
                        if peak else None
                    ratio = f"{fig['samples_per_s'] / reference['samples_per_s']:>8.2f}" if fig is mine else " " * 8
                    print(f"{size:<6} {reference['params'] / 1e6:>7.1f}M {label:<22} {fig['samples_per_s']:>10.1f} "
                          f"{tokens:>10.0f} {f'{mfu:.3f}' if mfu else '-':>6} {'-' if fig['peak_mb'] != fig['peak_mb'] else round(fig['peak_mb']):>9} {ratio}",
                          flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
