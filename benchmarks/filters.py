"""Push filters: bytes per push and updates/s for each filter on each transport, side by side.

    python benchmarks/filters.py [--params 1e7] [--shards 2] [--steps 20] [--repeats 2]
        [--filters none,bf16,topk:0.01,topk:0.01+bf16,sig:2.576] [--transports inprocess,multiprocessing,ray,ray-objectstore]

A server of `--params` float32 parameters in 4 equal leaves, `optax.sgd`,
async, one worker on the driver: pull, push a fixed standard-normal gradient,
wait for it, `--steps` times after 3 untimed ones. The gradients are 4
standard-normal trees in turn, as jax arrays, so the filter's encode
(compiled, on the worker) is part of each push. `sig:2.576` would send 1% of
one standard-normal gradient; with error feedback (on, as by default) the
entries it holds back add up, and more cross. Per transport, the
filters run in turn, `--repeats` times in alternating order (the machine is
shared and its load drifts); the table gives median updates/s, the ratio to
no filter in the same run, and the bytes per push that `ps.stats()` counted.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.common import RAY_INIT, server_args, set_worker_path  # noqa: E402

WARM = 3  # pushes not timed: compilation, connections, buffers
LEAVES = 4


def make_filter(spec: str):
    """'none', or a `jaxps.filters.from_spec` spec: 'bf16', 'topk:0.01', 'sig:2.576', 'topk:0.01+bf16'."""
    return None if spec == "none" else jaxps.filters.from_spec(spec)


def run(transport: str, spec: str, grads: list[dict], args) -> tuple[float, float]:
    """(updates/s, bytes per push) of one server."""
    params = {k: np.zeros(v.shape, np.float32) for k, v in grads[0].items()}
    ps = jaxps.ParameterServer(params, optax.sgd(1e-6), shards=args.shards, push_filter=make_filter(spec), **server_args(transport))
    try:
        client = ps.client(0)
        for i in range(WARM + args.steps):
            if i == WARM:
                started, pushed = time.perf_counter(), ps.stats()["bytes_pushed"]
            client.pull(timeout=300)
            client.push(grads[i % len(grads)]).result(timeout=300)
        seconds = time.perf_counter() - started
        return args.steps / seconds, (ps.stats()["bytes_pushed"] - pushed) / args.steps
    finally:
        ps.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e7)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--filters", default="none,bf16,topk:0.01,topk:0.01+bf16,sig:2.576")
    parser.add_argument("--transports", default="inprocess,multiprocessing,ray,ray-objectstore")
    args = parser.parse_args()
    set_worker_path()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC: python benchmarks/filters.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    size = int(args.params) // LEAVES
    print(f"{size * LEAVES:,} float32 parameters in {LEAVES} leaves, {args.shards} shards, async, 1 worker, {args.steps} timed pushes a run")
    keys = jax.random.split(jax.random.key(0), (4, LEAVES))
    grads = [{f"layer_{i}": jax.random.normal(k, (size,), jnp.float32) for i, k in enumerate(row)} for row in keys]
    specs = [s.strip() for s in args.filters.split(",") if s.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if any(t.startswith("ray") for t in transports):
        import ray

        ray.init(**RAY_INIT, logging_level="warning")
    rows = []
    try:
        for transport in transports:
            rates: dict[str, list[float]] = {s: [] for s in specs}
            sizes: dict[str, float] = {}
            for r in range(args.repeats):
                for spec in specs if r % 2 == 0 else specs[::-1]:
                    rate, sizes[spec] = run(transport, spec, grads, args)
                    rates[spec].append(rate)
                    print(f"  {transport:16s} {spec:16s} {rate:6.2f} updates/s, {sizes[spec]:,.0f} bytes per push", flush=True)
            base = statistics.median(rates[specs[0]])
            rows += [(transport, s, statistics.median(rates[s]), statistics.median(rates[s]) / base, sizes[s]) for s in specs]
    finally:
        if any(t.startswith("ray") for t in transports):
            ray.shutdown()
    dense = 4 * size * LEAVES
    print(f"\n| transport | push filter | updates/s | vs {specs[0]} | bytes per push | fewer bytes |")
    print("|---|---|---|---|---|---|")
    for transport, spec, rate, ratio, nbytes in rows:
        print(f"| {transport} | {spec} | {rate:.2f} | {ratio:.2f} | {nbytes:,.0f} | {dense / nbytes:.1f}x |")


if __name__ == "__main__":
    main()
