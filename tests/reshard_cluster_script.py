"""Run by tests/test_reshard.py in a process of its own: scaling out on a Ray cluster on this machine
(`ray.cluster_utils.Cluster`). A server starts with 2 shards pinned to one node; a node joins the cluster;
mid-run the server reshards onto it (4 shards, placed there by a resource only it has); the workers
follow, and the run ends bit for bit where a plain optax loop ends."""

import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optax  # noqa: E402

import jaxps  # noqa: E402
from helpers import assert_trees_equal, mean, optax_oracle, params_tree, ray_cluster  # noqa: E402
from test_reshard import MORE, _gradient, _total, _train_sync  # noqa: E402


def main() -> None:
    with ray_cluster({"num_cpus": 0, "resources": {"first": 2}}) as (cluster, (first,)):
        run(cluster, first)


def run(cluster, first) -> None:
    tx = optax.sgd(0.05, momentum=0.9)
    ps = jaxps.ParameterServer(
        params_tree(), tx, shards=2, transport="ray", mode="sync", workers=2, transport_options={"resources": {"first": 1}}
    )
    try:
        before = {s["where"]["node_id"] for s in ps.stats()["shards"]}
        assert before == {first.node_id}, before
        node = cluster.add_node(num_cpus=0, resources={"second": 4})  # the cluster grows under the running server
        cluster.wait_for_nodes()
        results = []
        path = os.path.join(tempfile.mkdtemp(), "steps")  # how many steps the workers make: written once resharded
        training = threading.Thread(target=lambda: results.extend(ps.run_workers(_train_sync, [(0, path), (1, path)])))
        training.start()
        try:
            while ps.step < 12:
                time.sleep(0.02)
            print(f"resharding onto node {node.node_id[:8]} at step {ps.step}", flush=True)
            ps.reshard(4, transport_options={"resources": {"second": 1}})
            print(f"resharded at step {ps.step}", flush=True)
        finally:
            with open(path + ".tmp", "w") as f:
                f.write(str(ps.step + MORE))
            os.replace(path + ".tmp", path)
        training.join()
        steps = _total(path)
        after = {s["where"]["node_id"] for s in ps.stats()["shards"]}
        assert after == {node.node_id}, (after, node.node_id)
        assert [shards for shards, _ in results] == [4, 4] and ps.step == steps
        step, expected, state = optax_oracle(tx), params_tree(), tx.init(params_tree())
        for _ in range(steps):
            expected, state = step(expected, state, mean([_gradient(expected, w) for w in range(2)]))
        assert_trees_equal(ps.params(), expected)
        print("equal to the plain loop", flush=True)
    finally:
        ps.close()


if __name__ == "__main__":
    main()
