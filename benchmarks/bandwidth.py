"""Benchmark 1: push+pull round-trip bandwidth per transport, against this machine's memcpy.

One round trip, timed from the caller: `ps.push(grads).result()` then
`jax.block_until_ready(ps.pull())`, on a 1-shard server with `optax.sgd(1e-3)`
(a step that reads params and gradients and writes params once).

    bytes moved per round trip = 2 x tree size        (the gradients in, the params out)
    bandwidth                  = 2 x tree size / median round-trip seconds
    memcpy bandwidth           = tree size / median seconds of a warm single-core
                                 `np.copyto` of a same-size float32 buffer (same run)
    fraction of memcpy         = bandwidth / memcpy bandwidth = 2 x t_memcpy / t_round_trip,
                                 with t_memcpy timed right before and right after
                                 that transport's round trips (side by side: the
                                 machine's load drifts)

Trees are float32, either one leaf or 100 equal leaves; gradients are jax
arrays (what a worker's `jax.grad` hands over).
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxps
from benchmarks.common import TRANSPORTS, adaptive_reps, fmt_bytes, log, median, memcpy_timer, report_error, time_calls, server_args

SIZES_FULL = (4_000, 40_000, 400_000, 4_000_000, 40_000_000, 100_000_000, 400_000_000)
SIZES_QUICK = (4_000, 400_000)
LEAVES = (1, 100)
LEAVES_QUICK = (1,)
LR = 1e-3


def make_tree(nbytes: int, leaves: int) -> dict:
    n = max(1, nbytes // 4 // leaves)
    return {f"leaf{i:03d}": np.zeros(n, np.float32) for i in range(leaves)}


def round_trips(transport: str, nbytes: int, leaves: int, budget_s: float, min_reps: int = 3, max_reps: int = 30) -> list[float]:
    """Seconds per push+pull round trip (warm), as many as fit in `budget_s` (within [min_reps, max_reps])."""
    params = make_tree(nbytes, leaves)
    grads = jax.block_until_ready(jax.tree.map(lambda x: jnp.full(x.shape, 1.0, x.dtype), params))
    ps = jaxps.ParameterServer(params, optax.sgd(LR), shards=1, **server_args(transport))
    del params
    try:

        def rt():
            ps.push(grads).result()
            jax.block_until_ready(ps.pull())

        time_calls(rt, warmup=2, reps=0)  # compiles the step, maps buffers, warms the object store
        first = time_calls(rt, 0, 1)[0]
        ts = [first] + time_calls(rt, 0, adaptive_reps(first, budget_s, lo=min_reps, hi=max_reps) - 1)
        # sanity: every round trip applied one sgd step of ones
        got = float(np.asarray(ps.pull()["leaf000"][0]))
        want = -LR * (2 + len(ts))
        if not np.isclose(got, want, rtol=1e-3):
            raise AssertionError(f"params after {2 + len(ts)} round trips: {got}, expected {want}")
        return ts
    finally:
        ps.close()
        gc.collect()


def run(quick: bool, transports=TRANSPORTS) -> dict:
    sizes = SIZES_QUICK if quick else SIZES_FULL
    layouts = LEAVES_QUICK if quick else LEAVES
    budget, min_reps, max_reps = (0.05, 3, 5) if quick else (1.5, 5, 30)
    rows, errors = [], []
    memcpy = {}
    for nbytes in sizes:
        timer = memcpy_timer(nbytes)
        copies = timer(9)
        for leaves in layouts:
            for tr in transports:
                what = f"{tr} {fmt_bytes(nbytes)} x{leaves} leaves"
                before = timer(5)
                try:
                    ts = round_trips(tr, nbytes, leaves, budget, min_reps, max_reps)
                except Exception as e:
                    errors.append(f"bandwidth {what}: {report_error(what, e)}")
                    rows.append({"transport": tr, "bytes": nbytes, "leaves": leaves, "error": errors[-1]})
                    continue
                after = timer(5)
                copies += before + after
                t = median(ts)
                bw = 2 * nbytes / t / 1e9
                reference = nbytes / median(before + after) / 1e9
                rows.append(
                    {
                        "transport": tr,
                        "bytes": nbytes,
                        "leaves": leaves,
                        "round_trip_s": t,
                        "round_trips_s": ts,
                        "GBps": bw,
                        "memcpy_GBps": reference,
                        "fraction_of_memcpy": bw / reference,
                    }
                )
                log(
                    f"[bandwidth] {tr:>15} {fmt_bytes(nbytes):>7} x{leaves:<3} leaves: round trip {t * 1e3:9.3f} ms "
                    f"(median of {len(ts)}), {bw:7.3f} GB/s = {bw / reference:6.1%} of memcpy ({reference:.2f} GB/s around it)"
                )
        memcpy[nbytes] = nbytes / median(copies) / 1e9
        log(f"[bandwidth] memcpy {fmt_bytes(nbytes):>7}: {memcpy[nbytes]:8.2f} GB/s (median of all its copies)")
    return {"rows": rows, "memcpy_GBps": {str(k): v for k, v in memcpy.items()}, "sizes": list(sizes), "errors": errors}
