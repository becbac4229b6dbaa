"""Run by tests/test_failover.py in a process of its own: a 4-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`); the node holding shard 0 is removed mid-run, the shard comes back on
another node, and the run ends bit for bit where a plain loop ends."""

import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optax  # noqa: E402

import jaxps  # noqa: E402
from helpers import ray_cluster  # noqa: E402
from test_failover import STEPS, WORKERS, _assert_as_if_nothing_died, _assign, _params, _train_slowly  # noqa: E402


def main() -> None:
    with ray_cluster(*[{"num_cpus": 0, "resources": {"slot": 1}}] * 3) as (cluster, nodes):  # one shard a node
        run(cluster, nodes)


def run(cluster, nodes) -> None:
    directory = tempfile.mkdtemp()
    ps = jaxps.ParameterServer(
        _params(), optax.sgd(1.0), shards=2, transport="ray", mode="sync", workers=WORKERS, assign=_assign,
        transport_options={"resources": {"slot": 1}},
        checkpoint=jaxps.Checkpointing(directory, every=5), on_shard_failure="restart",
    )
    try:
        before = [s["where"]["node_id"] for s in ps.stats()["shards"]]

        def remove_the_node_of_shard_0():
            while ps.step < 20:
                time.sleep(0.02)
            node = next(n for n in nodes if n.node_id == before[0])
            print(f"removing node {node.node_id[:8]} (shard 0) at step {ps.step}", flush=True)
            cluster.remove_node(node)

        killer = threading.Thread(target=remove_the_node_of_shard_0)
        killer.start()
        ps.run_workers(_train_slowly, range(WORKERS))
        killer.join()
        stats = ps.stats()
        after = [s["where"]["node_id"] for s in stats["shards"]]
        print("restarts", stats["restarts"], "rolled back to", stats["rolled_back_to"], flush=True)
        assert stats["restarts"] == 1 and stats["steps"] == STEPS, stats
        assert after[0] not in before and after[1] == before[1], (before, after)  # shard 0 moved to the free node
        _assert_as_if_nothing_died(ps)
        print("equal to the plain loop", flush=True)
    finally:
        ps.close()


if __name__ == "__main__":
    main()
