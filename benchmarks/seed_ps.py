"""Benchmark 2: jaxps against the seed's sharded 15-line numpy Ray parameter server.

The seed (Ray blog post "Ray: A Distributed System for AI", its "sharded
parameter server" listing; /work/shared/seeds/000_5175f95a5c1fa601.txt) is
reproduced below as faithfully as the workload allows. Changes, all needed to
time it and none making it slower:
  * float32 (`np.zeros(dim, np.float32)`) instead of the default float64, to
    match jaxps's float32 tree of D elements;
  * the worker does `warmup + K` rounds instead of 100, with no `time.sleep`,
    and `np.ones(D)` of the whole vector as the gradient;
  * timing stamps around the K timed rounds, a start barrier so that both
    workers' timed rounds overlap, and a final `ray.get` of the last round's
    `update_params` refs (the actor runs one caller's calls in order, so that
    means every update of this worker is applied) before the clock stops.

jaxps runs the same workload: params `{"a": zeros(D/2), "b": zeros(D/2)}` in 2
shards, `optax.sgd(-1.0)` (so the step is `params += grad`, as in the seed),
async mode, 2 workers via `ps.run_workers`, each round `client.pull()` (made
ready with `jax.block_until_ready`), `np.ones(D)` split into the two leaves,
`client.push(...)` not waited for (like the seed's fire-and-forget updates;
the next pull of the same client sees it), and the last push waited for.

updates/s = 2 workers x K rounds / (last worker's end - first worker's start).
Runs alternate seed, jaxps/inprocess, jaxps/multiprocessing, jaxps/ray, ...
in one process and one Ray session; medians over the repeats.
"""

from __future__ import annotations

import time

import numpy as np
import optax
import ray

from benchmarks.common import barrier, barrier_dir, cpu_busy, error_text, log, median, report_error, span, span_rate, server_args

WORKERS = 2
SHARDS = 2


# -- the seed, as in the blog post (float32, K rounds, no sleep, timing) ---------------
@ray.remote
class ParameterServer(object):
    def __init__(self, dim):
        self.params = np.zeros(dim, np.float32)

    def get_params(self):
        return self.params

    def update_params(self, grad):
        self.params += grad


@ray.remote
def worker(dim, rounds, warmup, bdir, index, *parameter_servers):
    def one_round():
        # Get the latest parameters.
        parameter_shards = ray.get([ps.get_params.remote() for ps in parameter_servers])
        params = np.concatenate(parameter_shards)
        # A fake gradient.
        grad = np.ones(dim, np.float32)
        grad_shards = np.split(grad, len(parameter_servers))
        # Send the gradient updates to the parameter servers.
        return [ps.update_params.remote(g) for ps, g in zip(parameter_servers, grad_shards)], params

    for _ in range(warmup):
        refs, _ = one_round()
    ray.get(refs)
    barrier(bdir, index, WORKERS)
    start = time.perf_counter()
    for _ in range(rounds):
        refs, _ = one_round()
    ray.get(refs)
    return start, time.perf_counter(), rounds


def run_seed_once(servers, dim: int, rounds: int, warmup: int) -> list[tuple[float, float, int]]:
    """Per-worker (start, end, rounds) stamps of one seed run."""
    with barrier_dir() as bdir:
        return ray.get([worker.remote(dim, rounds, warmup, bdir, i, *servers) for i in range(WORKERS)])


# -- the same workload through jaxps ------------------------------------------------------
def jaxps_worker(client, arg):
    import jax

    dim, rounds, warmup, bdir = arg
    half = dim // 2

    def one_round():
        jax.block_until_ready(client.pull())
        grad = np.ones(dim, np.float32)
        return client.push({"a": grad[:half], "b": grad[half:]})

    for _ in range(warmup):
        one_round().result()
    barrier(bdir, client.worker, WORKERS)
    start = time.perf_counter()
    for _ in range(rounds):
        future = one_round()
    future.result()
    return start, time.perf_counter(), rounds


def run_jaxps_once(transport: str, dim: int, rounds: int, warmup: int) -> list[tuple[float, float, int]]:
    """Per-worker (start, end, rounds) stamps of one jaxps run, after checking the final parameters."""
    import jaxps

    half = dim // 2
    params = {"a": np.zeros(half, np.float32), "b": np.zeros(dim - half, np.float32)}
    ps = jaxps.ParameterServer(
        params, optax.sgd(-1.0), shards=SHARDS, mode="async", workers=WORKERS, **server_args(transport),
    )
    try:
        with barrier_dir() as bdir:
            stamps = ps.run_workers(jaxps_worker, [(dim, rounds, warmup, bdir)] * WORKERS)
        final = ps.params()
        want = WORKERS * (warmup + rounds)
        got = (float(np.asarray(final["a"][0])), float(np.asarray(final["b"][-1])))
        if got != (want, want):
            raise AssertionError(f"jaxps/{transport}: params {got} after {want} pushes of ones, expected {want}")
        return stamps
    finally:
        ps.close()


def run(quick: bool, transports) -> dict:
    if quick:
        plan = [(10_000, 5)]
        repeats, warmup = 1, 2
    else:
        plan = [(1_000_000, 100), (10_000_000, 30)]
        repeats, warmup = 5, 3
    rows, errors = [], []
    with cpu_busy() as busy:
        for dim, rounds in plan:
            rows += _compare(dim, rounds, repeats, warmup, transports, busy, errors)
    return {"rows": rows, "workers": WORKERS, "shards": SHARDS, "repeats": repeats, "warmup": warmup, "errors": errors}


def _compare(dim: int, rounds: int, repeats: int, warmup: int, transports, busy, errors: list) -> list[dict]:
    """Rows for one D: the seed and each transport, alternating, `repeats` times."""
    servers = [ParameterServer.remote(dim // SHARDS) for _ in range(SHARDS)]
    try:
        runs: dict[str, list[float]] = {"seed": [], **{t: [] for t in transports}}
        loads: dict[str, list[float]] = {name: [] for name in runs}
        failed: dict[str, str] = {}
        for rep in range(repeats):
            for name in runs:
                if name in failed:
                    continue
                what = f"seed workload D={dim:,} {name} (repeat {rep + 1}/{repeats})"
                try:
                    stamps = run_seed_once(servers, dim, rounds, warmup) if name == "seed" else run_jaxps_once(name, dim, rounds, warmup)
                except Exception as e:
                    failed[name] = report_error(what, e)
                    errors.append(f"{what}: {failed[name]}")
                    continue
                rate, secs, _ = span_rate(stamps)
                load = busy(*span(stamps))
                runs[name].append(rate)
                if load is not None:
                    loads[name].append(load)
                cpu = "" if load is None else f", CPUs {load:.0%} busy"
                log(f"[seed] D={dim:>10,} {name:>15} repeat {rep + 1}/{repeats}: {rate:9.1f} updates/s ({WORKERS}x{rounds} rounds in {secs:.3f} s{cpu})")
        rows = []
        seed = median(runs["seed"]) if runs["seed"] else None
        for name, rates in runs.items():
            row = {"dim": dim, "rounds": rounds, "system": name if name == "seed" else f"jaxps/{name}", "updates_per_s_all": rates}
            if name in failed:
                row["error"] = failed[name]
            if loads[name]:
                row["cpu_busy"] = median(loads[name])
            if rates:
                row["updates_per_s"] = median(rates)
                if seed:
                    row["ratio_to_seed"] = row["updates_per_s"] / seed
            rows.append(row)
            if rates and seed:
                log(f"[seed] D={dim:>10,} {row['system']:>22}: median {row['updates_per_s']:9.1f} updates/s, {row['ratio_to_seed']:.2f}x the seed")
        return rows
    finally:
        for s in servers:
            try:
                ray.kill(s)
            except Exception as e:  # pragma: no cover
                log(f"  (could not kill a seed actor: {error_text(e)})")
