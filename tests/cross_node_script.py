"""Run by tests/test_ray_transport.py in a process of its own: a 2-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`), shards pinned to one node and workers to the other, so every array
crosses over the TCP data path. A sync run equals its oracle bit for bit; then the shards' node is
removed mid-step and the waiting worker gets a ShardDiedError instead of hanging."""

import os
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import optax  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import jaxps  # noqa: E402

STEPS, WORKERS = 6, 2
PARAMS = {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32), "big": np.zeros(1 << 20, np.float32)}


def grads(worker, step):
    """Integer-valued gradients: the sync mean and the sgd step are exact."""
    return {k: np.full_like(v, worker + 2 * step + 1) for k, v in PARAMS.items()}


def train(client, worker):
    for step in range(STEPS):
        client.pull()
        assert client.push(grads(worker, step)).result(120) == "applied"
    return [ch.route for ch in client.channels], ray.get_runtime_context().get_node_id()


def oracle():
    tx = optax.sgd(1.0)
    params, state = PARAMS, tx.init(PARAMS)
    for step in range(STEPS):
        mean = {k: sum(grads(w, step)[k] for w in range(WORKERS)) / WORKERS for k in PARAMS}
        updates, state = tx.update(mean, state, params)
        params = optax.apply_updates(params, updates)
    return params


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"workers": 1}, "include_dashboard": False})
    shard_node = cluster.add_node(num_cpus=1, resources={"shards": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning")
    options = {"resources": {"shards": 0.01}, "worker_options": {"resources": {"workers": 0.01}}}
    ps = jaxps.ParameterServer(PARAMS, optax.sgd(1.0), shards=2, transport="ray", mode="sync", workers=WORKERS, transport_options=options)
    try:
        where = {s["where"]["node_id"] for s in ps.stats()["shards"]}
        assert where == {shard_node.node_id}, where
        results = ps.run_workers(train, range(WORKERS))
        assert all(routes == ["tcp", "tcp"] and node != shard_node.node_id for routes, node in results), results
        final = ps.params()
        for k, want in oracle().items():
            np.testing.assert_array_equal(np.asarray(final[k]), np.asarray(want), err_msg=k)
        print("sync over tcp equal to the oracle", flush=True)

        client, _ = ps.client(0), ps.client(1)  # both join again; the driver is on the head node: TCP too
        assert [ch.route for ch in client.channels] == ["tcp", "tcp"]
        client.pull()
        client.push(grads(0, 0))  # waits for worker 1, who never comes: the step stays open
        errors = []

        def blocked_pull():
            try:
                client.pull(timeout=120)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        thread = threading.Thread(target=blocked_pull)
        thread.start()
        time.sleep(1.0)
        t = time.monotonic()
        cluster.remove_node(shard_node)
        thread.join(90)
        assert not thread.is_alive(), "the pull still waits on a removed node"
        assert errors and isinstance(errors[0], jaxps.ShardDiedError), errors
        print(f"node removed: {type(errors[0]).__name__} after {time.monotonic() - t:.1f} s: {str(errors[0])[:200]}", flush=True)
    finally:
        ps.close()
        ray.shutdown()
        cluster.shutdown()
    left = [n for n in os.listdir("/dev/shm") if n.startswith("jaxps_")]
    assert not left, left
    print("nothing left behind", flush=True)


if __name__ == "__main__":
    sys.exit(main())
