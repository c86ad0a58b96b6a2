"""Bounded loopback load, the plain client every serving benchmark here uses: N concurrent clients POST
the same JSON for T seconds; prints one JSON line with requests/s, p50, p99 (ms) and errors.

It runs as its own small process (aiohttp and nothing else), like any load generator: a client that
shared a process with torch or a training run would pause for its own garbage collections over that
heap (150 ms at a time, measured) and charge the pauses to the server's latency.

    python load.py URL --concurrency 32 --seconds 10 [--rows 1]
"""
import argparse
import asyncio
import json
import time

import aiohttp


async def load(url: str, concurrency: int, seconds: float, rows: int) -> dict:
    body = json.dumps({"inputs": [[0.5] * 64] * rows})
    latencies, errors = [], 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client():
            nonlocal errors
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"content-type": "application/json"},
                                            timeout=aiohttp.ClientTimeout(total=30)) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
    latencies.sort()
    q = lambda f: 1000 * latencies[min(len(latencies) - 1, int(f * len(latencies)))] if latencies else float("nan")
    return {"rps": len(latencies) / elapsed, "p50": q(0.5), "p99": q(0.99), "errors": errors}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(load(args.url, args.concurrency, args.seconds, args.rows))))
