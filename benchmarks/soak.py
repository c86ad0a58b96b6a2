"""The long soak of the fault suite, not part of CI: tests/faults/ again and again with more kills and other
seeds (where in each run the kills land), then the serving fault at full length. Prints what was survived.

    python benchmarks/soak.py [--rounds 3] [--kills 20] [--serve-seconds 60] [--serve-kills 1]

Each round runs tests/faults/test_rank_kills.py (a streamed data-parallel run and a data 2 x pipeline 2 run,
each with --kills random rank kills; every epoch once, every step's loss equal to a run never stopped) and
tests/faults/test_dead_drivers.py (`raybig run` SIGKILLed on its own Ray and on a warm one, a sweep stopped by
Ctrl-C and then by SIGKILL, each command run again). Exits 1 if any round or the serving run failed.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20, help="rank kills per run, per layout")
    parser.add_argument("--serve-seconds", type=float, default=60)
    parser.add_argument("--serve-kills", type=int, default=1)
    args = parser.parse_args()
    failed = 0
    survived = {"rank kills": 0, "driver kills": 0}
    for round_ in range(args.rounds):
        started = time.monotonic()
        env = {**os.environ, "RAYBIG_FAULT_KILLS": str(args.kills), "RAYBIG_FAULT_SEED": str(100 * (round_ + 1))}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                               "tests/faults/test_rank_kills.py", "tests/faults/test_dead_drivers.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        print(f"round {round_ + 1}: {tail} ({time.monotonic() - started:.0f} s)", flush=True)
        if proc.returncode != 0:
            failed += 1
            print(proc.stdout[-4000:])
            continue
        survived["rank kills"] += 2 * args.kills
        survived["driver kills"] += 3  # run on its own Ray, run on a warm Ray, a sweep (and its Ctrl-C)
    serve = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_faults.py"), "--seconds",
                            str(args.serve_seconds), "--kills", str(args.serve_kills)], capture_output=True, text=True)
    print(serve.stdout.strip() or serve.stderr[-2000:])
    served = re.search(r"(\d+) succeeded", serve.stdout)
    print(f"survived: {survived['rank kills']} rank kills and {survived['driver kills']} driver kills in "
          f"{args.rounds - failed} of {args.rounds} rounds; {served.group(1) if served else 0} requests answered "
          f"under {args.serve_kills} replica kill(s)")
    return 1 if failed or serve.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
