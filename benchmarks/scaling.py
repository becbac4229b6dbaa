"""Benchmark 4: updates/s against workers and shards, per transport.

A 4 MB float32 tree in 8 leaves of 128K elements, `optax.sgd(1e-3)`, async
mode, workers started by `ps.run_workers` (threads, spawned processes or Ray
tasks by transport). Each worker makes its synthetic gradient once (ones),
does a few warm-up rounds, meets the others at a start barrier, then runs
pull (`jax.block_until_ready`) -> push rounds for `seconds`; pushes are not
waited for except the last (the next pull of the same client sees them).

updates/s = all workers' timed pushes / (last end - first start). Every push
is one optimizer step in async mode. On a 2-core machine the shards, the
workers and (for Ray) the raylet share 2 cores, so more workers or shards
cannot add throughput beyond what the cores give; the table shows how much
each transport loses or keeps.
"""

from __future__ import annotations

import time

import numpy as np
import optax

from benchmarks.common import barrier, barrier_dir, log, report_error, span_rate, server_args

LEAVES = 8
LEAF_ELEMENTS = 128 * 1024  # 8 x 512 KiB = 4 MiB
WARMUP = 3


def scaling_worker(client, arg):
    import jax

    seconds, n, bdir = arg
    grads = {f"leaf{i}": np.ones(LEAF_ELEMENTS, np.float32) for i in range(LEAVES)}
    for _ in range(WARMUP):
        jax.block_until_ready(client.pull())
        client.push(grads).result()
    barrier(bdir, client.worker, n)
    start = time.perf_counter()
    deadline = start + seconds
    count = 0
    while True:
        jax.block_until_ready(client.pull())
        future = client.push(grads)
        count += 1
        if time.perf_counter() >= deadline:
            break
    future.result()
    return start, time.perf_counter(), count


def run_one(transport: str, workers: int, shards: int, seconds: float) -> tuple[float, float, int]:
    import jaxps

    params = {f"leaf{i}": np.zeros(LEAF_ELEMENTS, np.float32) for i in range(LEAVES)}
    ps = jaxps.ParameterServer(
        params, optax.sgd(1e-3), shards=shards, mode="async", workers=workers, **server_args(transport),
    )
    try:
        with barrier_dir() as bdir:
            stamps = ps.run_workers(scaling_worker, [(seconds, workers, bdir)] * workers)
        rate, secs, count = span_rate(stamps)
        applied = ps.stats()["pushes_applied"]
        if applied != count + WARMUP * workers:
            raise AssertionError(f"{applied} pushes applied, expected {count + WARMUP * workers}")
        return rate, secs, count
    finally:
        ps.close()


def run(quick: bool, transports) -> dict:
    if quick:
        grid, seconds = [(1, 1)], 0.2
    else:
        grid, seconds = [(w, s) for s in (1, 2, 4) for w in (1, 2, 4)], 1.5
    rows, errors = [], []
    for tr in transports:
        for workers, shards in grid:
            what = f"{tr} workers={workers} shards={shards}"
            try:
                rate, secs, count = run_one(tr, workers, shards, seconds)
            except Exception as e:
                errors.append(f"scaling {what}: {report_error(what, e)}")
                rows.append({"transport": tr, "workers": workers, "shards": shards, "error": errors[-1]})
                continue
            rows.append({"transport": tr, "workers": workers, "shards": shards, "updates_per_s": rate, "seconds": secs, "updates": count})
            log(f"[scaling] {tr:>15} workers={workers} shards={shards}: {rate:8.1f} updates/s ({count} in {secs:.2f} s)")
    return {"rows": rows, "tree": f"{LEAVES} float32 leaves x {LEAF_ELEMENTS:,} = {LEAVES * LEAF_ELEMENTS * 4 / 2**20:.0f} MiB", "seconds": seconds, "errors": errors}
