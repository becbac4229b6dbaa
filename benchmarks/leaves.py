"""Many-leaf trees: a 100-leaf tree's push+pull round trip against a 1-leaf tree of the same bytes.

    python benchmarks/leaves.py [--sizes 400e3,4e6,40e6] [--leaves 100] [--repeats 5]
        [--transports inprocess,multiprocessing,ray,ray-tcp,ray-objectstore]

Per transport and size, 1-leaf and N-leaf servers take turns (`--repeats`
times, each a batch of warm round trips, as `benchmarks/bandwidth.py` times
them: `ps.push(grads).result()` then `jax.block_until_ready(ps.pull())`,
1 shard, `optax.sgd`); the report gives the median round trip of each and
their ratio (goal: <= 1.5), and the extra time per leaf.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.bandwidth import round_trips  # noqa: E402
from benchmarks.common import RAY_INIT, log, median, set_worker_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="400e3,4e6,40e6")
    p.add_argument("--leaves", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--transports", default="inprocess,multiprocessing,ray,ray-tcp,ray-objectstore")
    args = p.parse_args()
    set_worker_path()
    transports = args.transports.split(",")
    log(f"command: python {' '.join(sys.argv)}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs; 1 shard, optax.sgd, float32")
    if any(t.startswith("ray") for t in transports):
        import ray

        ray.init(**RAY_INIT, logging_level="error")
    try:
        for nbytes in (int(float(s)) for s in args.sizes.split(",")):
            for transport in transports:
                times: dict[int, list[float]] = {1: [], args.leaves: []}
                for _ in range(args.repeats):
                    for leaves in times:
                        times[leaves].append(median(round_trips(transport, nbytes, leaves, budget_s=0.5, min_reps=5, max_reps=20)))
                one, many = median(times[1]), median(times[args.leaves])
                per_leaf = (many - one) / (args.leaves - 1)
                log(
                    f"{transport:>16} {nbytes / 1e6:6.1f} MB: 1 leaf {one * 1e3:7.2f} ms, {args.leaves} leaves {many * 1e3:7.2f} ms "
                    f"= {many / one:5.2f}x ({per_leaf * 1e6:6.1f} us per extra leaf; ratio range "
                    f"{min(np.divide(times[args.leaves], times[1])):.2f}-{max(np.divide(times[args.leaves], times[1])):.2f})"
                )
    finally:
        if any(t.startswith("ray") for t in transports):
            ray.shutdown()


if __name__ == "__main__":
    main()
