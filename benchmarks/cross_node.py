"""Workers on another Ray node than the shards: jaxps's data paths against the seed's Ray parameter server.

    python benchmarks/cross_node.py [--dim 10e6] [--rounds 20] [--repeats 5] [--systems seed,tcp,object_store]

A 2-node `ray.cluster_utils.Cluster` on this machine: the head node holds the
shards (custom resource `shards`), a second node runs the workers (`workers`).
Nodes on one machine still talk as Ray nodes do: separate raylets and object
stores, objects copied between them by Ray's object manager. The seed's
workload (benchmarks/seed_ps.py: D float32 elements in 2 shards, 2 workers,
each round a pull of every shard and a fire-and-forget push of `np.ones(D)`,
the last push waited for) runs in the same placement:

- seed:          the seed's 15-line numpy Ray parameter server (actors on the shard node);
- tcp:           jaxps over Ray, `data_path="tcp"` (what "auto" picks from another node): arrays over TCP;
- object_store:  jaxps over Ray, `data_path="object_store"`: every array through Ray's object store.

updates/s = 2 workers x rounds / (last worker's end - first worker's start);
systems alternate, `--repeats` times; the report gives each system's median
and range and its ratio to the seed's median.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import optax  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from benchmarks.common import barrier_dir, log, median, set_worker_path, span_rate  # noqa: E402
from benchmarks.seed_ps import SHARDS, WORKERS, ParameterServer, jaxps_worker, worker  # noqa: E402

ON_SHARD_NODE = {"num_cpus": 0, "resources": {"shards": 0.01}}
ON_WORKER_NODE = {"num_cpus": 0.01, "resources": {"workers": 0.01}}


def run_seed(dim: int, rounds: int, warmup: int):
    servers = [ParameterServer.options(**ON_SHARD_NODE).remote(dim // SHARDS) for _ in range(SHARDS)]
    try:
        with barrier_dir() as bdir:
            task = worker.options(**ON_WORKER_NODE)
            return ray.get([task.remote(dim, rounds, warmup, bdir, i, *servers) for i in range(WORKERS)])
    finally:
        for s in servers:
            ray.kill(s)


def run_jaxps(data_path: str, dim: int, rounds: int, warmup: int):
    import jaxps

    half = dim // 2
    params = {"a": np.zeros(half, np.float32), "b": np.zeros(dim - half, np.float32)}
    options = {"data_path": data_path, "resources": ON_SHARD_NODE["resources"], "worker_options": ON_WORKER_NODE}
    with jaxps.ParameterServer(params, optax.sgd(-1.0), shards=SHARDS, mode="async", workers=WORKERS, transport="ray", transport_options=options) as ps:
        with barrier_dir() as bdir:
            stamps = ps.run_workers(jaxps_worker, [(dim, rounds, warmup, bdir)] * WORKERS)
        want = WORKERS * (warmup + rounds)
        final = ps.params()
        if (float(final["a"][0]), float(final["b"][-1])) != (want, want):
            raise AssertionError(f"jaxps/{data_path}: params are not {want} after {want} pushes of ones")
        return stamps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=float, default=10e6)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--systems", default="seed,tcp,object_store")
    args = p.parse_args()
    dim, systems = int(args.dim), args.systems.split(",")
    set_worker_path()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"shards": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"workers": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="error")
    log(f"command: python {' '.join(sys.argv)}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs; "
        f"2-node ray.cluster_utils.Cluster: shards on the head node, {WORKERS} workers on the other; D = {dim:,} float32, {SHARDS} shards, "
        f"{args.rounds} rounds after {args.warmup} warm-up")
    rates: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for rep in range(args.repeats):
            for system in systems:
                stamps = run_seed(dim, args.rounds, args.warmup) if system == "seed" else run_jaxps(system, dim, args.rounds, args.warmup)
                rate, secs, _ = span_rate(stamps)
                rates[system].append(rate)
                log(f"repeat {rep + 1}/{args.repeats} {system:>12}: {rate:7.2f} updates/s ({secs:.2f} s)")
        seed = median(rates["seed"]) if rates.get("seed") else None
        for system, xs in rates.items():
            ratio = f", {median(xs) / seed:.2f}x the seed" if seed and system != "seed" else ""
            log(f"{system:>12}: median {median(xs):7.2f} updates/s (range {min(xs):.2f}-{max(xs):.2f}){ratio}")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
