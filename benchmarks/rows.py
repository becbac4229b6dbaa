"""Row leaves: a pull+push of a batch's rows against the table's size, and against dense pulls and pushes.

    python benchmarks/rows.py [--rows 1e6,1e7] [--dim 16] [--batch 1024] [--steps 50] [--dense-steps 3]
        [--shards 2] [--transports inprocess,multiprocessing,ray]

The matrix-factorisation model of `examples/movielens.py` with a synthetic
item table of `--rows` rows (and 10,000 users), embeddings of `--dim`
float32 and a bias per row, all four tables row leaves over `--shards`
shards, Adam, async, one worker on the driver. A step pulls the rows of a
batch of `--batch` random (user, item) pairs, pushes a gradient for them
(fixed random values: the server's work is what is measured) and waits for
it; `--steps` timed steps after 10 untimed (each new padded row count compiles
once). The dense run of the same server
pulls the whole tree and pushes a whole-table gradient holding those rows
(`--dense-steps` timed after 1 untimed). Reported: row updates/s by the
median step (a new padded row count met late compiles once, an outlier of
a second; the mean is printed too), bytes per update, the ratio of row
updates/s on the largest table to the smallest (goal: within 20%), and
rows against dense.
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

USERS = 10_000
WARM = 10  # untimed: compiling the step for each padded row count (powers of two) it meets
TABLES = ["item", "item_bias", "user", "user_bias"]


def model(items: int, dim: int) -> dict:
    return {
        "item": np.zeros((items, dim), np.float32),
        "item_bias": np.zeros((items,), np.float32),
        "user": np.zeros((USERS, dim), np.float32),
        "user_bias": np.zeros((USERS,), np.float32),
    }


def batches(items: int, args, count: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """`count` batches: (rows= ids, row gradients)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        user, item = rng.integers(0, USERS, args.batch), rng.integers(0, items, args.batch)
        ids = {"item": item, "item_bias": item, "user": user, "user_bias": user}
        grads = {
            "item": rng.standard_normal((args.batch, args.dim), np.float32),
            "item_bias": rng.standard_normal(args.batch, np.float32),
            "user": rng.standard_normal((args.batch, args.dim), np.float32),
            "user_bias": rng.standard_normal(args.batch, np.float32),
        }
        out.append((ids, grads))
    return out


def dense_grads(params: dict, ids: dict, grads: dict) -> dict:
    out = {k: np.zeros_like(v) for k, v in params.items()}
    for k in TABLES:
        np.add.at(out[k], ids[k], grads[k])
    return out


def run(transport: str, items: int, args) -> dict:
    params = model(items, args.dim)
    ps = jaxps.ParameterServer(params, optax.adam(1e-3), shards=args.shards, rows=TABLES, **server_args(transport))
    try:
        client = ps.client(0)
        work = batches(items, args, WARM + args.steps)
        seconds = []
        for i, (ids, grads) in enumerate(work):
            if i == WARM:
                started, moved = time.perf_counter(), _moved(ps)
            step_started = time.perf_counter()
            client.pull(rows=ids, timeout=300)
            client.push(grads, rows=ids).result(timeout=300)
            seconds.append(time.perf_counter() - step_started)
        out = {
            "rows": 1 / statistics.median(seconds[WARM:]),  # a step's usual cost: a late compile is an outlier
            "rows_mean": args.steps / (time.perf_counter() - started),
            "rows_bytes": (_moved(ps) - moved) / args.steps,
        }
        if args.dense_steps:
            dense = [dense_grads(params, ids, grads) for ids, grads in work[: 1 + args.dense_steps]]
            for i, g in enumerate(dense):
                if i == 1:
                    started, moved = time.perf_counter(), _moved(ps)
                client.pull(timeout=300)
                client.push(g).result(timeout=300)
            out["dense"] = args.dense_steps / (time.perf_counter() - started)
            out["dense_bytes"] = (_moved(ps) - moved) / args.dense_steps
        return out
    finally:
        ps.close()


def _moved(ps) -> int:
    stats = ps.stats()
    return stats["bytes_pushed"] + stats["bytes_pulled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1e6,1e7", help="item table sizes, smallest first")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dense-steps", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--transports", default="inprocess,multiprocessing,ray")
    args = parser.parse_args()
    set_worker_path()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC: python benchmarks/rows.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    sizes = [int(float(s)) for s in args.rows.split(",")]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    print(
        f"item tables of {', '.join(f'{n:,}' for n in sizes)} rows x {args.dim} float32 (+ biases), {USERS:,} users, "
        f"{args.shards} shards, Adam, async, 1 worker, batches of {args.batch} pairs, {args.steps} timed row steps, "
        f"{args.dense_steps} dense",
        flush=True,
    )
    if any(t.startswith("ray") for t in transports):
        import ray

        ray.init(**RAY_INIT, logging_level="warning")
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for transport in transports:
            for r in range(args.repeats):
                for items in sizes if r % 2 == 0 else sizes[::-1]:
                    got = run(transport, items, args)
                    results.setdefault((transport, items), []).append(got)
                    dense = f", dense {got['dense']:.2f} updates/s ({got['dense_bytes']:,.0f} bytes)" if "dense" in got else ""
                    print(
                        f"  {transport:16s} {items:>12,} rows: {got['rows']:7.1f} updates/s by the median step "
                        f"({got['rows_mean']:.1f} by the mean; {got['rows_bytes']:,.0f} bytes){dense}",
                        flush=True,
                    )
    finally:
        if any(t.startswith("ray") for t in transports):
            ray.shutdown()
    med = lambda runs, key: statistics.median(r[key] for r in runs) if all(key in r for r in runs) else float("nan")
    print(f"\n| transport | item rows | rows: updates/s | bytes per update | vs {sizes[0]:,} rows | dense: updates/s | bytes per update | rows / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for transport in transports:
        base = med(results[(transport, sizes[0])], "rows")
        for items in sizes:
            runs = results[(transport, items)]
            rate, dense = med(runs, "rows"), med(runs, "dense")
            print(
                f"| {transport} | {items:,} | {rate:.1f} | {med(runs, 'rows_bytes'):,.0f} | {rate / base:.2f} | "
                f"{dense:.2f} | {med(runs, 'dense_bytes'):,.0f} | {rate / dense:.0f}x |"
            )


if __name__ == "__main__":
    main()
