"""raybig serve vs a bare FastAPI + uvicorn process, the same model, loopback load, in one run.

Trains nothing heavy: an MLP 64-1024-1024-10 gets one epoch on digits, then both servers load that run.
For each concurrency (1, 8, 32) N clients POST one sample each for T seconds; prints requests/s, p50,
p99 and raybig's ratios to the bare server.

raybig is loaded where `raybig serve` says it is fastest: the replica's own port (Serve's direct ingress);
`--via proxy` sends the load through Serve's HTTP proxy (the port given with --port) instead.

    python benchmarks/serve_load.py [--seconds 10] [--concurrency 1 8 32] [--via direct|proxy]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train(root: Path, raw: dict | None = None) -> Path:
    """A one-epoch run of `raw` (by default the MLP above) trained in this process, for a server to load."""
    import torch

    from raybig.data.datasets import load
    from raybig.data.loader import MemorySource
    from raybig.spec import parse_spec
    from raybig.train.checkpoint import RunStore
    from raybig.train.loop import WorkerEnv, fit

    spec = parse_spec(raw or {"name": "bench-mlp", "model": {"kind": "mlp", "hidden": [1024, 1024]},
                              "data": {"source": "digits"}, "train": {"epochs": 1},
                              "serve": {"max_batch_size": 32, "batch_wait_ms": 2, "cpus_per_replica": 1}})
    bundle = load(spec.data)
    store = RunStore(root / spec.name)
    env = WorkerEnv(0, 1, torch.device("cpu"), MemorySource(bundle.train.x, bundle.train.y, 64, 0, 1, 0),
                    MemorySource(bundle.val.x, bundle.val.y, 64, 0, 1, 0))
    fit(spec, bundle.meta, env, store)
    store.write_spec(spec.to_yaml())
    return store.root


def wait_healthy(url: str, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def load(url: str, concurrency: int, seconds: float) -> dict:
    """One bounded load in a fresh client process (plain/load.py): see there why not in this one."""
    out = subprocess.run([sys.executable, str(HERE / "plain" / "load.py"), url, "--concurrency", str(concurrency),
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def direct_url(proc) -> str:
    """The first replica address `raybig serve` prints on its "direct to a replica" line."""
    for line in proc.stdout:
        if line.startswith("direct"):
            return re.findall(r"http://\S+", line)[0]
    raise RuntimeError(f"raybig serve printed no direct address (exit code {proc.wait()})")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C to a server started in its own process group (only that group), SIGKILL if it will not end."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(name: str, cmd: list[str], base: str, args) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        if name == "raybig" and args.via == "direct":
            base = direct_url(proc)
        wait_healthy(base, proc)
        load(f"{base}/v1/models/bench-mlp/predict", 4, 2)  # warm-up
        return {c: load(f"{base}/v1/models/bench-mlp/predict", c, args.seconds) for c in args.concurrency}
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--port", type=int, default=8433)
    parser.add_argument("--via", choices=["direct", "proxy"], default="direct",
                        help="raybig: a replica's direct-ingress port, or Serve's HTTP proxy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = train(Path(tmp))
        bare = measure("bare", [sys.executable, str(HERE / "plain" / "serve_bare.py"), str(run_dir), "--port",
                                str(args.port + 1)], f"http://127.0.0.1:{args.port + 1}", args)
        ours = measure("raybig", [sys.executable, "-m", "raybig", "serve", str(run_dir), "--port", str(args.port),
                                  "--num-cpus", "2"], f"http://127.0.0.1:{args.port}", args)
    print(f"MLP 64-1024-1024-10, one sample per request, loopback; raybig via {args.via}")
    print(f"{'c':>3} {'bare rps':>9} {'p50 ms':>7} {'p99 ms':>7} {'raybig rps':>11} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'rps ratio':>10} {'p99/p50':>8} {'errors':>7}")
    for c in args.concurrency:
        b, r = bare[c], ours[c]
        print(f"{c:>3} {b['rps']:>9.0f} {b['p50']:>7.1f} {b['p99']:>7.1f} {r['rps']:>11.0f} {r['p50']:>7.1f} "
              f"{r['p99']:>7.1f} {r['rps'] / b['rps']:>10.2f} {r['p99'] / r['p50']:>8.2f} {b['errors'] + r['errors']:>7}")


if __name__ == "__main__":
    main()
