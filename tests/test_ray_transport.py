"""Ray-specific behaviour of the Ray transport, on the session's real local Ray."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxps

ray = pytest.importorskip("ray")
from jaxps.transports.ray_transport import RayTransport  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")

PARAMS = {"a": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32), "c": np.zeros((), np.float32)}
ONES = {k: np.ones_like(v) for k, v in PARAMS.items()}


def _server(**kw):
    kw.setdefault("shards", 2)
    return jaxps.ParameterServer(PARAMS, optax.sgd(-1.0), transport="ray", **kw)


def _pull_push(client, n):
    for _ in range(n):
        client.pull()
        assert client.push(ONES).result(60) == "applied"
    return client.worker


@ray.remote(num_cpus=0.01)
def _task(client, n):
    return _pull_push(client, n)


@ray.remote(num_cpus=0.01)
class _Trainer:
    def __init__(self, client):
        self.client = client

    def run(self, n):
        return _pull_push(self.client, n)


def _wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_client_travels_into_a_task_and_an_actor():
    with _server() as ps:
        trainer = _Trainer.remote(ps.client(1))
        results = ray.get([_task.remote(ps.client(0), 5), trainer.run.remote(7)], timeout=120)
        assert results == [0, 1]
        ray.kill(trainer)
        for leaf in ps.params().values():
            np.testing.assert_array_equal(leaf, np.full(leaf.shape, 12.0, np.float32))
        assert ps.stats()["shards"][0]["worker_pushes"] == [5, 7]


def test_run_workers_runs_ray_tasks_in_order_of_args():
    def work(client, n):
        import os

        _pull_push(client, n)
        return client.worker, os.getpid()

    with _server(mode="sync", workers=2) as ps:
        results = ps.run_workers(work, [3, 5])
        assert [w for w, _ in results] == [0, 1]
        assert all(pid != __import__("os").getpid() for _, pid in results)  # ran in Ray worker processes
        # sync: 3 steps of both workers' mean (1), then 2 of worker 1 alone once worker 0 left
        assert ps.step == 5
        np.testing.assert_array_equal(ps.params()["a"], np.full((4, 3), 5.0, np.float32))


def test_a_worker_task_whose_process_dies_leaves_so_the_others_go_on():
    def work(client, steps):
        import os

        for t in range(steps):
            client.pull(timeout=60)
            if client.worker == 1 and t == 1:
                os._exit(3)  # its Ray worker process dies without leaving
            client.push(ONES).result(60)
        return steps

    with _server(mode="sync", workers=2) as ps:
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.RayError):
            ps.run_workers(work, [4, 4])
        assert time.monotonic() - t0 < 50, "worker 0 waited for the dead worker until its timeout"
        assert ps.step == 4  # step 0 with both, steps 1-3 with worker 0 alone


def test_pull_sees_own_unawaited_pushes_through_the_object_store():
    big = {"w": np.zeros(1 << 20, np.float32), "v": np.zeros(1 << 18, np.float32)}  # MBs: via plasma
    ones = {k: np.ones_like(v) for k, v in big.items()}
    opts = {"shared_memory": False}
    with jaxps.ParameterServer(big, optax.sgd(-1.0), shards=2, transport="ray", transport_options=opts) as ps:
        assert not any(ch.via_shared_memory for ch in ps._channels)
        futures = []
        for i in range(10):
            tree = ps.pull()
            assert float(tree["w"][0]) == float(tree["v"][-1]) == i
            futures.append(ps.push(ones))  # not awaited: the next pull must still see it
        assert [f.result(60) for f in futures] == ["applied"] * 10
        assert isinstance(ps.pull()["w"], jnp.ndarray)


@ray.remote(num_cpus=0.01)
def _routes(client):
    client.pull()
    return [ch.via_shared_memory for ch in client.channels]


def _segments():
    return {n for n in os.listdir("/dev/shm") if n.startswith("jaxps_")}


def test_clients_on_the_shard_node_use_shared_memory_and_leave_no_segments():
    before = _segments()
    with _server() as ps:
        _pull_push(ps.client(0), 3)
        assert [ch.via_shared_memory for ch in ps.client(0).channels] == [True, True]
        assert ray.get(_routes.remote(ps.client(1)), timeout=120) == [True, True]
        np.testing.assert_array_equal(ps.params()["a"], np.full((4, 3), 3.0, np.float32))
    with _server(transport_options={"shared_memory": False}) as ps:
        assert ray.get(_routes.remote(ps.client(1)), timeout=120) == [False, False]
    assert _segments() <= before


def test_shared_memory_and_object_store_clients_share_a_sync_step():
    from jaxps.client import Client
    from jaxps.transports.ray_transport import RayChannel

    with _server(mode="sync", workers=2) as ps:
        local = ps.client(0)
        elsewhere = [ch.endpoint._replace(node="another-node") for ch in local.channels]  # as seen from another machine
        remote = Client(1, ps.plan, [RayChannel(a, i, e) for i, (a, e) in enumerate(zip(ps._transport.actors, elsewhere))])
        assert [ch.via_shared_memory for ch in local.channels] == [True, True]
        assert [ch.via_shared_memory for ch in remote.channels] == [False, False]
        for _ in range(3):
            local.pull(), remote.pull()
            waiting = remote.push(ONES)  # through Ray: settled by the shared-memory push that closes the step
            threes = {k: np.full_like(v, 3.0) for k, v in ONES.items()}
            assert local.push(threes).result(60) == "applied"
            assert waiting.result(60) == "applied"
        np.testing.assert_array_equal(ps.params()["a"], np.full((4, 3), 6.0, np.float32))  # 3 steps of mean 2
        assert ps.step == 3


def test_shard_actors_get_the_cpus_asked_for():
    total = ray.cluster_resources()["CPU"]
    assert _wait_for(lambda: ray.available_resources().get("CPU", 0) == total)
    with _server(transport_options={"num_cpus": 1}):
        assert _wait_for(lambda: ray.available_resources().get("CPU", 0) == total - 2)
    assert _wait_for(lambda: ray.available_resources().get("CPU", 0) == total)


def test_missing_custom_resource_is_refused_at_once():
    t = time.monotonic()
    with pytest.raises(ValueError, match="no_such_accelerator"):
        _server(transport_options={"resources": {"no_such_accelerator": 1}})
    assert time.monotonic() - t < 30


def test_busy_resources_time_out_and_free_what_was_placed():
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(TimeoutError, match="not started"):
        _server(transport_options={"num_cpus": total - 1, "start_timeout": 3})  # room for one shard only
    assert _wait_for(lambda: ray.available_resources().get("CPU", 0) == total)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_killed_shard_raises_shard_died_error(shared_memory):
    with _server(mode="sync", workers=2, transport_options={"shared_memory": shared_memory}) as ps:
        waiting = ps.client(0)
        waiting.pull()
        waiting.push(ONES)
        errors = []

        def blocked_pull():  # waits for worker 1's push, which never comes
            try:
                waiting.pull(timeout=60)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        thread = threading.Thread(target=blocked_pull)
        thread.start()
        time.sleep(0.5)
        where = ps.stats()["shards"][0]["where"]
        assert where["actor_id"] == ps._transport.actors[0]._actor_id.hex()
        assert where["node_id"] == ray.get_runtime_context().get_node_id()
        t = time.monotonic()
        if shared_memory:
            os.kill(where["pid"], signal.SIGKILL)  # the shard the pull waits on first, found from its stats
        else:
            ray.kill(ps._transport.actors[0])
        thread.join(30)
        assert not thread.is_alive() and time.monotonic() - t < 20
        assert isinstance(errors[0], jaxps.ShardDiedError) and "shard 0" in str(errors[0])
        with pytest.raises(jaxps.ShardDiedError, match="shard 0"):
            ps.client(1).push(ONES).result(30)
        with pytest.raises(jaxps.ShardDiedError, match="shard 0"):
            ps.stats()


def test_close_kills_every_shard_actor_and_is_idempotent():
    ps = _server(shards=3)
    actors = ps._transport.actors
    assert ray.get([a.ready.remote() for a in actors], timeout=30) == [0, 1, 2]
    ps.close()
    ps.close()
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ready.remote(), timeout=30)
    assert ray.is_initialized()  # it joined the session's Ray: left running


def test_ray_started_by_transports_is_shut_down_with_the_last_of_them():
    script = textwrap.dedent(
        """
        import os
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import numpy as np, optax, ray, jaxps
        assert not ray.is_initialized()
        opts = {"address": "local", "init_options": {"num_cpus": 1, "logging_level": "warning"}}
        other = jaxps.ParameterServer({"v": np.zeros(2, np.float32)}, optax.sgd(-1.0), transport="ray",
                                      transport_options=opts)  # started Ray
        with jaxps.ParameterServer({"w": np.zeros(3, np.float32)}, optax.sgd(-1.0), transport="ray",
                                   transport_options=opts) as ps:  # uses that session
            other.close()  # must not shut Ray down under ps
            ps.push({"w": np.ones(3, np.float32)}).result(60)
            assert ray.is_initialized()
            assert float(ps.params()["w"][0]) == 1.0
        print("initialized after close:", ray.is_initialized())
        # the user shuts the session down and a later server starts another: the old server's close leaves it
        old = jaxps.ParameterServer({"v": np.zeros(2, np.float32)}, optax.sgd(-1.0), transport="ray", transport_options=opts)
        ray.shutdown()
        new = jaxps.ParameterServer({"v": np.zeros(2, np.float32)}, optax.sgd(-1.0), transport="ray", transport_options=opts)
        old.close()
        assert new.push({"v": np.ones(2, np.float32)}).result(60) == "applied"
        new.close()
        print("initialized after the second session:", ray.is_initialized())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized after close: False" in out.stdout
    assert "initialized after the second session: False" in out.stdout


def test_transport_instance_reuses_the_running_session():
    transport = RayTransport()
    with jaxps.ParameterServer(PARAMS, optax.sgd(-1.0), transport=transport) as ps:
        ps.push(ONES).result(60)
    assert transport.actors == []
    assert ray.is_initialized()
