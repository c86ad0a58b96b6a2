"""Serving under faults: `raybig serve` with 2 replicas under a fixed-rate loopback load, one replica process
SIGKILLed half-way. Prints how many requests succeeded, the slowest answer against the spec's request timeout,
and when `GET /v1/models` first showed the replacement replica.

    python benchmarks/serve_faults.py [--seconds 60] [--rate 100] [--timeout 5] [--kills 1]

The load is open-loop (a request starts every 1/rate s whether or not earlier ones have been answered), sent to
Serve's HTTP proxy, the address that outlives a replica. With --kills K, K replicas are killed at even
intervals (never the last one standing). Exits 1 when fewer than 99.9% of the requests succeed or one waited
past the request timeout.
"""
import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # serve_load, beside this script
from serve_load import stop_server  # noqa: E402
REPLICA = "ray::ServeRepli"  # a Serve replica's process name (cut to 15 characters)


def train(root: Path, timeout_s: float) -> Path:
    """A digits MLP trained for an epoch in this process, with a serve section of 2 replicas."""
    from serve_load import train as train_for_serving

    return train_for_serving(root, {
        "name": "faults-mlp", "model": {"kind": "mlp", "hidden": [64]}, "data": {"source": "digits"},
        "train": {"epochs": 1}, "serve": {"replicas": 2, "cpus_per_replica": 1, "max_batch_size": 32,
                                          "batch_wait_ms": 2, "request_timeout_s": timeout_s}})


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def wait_serving(base: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"raybig serve exited: {proc.returncode}")
        try:
            if len(replicas_seen(base, 20)) == 2:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not answer from 2 replicas within {timeout:g} s")


def replicas_seen(base: str, asks: int) -> set[str]:
    return {get_json(f"{base}/v1/models")[0]["replica"] for _ in range(asks)}


def replica_pids(mark: str) -> list[int]:
    needle = f"RAYBIG_COMMAND_MARK={mark}".encode()
    pids = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and proc.name().startswith(REPLICA):
                    pids.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return pids


async def fixed_rate_load(url: str, body: bytes, rate: float, seconds: float, client_timeout: float) -> list[tuple]:
    """(started, status or error name, seconds) per request; a request starts every 1/rate s."""
    import aiohttp

    results: list[tuple] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(started: float):
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=client_timeout)) as reply:
                    await reply.read()
                    outcome = reply.status
            except Exception as err:  # a refused or broken connection, a client-side timeout
                outcome = type(err).__name__
            results.append((started, outcome, time.monotonic() - started))

        start, tasks = time.monotonic(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(time.monotonic())))
        await asyncio.gather(*tasks)
    return results


def watch_models(base: str, done, seen: list) -> None:
    """Every 0.25 s until `done` is set: (when, the replica that answered GET /v1/models, when it started)."""
    while not done.wait(0.25):
        try:
            card = get_json(f"{base}/v1/models")[0]
            seen.append((time.monotonic(), time.time(), card["replica"], card["replica_started"]))
        except OSError:
            pass


def replacements(kills: list, before: set, seen: list) -> list:
    """For each kill, the first answer of GET /v1/models from a replica started after it (None: not yet)."""
    known, found = set(before), []
    for _, killed_wall in kills:
        new = next((s for s in seen if s[2] not in known and s[3] > killed_wall), None)
        found.append(new)
        if new:
            known.add(new[2])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=100, help="requests per second")
    parser.add_argument("--timeout", type=float, default=5, help="the spec's serve.request_timeout_s")
    parser.add_argument("--kills", type=int, default=1)
    parser.add_argument("--port", type=int, default=8435)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = train(Path(tmp), args.timeout)
        # the server's processes carry the mark (a caller's own, to find them afterwards): the replicas are found by it
        mark = os.environ.get("RAYBIG_COMMAND_MARK") or f"serve-faults-{os.getpid()}-{time.time_ns()}"
        base = f"http://127.0.0.1:{args.port}"
        proc = subprocess.Popen([sys.executable, "-m", "raybig", "serve", str(run_dir), "--port", str(args.port),
                                 "--num-cpus", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "RAYBIG_COMMAND_MARK": mark})
        try:
            wait_serving(base, proc)
            before = replicas_seen(base, 20)
            body = json.dumps({"inputs": [[0.5] * 64]}).encode()
            seen: list = []
            begin = time.monotonic()
            done = threading.Event()
            watcher = threading.Thread(target=watch_models, args=(base, done, seen), daemon=True)
            watcher.start()
            kills: list[tuple[float, float]] = []

            def killer():
                for k in range(args.kills):
                    time.sleep(max(0.0, begin + args.seconds * (k + 1) / (args.kills + 1) - time.monotonic()))
                    pids = replica_pids(mark)
                    if len(pids) < 2:
                        continue  # never the last one standing
                    psutil.Process(rng.choice(pids)).kill()
                    kills.append((time.monotonic(), time.time()))

            threading.Thread(target=killer, daemon=True).start()
            results = asyncio.run(fixed_rate_load(f"{base}/v1/models/faults-mlp/predict", body, args.rate,
                                                  args.seconds, args.timeout + 10))
            deadline = time.monotonic() + 120  # the replacement may still be loading its model
            while None in replacements(kills, before, seen) and time.monotonic() < deadline:
                time.sleep(0.5)
            done.set()
            watcher.join()
        finally:
            stop_server(proc)

    ok = [r for r in results if r[1] == 200]
    failed = [r for r in results if r[1] != 200]
    slowest = max(r[2] for r in results)
    latencies = sorted(r[2] for r in ok)
    share = len(ok) / len(results)
    print(f"{len(results)} requests at {args.rate:g}/s for {args.seconds:g} s, {len(kills)} of 2 replicas "
          f"SIGKILLed: {len(ok)} succeeded ({100 * share:.2f}%)")
    outcomes: dict = {}
    for r in failed:
        outcomes[r[1]] = outcomes.get(r[1], 0) + 1
    print(f"failed: {outcomes or 'none'}" + "".join(f"\n  at +{r[0] - begin:.2f} s: {r[1]} after {r[2]:.2f} s"
                                                   for r in failed[:10]))
    print(f"latency: p50 {1000 * latencies[len(latencies) // 2]:.1f} ms, p99 "
          f"{1000 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms, slowest {slowest:.2f} s "
          f"(request timeout {args.timeout:g} s)")
    found = replacements(kills, before, seen)
    for (killed_at, _), new in zip(kills, found):
        shown = f"{new[0] - killed_at:.1f} s after the kill" if new else "not within 120 s after the load"
        print(f"kill at +{killed_at - begin:.1f} s: GET /v1/models first answered from a new replica {shown}")
    in_flight = sum(any(r[0] <= k <= r[0] + r[2] for k, _ in kills) for r in failed)
    print(f"of the failed, {in_flight} were in flight at a kill (sent to the replica that died with them)")
    passed = share >= 0.999 and slowest <= args.timeout and len(kills) == args.kills and None not in found
    print("PASS" if passed else "FAIL", "(>= 99.9% succeeded, none past the request timeout, each killed replica "
          "replaced)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
