"""Run by tests/test_standby.py in a process of its own: a 3-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), each shard's standby on another node than its primary; the node holding
shard 0's primary is removed mid-run, its standby takes over, and the run ends bit for bit where the same
run without the loss ends."""

import os
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from helpers import ray_cluster  # noqa: E402
from test_standby import STEPS, WORKERS, _server, _train  # noqa: E402

ON_SLOTS = {"transport_options": {"resources": {"slot": 1}}}  # shards and standbys on the two slot nodes


def main() -> None:
    with ray_cluster(*[{"num_cpus": 0, "resources": {"slot": 4}}] * 2) as (cluster, nodes):  # workers run on the head
        plain = _server("ray", replicas=1, **ON_SLOTS)
        try:
            plain.run_workers(_train, range(WORKERS))
            want = plain.params()
        finally:
            plain.close()
        run(cluster, nodes, want)


def run(cluster, nodes, want) -> None:
    ps = _server("ray", replicas=1, **ON_SLOTS)
    try:
        shards = ps.stats()["shards"]
        before = [(s["where"]["node_id"], s["standby"]["node_id"]) for s in shards]
        assert all(primary != standby for primary, standby in before), before  # a standby on another node

        def remove_the_node_of_shard_0():
            while ps.step < 15:
                time.sleep(0.02)
            node = next(n for n in nodes if n.node_id == before[0][0])
            print(f"removing node {node.node_id[:8]} (shard 0's primary) at step {ps.step}", flush=True)
            cluster.remove_node(node)

        killer = threading.Thread(target=remove_the_node_of_shard_0)
        killer.start()
        outcomes = ps.run_workers(_train, range(WORKERS))
        killer.join()
        stats = ps.stats()
        print("takeovers", stats["takeovers"], "restarts", stats["restarts"], flush=True)
        assert stats["takeovers"] >= 1 and stats["restarts"] == 0 and stats["steps"] == STEPS, stats
        assert {o for out in outcomes for o in out} == {"applied"}
        assert stats["shards"][0]["where"]["node_id"] == before[0][1]  # the standby's node
        final = ps.params()
        for key in want:
            np.testing.assert_array_equal(np.asarray(final[key]), np.asarray(want[key]), err_msg=key)
        print("bit for bit the run without the loss", flush=True)
    finally:
        ps.close()


if __name__ == "__main__":
    main()
