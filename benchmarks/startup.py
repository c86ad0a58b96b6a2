"""What a run pays around its training: `torchrun`, a raw Ray Train TorchTrainer, `raybig run` cold (it starts
its own Ray) and `raybig run` warm (attached to `raybig up`), in one run.

The job is the two-epoch digits MLP (jobs/digits_mlp.yaml --set train.epochs=2: data parallel over 2 ranks);
the plain ones are benchmarks/plain/digits_mlp.py (the same model, optimizer, batch and split). Each command
is timed whole, from its start to its exit, as a user waits for it; its overhead is that time less the
time its epochs took (their own figure: `train_s=` for the plain scripts, the epochs' `epoch_seconds` from
raybig's metrics.json). raybig's own phases (`--profile-startup`) of the last repeat are printed after the table.

    python benchmarks/startup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "benchmarks" / "plain" / "digits_mlp.py"
RAYBIG = str(Path(sys.executable).with_name("raybig"))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, done.stdout + done.stderr


def plain(mode: str) -> tuple[float, float]:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(PLAIN), "torchrun"]
           if mode == "torchrun" else [sys.executable, str(PLAIN), "raytrain"])
    wall, out = timed(cmd)
    return wall, float(re.search(r"train_s=([\d.]+)", out).group(1))


def raybig(out_dir: Path, env: dict) -> tuple[float, float, str]:
    cmd = [RAYBIG, "run", "jobs/digits_mlp.yaml", "--set", "train.epochs=2", "--set", f"output.dir={out_dir}",
           "--fresh", "--profile-startup", "--num-cpus", "4"]
    wall, out = timed(cmd, env)
    history = json.loads((out_dir / "digits-mlp" / "metrics.json").read_text())
    return wall, sum(r["epoch_seconds"] for r in history), out[out.index("where the time went"):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cold_env = {**os.environ, "RAYBIG_NO_WARM_RAY": "1"}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in ("torchrun", "raw Ray Train", "raybig cold",
                                                                     "raybig warm")}
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        for _ in range(args.repeats):
            results["torchrun"].append(plain("torchrun"))
            results["raw Ray Train"].append(plain("raytrain"))
            *figures, profiles["raybig cold"] = raybig(Path(tmp) / "cold", cold_env)
            results["raybig cold"].append(tuple(figures))
        up_s, _ = timed([RAYBIG, "up", "--num-cpus", "4"])
        try:
            for _ in range(args.repeats):
                *figures, profiles["raybig warm"] = raybig(Path(tmp) / "warm", dict(os.environ))
                results["raybig warm"].append(tuple(figures))
        finally:
            timed([RAYBIG, "down"])

    print(f"\nthe two-epoch digits MLP, data parallel x2, {args.repeats} repeats (median); "
          f"`raybig up` itself took {up_s:.1f} s, once")
    print("| command | wall-clock s | training s | overhead s | overhead / torchrun's |")
    print("|---|---|---|---|---|")
    base = statistics.median(w - t for w, t in results["torchrun"])
    for name, runs in results.items():
        wall, train = statistics.median(w for w, _ in runs), statistics.median(t for _, t in runs)
        over = statistics.median(w - t for w, t in runs)
        print(f"| {name} | {wall:.1f} | {train:.2f} | {over:.1f} | {over / base:.2f} |")
    for name, profile in profiles.items():
        print(f"\n{name}, last repeat:\n{profile}")


if __name__ == "__main__":
    main()
