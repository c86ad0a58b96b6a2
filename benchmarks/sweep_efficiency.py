"""ASHA vs running every trial to the end, on the same space and the same sampled configs, in one run.

Both sweeps take the spec's space, searcher and seed, so they sample the same trials; the first stops
trials early with ASHA, the second (fifo) trains each one for every epoch. Prints the best metric of each,
the gap in points, the epochs each spent and ASHA's fraction of the full run's epochs, and wall-clock time.

    python benchmarks/sweep_efficiency.py [--spec jobs/digits_sweep.yaml] [--trials 12] [--grace 1] [--rf 3]
                                          [--set model.hidden=[1024,1024]]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sweep(spec_path: str, out: Path, scheduler: dict, trials: int | None, cpus: int, sets: list[str]):
    from raybig.spec import load_spec
    from raybig.sweep.driver import run_sweep

    overrides = [*sets, f"output.dir={out}", f"sweep.scheduler={scheduler}"]
    if trials:
        overrides.append(f"sweep.trials={trials}")
    spec = load_spec(spec_path, overrides)
    started = time.perf_counter()
    outcome = run_sweep(spec, num_cpus=cpus)
    return spec, outcome, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "jobs" / "digits_sweep.yaml"))
    parser.add_argument("--trials", type=int, default=None, help="Default: the spec's.")
    parser.add_argument("--grace", type=int, default=None, help="ASHA grace period (default: the spec's, else 1).")
    parser.add_argument("--rf", type=float, default=None, help="ASHA reduction factor (default: the spec's, else 3).")
    parser.add_argument("--cpus", type=int, default=4, help="Logical CPUs of the embedded Ray.")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                        help="Override a field of the spec for both sweeps, e.g. --set model.hidden=[1024,1024].")
    args = parser.parse_args()

    from raybig.cluster import ray_session
    from raybig.spec import load_spec

    own = load_spec(args.spec).sweep.scheduler
    asha = {"name": "asha",
            "grace_period": args.grace or (own.grace_period if own.name == "asha" else 1),
            "reduction_factor": args.rf or (own.reduction_factor if own.name == "asha" else 3.0)}
    # each sweep in an embedded Ray of its own, started before its clock starts: as `raybig sweep` runs on a
    # Ray of `raybig up`, and neither sweep inherits processes or warm caches from the other
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        with ray_session(num_cpus=args.cpus):
            spec, early, early_s = sweep(args.spec, Path(tmp) / "asha", asha, args.trials, args.cpus, args.sets)
        with ray_session(num_cpus=args.cpus):
            _, full, full_s = sweep(args.spec, Path(tmp) / "full", {"name": "fifo"}, args.trials, args.cpus,
                                    args.sets)

    metric, goal = spec.sweep.metric, spec.sweep.goal
    same = [{p: r[p] for p in spec.sweep.space} for r in early.rows] == \
        [{p: r[p] for p in spec.sweep.space} for r in full.rows]
    epochs = {name: sum(r["epochs"] for r in o.rows) for name, o in (("asha", early), ("full", full))}
    best = {name: (o.best or {}).get(metric, float("nan")) for name, o in (("asha", early), ("full", full))}
    gap = (best["full"] - best["asha"]) * (1 if goal == "max" else -1) * 100
    print(f"\n{len(full.rows)} trials x {spec.train.epochs} epochs, each data x{spec.parallelism.data}; "
          f"asha grace {asha['grace_period']}, reduction factor {asha['reduction_factor']:g}; "
          f"same sampled configs in both: {same}")
    print(f"| sweep | best {metric} | epochs run | wall-clock s |")
    print("|---|---|---|---|")
    print(f"| asha | {best['asha']:.4f} | {epochs['asha']} | {early_s:.0f} |")
    print(f"| every trial to the end | {best['full']:.4f} | {epochs['full']} | {full_s:.0f} |")
    print(f"asha best is {gap:+.2f} points behind the full run's (target <= 0.5); asha spent "
          f"{epochs['asha'] / epochs['full']:.0%} of its epochs (target <= 40%) and "
          f"{early_s / full_s:.0%} of its wall-clock time")


if __name__ == "__main__":
    main()
