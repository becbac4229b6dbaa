"""What a live `ps.reshard` costs a running sync training loop: how long pushes pause.

    python benchmarks/reshard.py [--params 1e6,10e6] [--repeats 3] [--transports inprocess,multiprocessing,ray]

A server of `--params` float32 parameters in 8 leaves under `optax.adam`,
sync with 2 workers (threads of the driver pulling and pushing as fast as they
can). Once training runs, the benchmark reshards it, alternately from 2 shards
to 4 and back, and measures:

- reshard: the wall time of the `ps.reshard` call (the cut, the checkpoint of
  the state into a temporary directory, the new shards' start, the hand-over);
- pause: the longest time between two steps around the reshard (what a
  training loop sees), against the median time between steps before it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jaxps

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.common import session  # noqa: E402


def measure(transport: str, num_params: int, repeats: int) -> list[dict]:
    params = {f"w{i}": np.zeros(num_params // 8, np.float32) for i in range(8)}
    grads = {k: np.full_like(v, 1e-3) for k, v in params.items()}
    ps = jaxps.ParameterServer(params, optax.adam(1e-3), shards=2, transport=transport, mode="sync", workers=2)
    stop = threading.Event()
    steps: list[float] = []  # when worker 0 saw each step applied

    def worker(w: int) -> None:
        client = ps.client(w)
        try:
            while not stop.is_set():
                client.pull(timeout=600)
                client.push(grads).result(timeout=600)
                if w == 0:
                    steps.append(time.perf_counter())
        except jaxps.ServerClosedError:
            return  # the benchmark is over

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(2)]
    for t in threads:
        t.start()
    runs = []
    try:
        for r in range(repeats):
            while len(steps) < 20 * (r + 1) + 10:
                time.sleep(0.05)
            shards = 4 if ps.plan.num_shards == 2 else 2
            before = np.diff(steps[-11:])
            started = time.perf_counter()
            ps.reshard(shards)
            took = time.perf_counter() - started
            at = len(steps)
            while len(steps) < at + 5:
                time.sleep(0.01)
            around = [b - a for a, b in zip(steps, steps[1:]) if b >= started and a <= started + took + 1.0]
            runs.append({"reshard_s": took, "pause_s": max(around), "step_s": float(np.median(before))})
            print(f"  {transport} {num_params:>12,} params: to {shards} shards in {took:.2f} s; longest gap between steps "
                  f"{runs[-1]['pause_s']:.2f} s (a step takes {runs[-1]['step_s'] * 1e3:.1f} ms)", flush=True)
    finally:
        stop.set()
        ps.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1e6,10e6", help="comma-separated parameter counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="inprocess,multiprocessing,ray")
    args = parser.parse_args()
    rows = []
    with session("reshard.py", args.transports) as transports:
        for transport in transports:
            for n in [int(float(x)) for x in args.params.split(",")]:
                runs = measure(transport, n, args.repeats)
                rows.append((transport, n, *(statistics.median(r[k] for r in runs) for k in ("reshard_s", "pause_s", "step_s"))))
    print(f"\nAdam, sync with 2 workers, 2 <-> 4 shards; medians of {args.repeats} reshards")
    print("| transport | parameters | reshard | longest gap between steps | a step before |")
    print("|---|---|---|---|---|")
    for transport, n, took, pause, step in rows:
        print(f"| {transport} | {n:,} | {took:.2f} s | {pause:.2f} s | {step * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
