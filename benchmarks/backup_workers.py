"""The cost of backup workers that agree across shards: sync steps/s with `backup_workers=1` vs 0, same run.

    python benchmarks/backup_workers.py [--params 1e6] [--shards 3] [--workers 3] [--steps 200]
        [--transports inprocess,multiprocessing,ray,ray-objectstore] [--repeats 3]

A server of `--params` float32 parameters in 6 equal leaves (plus a step
counter), `optax.sgd`, `mode="sync"`, `--workers` workers through
`ps.run_workers`, each pulling and pushing until `--steps` steps are applied.
Each worker times the steps from the 20th to the last on its own clock; a
run's rate is those steps over the median worker's time. Per transport, runs
with `backup_workers=0` and `backup_workers=1` alternate `--repeats` times
(the machine is shared and its load drifts); the report gives the median
rates and their ratio. No worker is slow on purpose: this is what the
agreement costs (with 1 backup, shard 0 decides each step and tells the
others), not what a straggler saves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jaxps

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.common import RAY_INIT, server_args, set_worker_path  # noqa: E402

WARM = 20  # steps not timed: compilation, connections, buffers


def tree(num_params: int) -> dict:
    size = num_params // 6
    return {**{f"layer_{i}": np.zeros(size, np.float32) for i in range(6)}, "count": np.zeros((), np.float32)}


def worker(client, steps: int) -> float:
    """Pulls and pushes until `steps` steps are applied; the seconds from step WARM to the end."""
    started = None
    while True:
        params = client.pull(timeout=120)
        count = int(params["count"])
        if count >= WARM and started is None:
            started = time.perf_counter()
        if count >= steps:
            return time.perf_counter() - started
        grads = {k: np.full_like(v, 1e-3) for k, v in params.items() if k != "count"}
        client.push({**grads, "count": np.float32(1.0)}).result(timeout=120)


def run(transport: str, backup: int, args) -> float:
    """Steps/s of one server."""
    ps = jaxps.ParameterServer(
        tree(int(args.params)), optax.sgd(-1.0), shards=args.shards, mode="sync", workers=args.workers, backup_workers=backup,
        **server_args(transport),
    )
    try:
        seconds = ps.run_workers(worker, [args.steps] * args.workers)
        assert ps.step == args.steps, (ps.step, args.steps)
        return (args.steps - WARM) / statistics.median(seconds)
    finally:
        ps.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="inprocess,multiprocessing,ray")
    args = parser.parse_args()
    if args.steps <= WARM:
        parser.error(f"--steps must be more than {WARM}")
    set_worker_path()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC: python benchmarks/backup_workers.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    print(f"{int(args.params):,} float32 parameters, {args.shards} shards, {args.workers} workers, sync, {args.steps} steps a run")
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if any(t.startswith("ray") for t in transports):
        import ray

        ray.init(**RAY_INIT, logging_level="warning")
    try:
        rows = measure(transports, args)
    finally:
        if any(t.startswith("ray") for t in transports):
            ray.shutdown()
    print("\n| transport | steps/s, backup_workers=0 | steps/s, backup_workers=1 | with / without |")
    print("|---|---|---|---|")
    for transport, without, with_ in rows:
        print(f"| {transport} | {without:.1f} | {with_:.1f} | {with_ / without:.2f} |")


def measure(transports: list[str], args) -> list[tuple[str, float, float]]:
    """(transport, median steps/s without backup workers, with one), runs alternating."""
    rows = []
    for transport in transports:
        rates: dict[int, list[float]] = {0: [], 1: []}
        for r in range(args.repeats):
            for backup in (0, 1) if r % 2 == 0 else (1, 0):
                rates[backup].append(run(transport, backup, args))
                print(f"  {transport:16s} backup_workers={backup}: {rates[backup][-1]:7.1f} steps/s", flush=True)
        without, with_ = statistics.median(rates[0]), statistics.median(rates[1])
        rows.append((transport, without, with_))
    return rows


if __name__ == "__main__":
    main()
