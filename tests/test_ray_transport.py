"""Ray-specific behaviour of the Ray transport, on the session's real local Ray."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_script, wait_for

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


def _identity(client, arg):
    return arg


def _an_event(client, arg):
    return threading.Event() if arg == 1 else arg


def test_what_cannot_cross_to_or_from_a_worker_task_is_named():
    """As on multiprocessing: the worker and what does not pickle, not Ray's own message; the others leave."""
    lock = threading.Lock()
    with _server(mode="sync", workers=2) as ps:
        with pytest.raises(TypeError, match="worker 0 cannot be sent to its Ray task: its function cannot be pickled"):
            ps.run_workers(lambda client, arg: lock.acquire(), [0, 1])
        with pytest.raises(TypeError, match="worker 1 cannot be sent to its Ray task: its argument cannot be pickled"):
            ps.run_workers(_identity, [1, lock])
        with pytest.raises(TypeError, match=r"worker 1's result \(Event\) cannot be pickled back to the driver"):
            ps.run_workers(_an_event, [0, 1])
        assert ps.push(ONES).result(30) == "applied" and ps.step == 1  # nobody left joined: the step did not wait
        assert ps.run_workers(_identity, [7, 8]) == [7, 8]


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
        with pytest.raises(RuntimeError, match=r"worker 1's Ray task died \(") as raised:
            ps.run_workers(work, [4, 4])
        assert isinstance(raised.value.__cause__ or raised.value.__context__, ray.exceptions.WorkerCrashedError)
        assert time.monotonic() - t0 < 50, "worker 0 waited for the dead worker until its timeout"
        assert ps.step == 4  # step 0 with both, steps 1-3 with worker 0 alone


def test_pull_sees_own_unawaited_pushes_through_the_object_store():
    big = {"w": np.zeros(1 << 20, np.float32), "v": np.zeros(1 << 18, np.float32)}  # MBs: via plasma
    ones = {k: np.ones_like(v) for k, v in big.items()}
    opts = {"data_path": "object_store"}
    with jaxps.ParameterServer(big, optax.sgd(-1.0), shards=2, transport="ray", transport_options=opts) as ps:
        assert [ch.route for ch in ps._channels] == ["object_store"] * 2
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
    return [ch.route for ch in client.channels]


def _segments():
    return {n for n in os.listdir("/dev/shm") if n.startswith("jaxps_")}


def test_clients_on_the_shard_node_use_shared_memory_and_leave_no_segments():
    before = _segments()
    with _server() as ps:
        _pull_push(ps.client(0), 3)
        assert [ch.route for ch in ps.client(0).channels] == ["shm", "shm"]
        assert ray.get(_routes.remote(ps.client(1)), timeout=120) == ["shm", "shm"]
        np.testing.assert_array_equal(ps.params()["a"], np.full((4, 3), 3.0, np.float32))
    for data_path in ("tcp", "object_store"):
        with _server(transport_options={"data_path": data_path}) as ps:
            assert ray.get(_routes.remote(ps.client(1)), timeout=120) == [data_path] * 2
            _pull_push(ps.client(0), 2)
            np.testing.assert_array_equal(ps.params()["a"], np.full((4, 3), 2.0, np.float32))
    assert _segments() <= before


def test_shared_memory_tcp_and_object_store_clients_share_a_sync_step():
    from jaxps.client import Client
    from jaxps.transports.ray_transport import RayChannel

    with _server(mode="sync", workers=3) as ps:
        local = ps.client(0)
        elsewhere = [ch.endpoint._replace(node="another-node") for ch in local.channels]  # as seen from another machine
        actors = ps._transport.actors

        def remote(worker, data_path):
            return Client(worker, ps.plan, [RayChannel(a, i, e, data_path=data_path) for i, (a, e) in enumerate(zip(actors, elsewhere))])

        tcp, store = remote(1, "auto"), remote(2, "shm")  # from another node, "auto" is TCP and "shm" the object store
        assert [[ch.route for ch in c.channels] for c in (local, tcp, store)] == [["shm"] * 2, ["tcp"] * 2, ["object_store"] * 2]
        for _ in range(3):
            local.pull(), tcp.pull(), store.pull()
            waiting = [tcp.push(ONES), store.push(ONES)]  # settled by the shared-memory push that closes the step
            sevens = {k: np.full_like(v, 7.0) for k, v in ONES.items()}
            assert local.push(sevens).result(60) == "applied"
            assert [w.result(60) for w in waiting] == ["applied"] * 2
        np.testing.assert_array_equal(tcp.pull()["a"], np.full((4, 3), 9.0, np.float32))  # 3 steps of mean 3
        assert ps.step == 3


def test_shard_actors_get_the_cpus_asked_for():
    total = ray.cluster_resources()["CPU"]
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total)
    with _server(transport_options={"num_cpus": 1}):
        assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total - 2)
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total)


def test_missing_custom_resource_is_refused_at_once():
    t = time.monotonic()
    with pytest.raises(ValueError, match="no_such_accelerator"):
        _server(transport_options={"resources": {"no_such_accelerator": 1}})
    assert time.monotonic() - t < 30


def test_busy_resources_time_out_and_free_what_was_placed():
    total = ray.cluster_resources()["CPU"]
    with pytest.raises(TimeoutError, match="not started"):
        _server(transport_options={"num_cpus": total - 1, "start_timeout": 3})  # room for one shard only
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) == total)


@pytest.mark.parametrize("data_path", ["shm", "tcp", "object_store"])
def test_killed_shard_raises_shard_died_error(data_path):
    with _server(mode="sync", workers=2, transport_options={"data_path": data_path}) as ps:
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
        if data_path != "object_store":
            os.kill(where["pid"], signal.SIGKILL)  # the shard the pull waits on first, found from its stats
        else:
            ray.kill(ps._transport.actors[0])
        thread.join(30)
        if thread.is_alive():  # say where it waits
            stack = "".join(traceback.format_stack(sys._current_frames()[thread.ident]))
            pytest.fail(f"the pull waiting on shard 0 (pid {where.get('pid')}) did not end within 30 s of its death:\n{stack}")
        assert time.monotonic() - t < 20
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


# -- the TCP data path ------------------------------------------------------------------
def test_tcp_moves_every_dtype_and_many_leaves_bit_for_bit():
    import ml_dtypes

    rng = np.random.default_rng(0)
    params = {f"w{i:03d}": rng.standard_normal((i % 7 + 1, 3)).astype(np.float32) for i in range(100)}
    params.update(bf=np.zeros((33,), ml_dtypes.bfloat16), scalar=np.float32(0), empty=np.zeros((0, 4), np.float32))
    grads = [{k: rng.standard_normal(np.shape(v)).astype(np.asarray(v).dtype) for k, v in params.items()} for _ in range(3)]
    with jaxps.ParameterServer(params, optax.sgd(0.5), shards=3, transport="ray", transport_options={"data_path": "tcp"}) as ps:
        client = ps.client(0)
        assert [ch.route for ch in client.channels] == ["tcp"] * 3
        want = params
        for g in grads:
            client.pull()
            assert client.push(g).result(60) == "applied"
            want = optax.apply_updates(want, optax.sgd(0.5).update(g, optax.sgd(0.5).init(want))[0])
        got = client.pull()
        for k in params:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
            assert np.asarray(got[k]).dtype == np.asarray(params[k]).dtype


def _evil_pickle(marker):
    class Evil:
        def __reduce__(self):
            return (open, (marker, "w"))

    import pickle

    return pickle.dumps(Evil())


def test_a_tcp_client_that_abandons_a_pull_or_stops_reading_holds_up_nobody():
    """A pull's 40 MB outgrow the sockets' buffers: the shard writes them on a thread of the connection's own, so a
    client that gave up on them (`pull(timeout=0)`) can still push, and others are served meanwhile."""
    n = 10_000_000
    with jaxps.ParameterServer(
        {"a": np.zeros(n, np.float32)}, optax.sgd(-1.0), shards=1, transport="ray", transport_options={"data_path": "tcp"}
    ) as ps:
        quitter, other = ps.client(0), ps.client(1)
        ones = {"a": np.ones(n, np.float32)}
        assert other.push(ones).result(60) == "applied"
        abandoned = False
        for _ in range(5):  # (a pull may be answered at once, before the timeout: then it was not abandoned)
            try:
                quitter.pull(timeout=0)
                assert other.push(ones).result(30) == "applied"  # a new version to pull
            except TimeoutError:
                abandoned = True
                break
        assert abandoned
        assert quitter.push(ones).result(30) == "applied"
        assert other.push(ones).result(30) == "applied"
        assert float(other.pull(timeout=30)["a"][-1]) == ps.step
        assert float(quitter.pull(timeout=30)["a"][0]) == ps.step


def test_tcp_endpoint_binds_the_node_address_and_reads_nothing_before_the_key(tmp_path):
    import socket
    from multiprocessing import connection

    from jaxps.transports import wire

    with _server(transport_options={"data_path": "tcp"}) as ps:
        endpoint = ps._channels[0].endpoint
        host, port = endpoint.tcp
        assert host == ray.util.get_node_ip_address() and host not in ("0.0.0.0", "::")
        marker = tmp_path / "unpickled"
        for attempt in ("garbage", "pickle first", "wrong key"):
            with socket.create_connection((host, port), timeout=10) as sock:
                conn = connection.Connection(os.dup(sock.fileno()))
                try:
                    if attempt == "garbage":
                        sock.sendall(b"\xff" * 4096)
                    elif attempt == "pickle first":
                        conn.send_bytes(_evil_pickle(str(marker)))
                    else:
                        with pytest.raises((connection.AuthenticationError, EOFError, OSError)):
                            connection.answer_challenge(conn, b"not the key")
                            connection.deliver_challenge(conn, b"not the key")
                    sock.settimeout(wire.HANDSHAKE_TIMEOUT + 5)
                    try:  # the endpoint hangs up without serving it
                        while sock.recv(1 << 16):
                            pass
                    except (ConnectionResetError, TimeoutError):
                        pass
                finally:
                    conn.close()
        assert not marker.exists()
        with pytest.raises(ValueError, match="data_path"):
            RayTransport(data_path="udp")
        with pytest.raises(ValueError, match="shared_memory=False means data_path='object_store'; it contradicts data_path='tcp'"):
            RayTransport(data_path="tcp", shared_memory=False)
        _pull_push(ps.client(0), 2)  # and it keeps serving the real clients
        np.testing.assert_array_equal(ps.params()["b"], np.full(5, 2.0, np.float32))


@pytest.mark.slow
def test_a_two_node_cluster_trains_over_tcp_and_a_lost_node_is_a_shard_died_error():
    """A 2-node `ray.cluster_utils.Cluster` in a process of its own (the tests' Ray session is another)."""
    stdout = run_script("cross_node_script.py")
    assert "sync over tcp equal to the oracle" in stdout
    assert "node removed: ShardDiedError" in stdout
    assert "nothing left behind" in stdout
