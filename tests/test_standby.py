"""Hot standby (`replicas=1`): a killed shard is taken over by its standby with no step lost.

The oracle: the same run with nothing killed. The standby applies its primary's
steps with the same mean gradients and the same compiled update, so a run that
loses shards (sync, Adam) must end bit for bit where the run without kills ends,
and every push must say "applied". In async mode every push adds exactly one to
every parameter: each push applied once, none lost, none twice.
"""

import concurrent.futures
import contextlib
import os
import random
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import gone, run_script, wait_for

import jaxps
from jaxps.filters import precision
from jaxps.transports import shm

STEPS, WORKERS = 60, 2


def _params():
    return {"a": jnp.arange(-8, 8, dtype=jnp.float32), "b": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) - 2, "count": jnp.float32(0)}


def _assign(path, leaf):
    return {"['a']": 0, "['b']": 1, "['count']": 1}[path]


def _grads(params, worker):
    """A function of the parameters: a push sent again to the standby is the same push."""
    return {k: jnp.sin(v) + worker for k, v in params.items()}


def _train(client, worker):
    """STEPS pulls and pushes; the outcomes of its pushes."""
    outcomes = []
    for _ in range(STEPS):
        params = client.pull(timeout=300)
        time.sleep(0.02)  # "computing"
        outcomes.append(client.push(_grads(params, worker)).result(timeout=300))
    return outcomes


def _server(transport, **kw):
    return jaxps.ParameterServer(
        _params(), optax.adam(0.1), shards=2, transport=transport, mode="sync", workers=WORKERS, assign=_assign, **kw
    )


def _where(ps, shard, role="where"):
    return ps.stats()["shards"][shard][role]


def _kill(ps, shard, how):
    """Kills shard `shard`'s primary (or, `how="standby"`, its standby's process); returns the pid."""
    if how == "standby":
        pid = _where(ps, shard, "standby")["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid
    pid = _where(ps, shard)["pid"]
    if how == "ray.kill":
        import ray

        ray.kill(ps._transport.actors[shard])
    else:
        os.kill(pid, signal.SIGKILL)
    return pid


def _has_standbys(ps):
    return all(s.get("standby") for s in ps.stats()["shards"])


@pytest.fixture(params=["multiprocessing", pytest.param("ray", marks=pytest.mark.slow)])
def replicated(request):
    """A transport that keeps standbys."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param


def test_killed_shards_are_taken_over_with_no_step_lost_bit_for_bit(replicated):
    plain = _server(replicated, replicas=1)
    try:
        plain.run_workers(_train, range(WORKERS))
        want = plain.params()
    finally:
        plain.close()

    rng = random.Random(1)
    ps = _server(replicated, replicas=1)
    prefix = getattr(ps._transport, "shm_prefix", None)
    killed, standbys = [], []

    def killer():  # twice, at random steps, a random shard (on Ray: its process, then its actor)
        for at, how in zip(sorted(rng.sample(range(5, STEPS - 10), 2)), ["sigkill", "ray.kill" if replicated == "ray" else "sigkill"]):
            while ps.step < at and not ps._closed:
                time.sleep(0.01)
            killed.append(_kill(ps, rng.randrange(2), how))
            wait_for(lambda: ps.stats()["takeovers"] == len(killed) and _has_standbys(ps), 120)

    thread = threading.Thread(target=killer)
    try:
        assert _has_standbys(ps)
        standbys = [s["standby"]["pid"] for s in ps.stats()["shards"]]
        assert not set(standbys) & {s["where"]["pid"] for s in ps.stats()["shards"]}  # a process of its own
        thread.start()
        outcomes = ps.run_workers(_train, range(WORKERS))
        thread.join(120)
        stats = ps.stats()
        assert (stats["takeovers"], stats["restarts"], stats["steps"], stats["steps_lost"]) == (2, 0, STEPS, 0)
        assert {o for out in outcomes for o in out} == {"applied"}
        pids = [s["where"]["pid"] for s in stats["shards"]] + [s["standby"]["pid"] for s in stats["shards"] if s["standby"]]
        assert not set(pids) & set(killed)
        final = ps.params()
        for key in want:
            np.testing.assert_array_equal(np.asarray(final[key]), np.asarray(want[key]), err_msg=key)
    finally:
        ps.close()
    assert wait_for(lambda: all(gone(pid) for pid in killed + pids + standbys), 30)  # nothing left behind
    if prefix is not None:
        assert shm.sweep(prefix) == []


@pytest.mark.slow
def test_a_bfloat16_shard_taken_over_ends_bit_for_bit_where_it_would_have():
    """bfloat16 leaves (numpy pickles them in band) reach the standby as they were: its whole state first,
    then each step's mean gradients, both out of band (`wire.send`)."""
    params = {"w": jnp.linspace(-1, 1, 50_000, dtype=jnp.bfloat16), "v": jnp.ones((200, 200), jnp.bfloat16)}

    def run(kill_at=None):
        with jaxps.ParameterServer(params, optax.adam(0.01), transport="multiprocessing", replicas=1) as ps:
            assert wait_for(lambda: _has_standbys(ps), 60)
            for k in range(6):
                if k == kill_at:
                    _kill(ps, 0, "sigkill")
                    assert wait_for(lambda: ps.stats()["takeovers"] == 1, 120)
                pulled = ps.pull(timeout=120)
                ps.push({key: jnp.sin(x + k) for key, x in pulled.items()}).result(timeout=120)
            assert ps.stats()["steps_lost"] == 0
            return {key: np.asarray(x) for key, x in ps.params().items()}

    want, got = run(), run(kill_at=3)
    for key in params:
        assert got[key].dtype == jnp.bfloat16 and got[key].tobytes() == want[key].tobytes(), key


def test_a_taken_over_shard_gets_a_new_standby_at_the_first_try(replicated, capfd):
    """The supervisor's own connection to the dead primary is not used for the new standby's `Replicate`:
    the new standby starts at once, not after a failed try and `STANDBY_RETRY` seconds alone."""
    with _server(replicated, replicas=1) as ps:
        assert wait_for(lambda: _has_standbys(ps), 60)
        ps.stats()  # the supervisor's connections are made and idle, as in a long run
        _kill(ps, 1, "sigkill")
        log = []  # (a standby is listed once its process runs, before it has its primary's state: wait for the line)
        assert wait_for(lambda: log.append(capfd.readouterr().err) or "shard 1 has a new standby" in "".join(log), 60)
        assert ps.stats()["takeovers"] == 1 and "could not start" not in "".join(log), "".join(log)


def test_a_push_in_flight_when_its_shard_dies_is_applied_by_the_standby(replicated):
    ps = _server(replicated, replicas=1)
    try:
        a, b = ps.client(0), ps.client(1)
        start = a.pull()
        b.pull()
        pending = a.push(_grads(start, 0))  # waits for worker 1's push: step 0 is open on the shard that dies
        _kill(ps, 1, "sigkill")
        with concurrent.futures.ThreadPoolExecutor(1) as other:  # worker 1 in a thread of its own, as workers are
            done = other.submit(lambda: b.push(_grads(start, 1)).result(timeout=120))
            assert (pending.result(timeout=120), done.result(timeout=120)) == ("applied", "applied")
        after = a.pull(timeout=120)
        assert not np.array_equal(np.asarray(after["count"]), np.asarray(start["count"]))  # the step reached the new primary
        stats = ps.stats()
        assert (stats["steps"], stats["takeovers"], stats["pushes_applied"], stats["pushes_rolled_back"]) == (1, 1, 2, 0)
    finally:
        ps.close()


def test_a_request_with_a_timeout_does_not_wait_out_a_recovery(replicated):
    """The supervisor asks the primaries for their stats once a second, with a timeout, and runs the take-overs:
    a primary that dies while it asks must not hold it for the recovery's whole patience (300 s). With nobody
    to take over, a request with a timeout to the dead shard raises TimeoutError within its timeout."""
    from jaxps.service import Stats

    ps = _server(replicated, replicas=1)
    try:
        worker = ps.client(0)
        worker.pull()
        ps._supervisor.close()  # nobody takes over
        pid = _kill(ps, 0, "sigkill")
        wait_for(lambda: gone(pid), 30)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"shard 0 died and was not back within [0-9.]+ s \(it is being recovered\)"):
            ps._channels[0].submit(Stats(), timeout=1).result(2)
        with pytest.raises(TimeoutError, match="it is being recovered"):  # a worker's pull with a timeout likewise
            worker.pull(timeout=1)
        assert time.monotonic() - started < 15
    finally:
        ps.close()


@pytest.mark.parametrize("then", ["pull", pytest.param("leave", marks=pytest.mark.slow)])
def test_a_client_sends_its_lost_push_again_before_its_next_pull_or_leave(then):
    """Worker 0's push is open on both shards (worker 1 is slow) when shard 0 dies; its pull (or leave) must not
    reach the standby ahead of that push: the step takes both workers' pushes, and the pull sees it."""
    ps = _server("multiprocessing", replicas=1)
    try:
        a, b = ps.client(0), ps.client(1)
        start = a.pull()
        b.pull()
        pending = a.push(_grads(start, 0))
        _kill(ps, 0, "sigkill")
        assert wait_for(lambda: ps.stats()["takeovers"] == 1, 60)
        with concurrent.futures.ThreadPoolExecutor(1) as worker_0:
            next_call = worker_0.submit(a.pull if then == "pull" else a.leave, *([120] if then == "pull" else []))
            time.sleep(0.5)
            assert b.push(_grads(start, 1)).result(timeout=120) == "applied"
            seen = next_call.result(timeout=120)
        assert pending.result(timeout=120) == "applied"
        stats = ps.stats()
        assert (stats["steps"], stats["pushes_applied"]) == (1, 2)
        if then == "pull":
            np.testing.assert_array_equal(np.asarray(seen["a"]), np.asarray(ps.params()["a"]))
    finally:
        ps.close()


def _push_ones(client, pushes):
    outcomes = []
    for _ in range(pushes):
        params = client.pull(timeout=300)
        time.sleep(0.01)
        outcomes.append(client.push(jax.tree.map(jnp.ones_like, params)))
    return [f.result(timeout=300) for f in outcomes]


def test_async_every_push_is_applied_once_across_a_take_over():
    """Every push adds one to every leaf; pushes are left in flight (their futures read at the end)."""
    zeros = jax.tree.map(jnp.zeros_like, _params())
    ps = jaxps.ParameterServer(zeros, optax.sgd(-1.0), shards=2, transport="multiprocessing", mode="async", assign=_assign, replicas=1)
    try:
        def killer():
            while ps.step < 25:
                time.sleep(0.01)
            _kill(ps, 0, "sigkill")

        thread = threading.Thread(target=killer)
        thread.start()
        outcomes = ps.run_workers(_push_ones, [30, 30])
        thread.join(60)
        stats = ps.stats()
        values = {float(v) for leaf in jax.tree_util.tree_leaves(ps.params()) for v in np.asarray(leaf).ravel()}
        assert values == {60.0} and stats["steps"] == 60 and stats["takeovers"] == 1
        assert [o for out in outcomes for o in out] == ["applied"] * 60
    finally:
        ps.close()


@pytest.mark.slow
def test_a_dead_standby_is_replaced_and_its_successor_takes_over():
    ps = _server("multiprocessing", replicas=1)
    try:
        clients = [ps.client(0), ps.client(1)]
        _steps(ps, clients, 3)
        first = _kill(ps, 0, "standby")
        assert wait_for(lambda: _has_standbys(ps) and _where(ps, 0, "standby")["pid"] != first, 60)
        _steps(ps, clients, 3)
        _kill(ps, 0, "sigkill")  # the new standby has every step, from its primary's state and stream
        _steps(ps, clients, 3)
        final, stats = ps.params(), ps.stats()
        assert (stats["steps"], stats["takeovers"]) == (9, 1)
    finally:
        ps.close()
    with _server("multiprocessing") as plain:  # the same nine steps, nothing killed
        _steps(plain, [plain.client(0), plain.client(1)], 9)
        want = plain.params()
    for key in want:
        np.testing.assert_array_equal(np.asarray(final[key]), np.asarray(want[key]), err_msg=key)


def test_a_shard_that_dies_with_its_standby_ends_the_run_saying_so():
    """No checkpoint to go back to: the run ends with `ShardDiedError`, not a hang."""
    ps = _server("multiprocessing", replicas=1)
    try:
        pids = [_kill(ps, 1, "standby"), _kill(ps, 1, "sigkill")]
        assert wait_for(lambda: all(gone(pid) for pid in pids), 20)
        with pytest.raises(jaxps.ShardDiedError, match="shard 1"):
            ps.client(0).pull(timeout=60)
    finally:
        ps.close()


def test_a_shard_that_dies_while_its_new_standby_starts_ends_the_run_saying_so():
    """The primary is killed while the supervisor starts a standby to replace a dead one: the standby's start
    fails at once (its `Replicate` does not wait for a recovery only the supervisor could run), and the run ends
    with `ShardDiedError`, not a wait for the recovery timeout."""
    ps = _server("multiprocessing", replicas=1)
    with _closed_promptly(ps, within=30):
        _kill(ps, 1, "standby")
        time.sleep(1.0)  # the supervisor is starting the new standby's process (a spawn takes seconds)
        _kill(ps, 1, "sigkill")
        _pull_says_shard_1_died(ps, within=60)


@contextlib.contextmanager
def _closed_promptly(ps, within):
    """Closes `ps` as the block ends, however it ends, and checks that `close()` took under `within` seconds (it
    did not wait for a recovery)."""
    try:
        yield
    finally:
        started = time.monotonic()
        ps.close()
        assert time.monotonic() - started < within


def _pull_says_shard_1_died(ps, within):
    started = time.monotonic()
    with pytest.raises(jaxps.ShardDiedError, match="shard 1"):
        ps.client(0).pull(timeout=120)
    assert time.monotonic() - started < within


def test_a_primary_that_dies_just_before_the_supervisor_feeds_it_a_new_standby_is_not_waited_for():
    """The window of the test above opened on purpose: the primary dies after the supervisor last saw it alive and
    before it reaches it to feed a new standby. Reaching it does not wait for a recovery only the supervisor itself
    could run (it waited 60 s, and `close()` with it): the run ends with `ShardDiedError`, and `close()` is prompt."""
    ps = _server("multiprocessing", replicas=1)
    transport = ps._transport
    start_standby, dead, hidden, killed = transport.start_standby, transport.dead, [], threading.Event()
    primary = _where(ps, 1)["pid"]

    def start_standby_then_kill_the_primary(config):
        channel = start_standby(config)
        os.kill(primary, signal.SIGKILL)
        assert wait_for(lambda: gone(primary), 20)
        hidden.append(config.index)  # from the supervisor's next look, which is its last before reaching the primary
        killed.set()
        return channel

    def dead_but_hidden():
        found = dead()
        if hidden:
            shard = hidden.pop()
            found = [i for i in found if i != shard]
        return found

    transport.start_standby, transport.dead = start_standby_then_kill_the_primary, dead_but_hidden
    with _closed_promptly(ps, within=15):
        _kill(ps, 1, "standby")
        assert killed.wait(60)
        _pull_says_shard_1_died(ps, within=40)


def _steps(ps, clients, n):
    """`n` sync steps driven from this thread: every client pulls, then pushes, then each push is answered."""
    for _ in range(n):
        pulled = [c.pull(timeout=120) for c in clients]
        futures = [c.push(_grads(p, w)) for w, (c, p) in enumerate(zip(clients, pulled))]
        assert [f.result(timeout=120) for f in futures] == ["applied"] * len(clients)


@pytest.mark.slow
def test_with_a_checkpoint_a_shard_that_dies_with_its_standby_rolls_back_and_standbys_start_over(tmp_path):
    ps = _server("multiprocessing", replicas=1, checkpoint=jaxps.Checkpointing(tmp_path, every=2), on_shard_failure="restart")
    ps._supervisor._max_restarts = 4  # three deaths in a few seconds here (the default gives up at the third)
    try:
        clients = [ps.client(0), ps.client(1)]
        _steps(ps, clients, 5)
        assert wait_for(lambda: max(jaxps.checkpoint.steps(tmp_path)) > 0, 30)
        saved = max(jaxps.checkpoint.steps(tmp_path))
        pids = [_kill(ps, 1, "standby"), _kill(ps, 1, "sigkill")]
        assert wait_for(lambda: all(gone(pid) for pid in pids), 20)
        assert wait_for(lambda: ps.stats()["restarts"] == 1 and _has_standbys(ps), 120)  # back to the checkpoint, a new standby
        assert ps.step == saved and ps.stats()["steps_lost"] == 5 - saved
        _steps(ps, clients, 3)
        _kill(ps, 0, "sigkill")  # its standby started over from the rolled-back primary
        _steps(ps, clients, 3)
        final, stats = ps.params(), ps.stats()
        assert (stats["steps"], stats["restarts"], stats["takeovers"]) == (saved + 6, 1, 1)
    finally:
        ps.close()
    with _server("multiprocessing") as plain:  # as many steps, nothing killed
        _steps(plain, [plain.client(0), plain.client(1)], saved + 6)
        want = plain.params()
    for key in want:
        np.testing.assert_array_equal(np.asarray(final[key]), np.asarray(want[key]), err_msg=key)


def test_replicas_refuse_what_they_cannot_keep():
    params = _params()
    with pytest.raises(ValueError, match="0 .no standby. or 1"):
        jaxps.ParameterServer(params, optax.sgd(1.0), replicas=2)
    with pytest.raises(ValueError, match="in-process shards live and die with this process"):
        jaxps.ParameterServer(params, optax.sgd(1.0), replicas=1)
    with pytest.raises(ValueError, match="push_filter"):
        jaxps.ParameterServer(params, optax.sgd(1.0), transport="multiprocessing", push_filter=precision(jnp.bfloat16), replicas=1)
    with pytest.raises(ValueError, match="backup workers on several shards"):
        jaxps.ParameterServer(
            params, optax.sgd(1.0), shards=2, transport="multiprocessing", mode="sync", workers=3, backup_workers=1, replicas=1
        )
    with _server("multiprocessing", replicas=1) as ps:
        with pytest.raises(ValueError, match="reshard of a server with replicas=1"):
            ps.reshard(1)


@pytest.mark.slow
def test_a_ray_node_lost_mid_run_its_shards_standby_takes_over():
    """A 3-node `ray.cluster_utils.Cluster` in a process of its own (the tests' Ray session is another)."""
    assert "bit for bit the run without the loss" in run_script("standby_node_script.py")
