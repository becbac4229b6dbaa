"""Fail-over: a killed shard is restarted from the latest checkpoint, every shard rolls back to it, training goes on.

The oracle: workers push a gradient that is a function of the parameters they
pulled (integer-valued, so every sum is exact), in sync mode. Whatever was
rolled back is computed again from the same parameters, so a run that loses
shards must end bit for bit where a plain loop of the same number of steps
ends: a step lost silently, or applied twice, would show.
"""

import functools
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
from jaxps.consistency import Clock, Contribution, Sync
from jaxps.failover import EPOCH, next_epoch
from jaxps.transports import shm

STEPS, WORKERS = 60, 2


def _params():
    return {
        "a": jnp.arange(-8, 8, dtype=jnp.float32),
        "b": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) - 2,
        "count": jnp.float32(0),
    }


def _assign(path, leaf):
    return {"['a']": 0, "['b']": 1, "['count']": 1}[path]


def _grads(params, worker):
    """Integer-valued, a function of the parameters: computed again after a rollback, it is the same."""
    g = {k: jnp.sign(v) + worker for k, v in params.items() if k != "count"}
    return {**g, "count": jnp.float32(-1.0)}


def _oracle(steps):
    p = _params()
    for _ in range(steps):
        gs = [_grads(p, w) for w in range(WORKERS)]
        mean = jax.tree.map(lambda *g: sum(g[1:], g[0]) / len(g), *gs)
        p = jax.tree.map(lambda x, g: x - g, p, mean)
    return p


def _train(client, worker, pause=0.0):
    """Pull and push until STEPS steps are applied; the outcomes of its pushes."""
    outcomes = []
    while True:
        params = client.pull(timeout=300)
        if int(params["count"]) >= STEPS:
            return outcomes
        time.sleep(pause)  # "computing": checkpoints are taken between the kills
        outcomes.append(client.push(_grads(params, worker)).result(timeout=300))


def _train_slowly(client, worker):
    return _train(client, worker, pause=0.05)


def _server(tmp_path, transport="multiprocessing", **kw):
    return jaxps.ParameterServer(
        _params(), optax.sgd(1.0), shards=2, transport=transport, mode="sync", workers=WORKERS,
        assign=_assign, checkpoint=jaxps.Checkpointing(tmp_path, every=5), on_shard_failure="restart", **kw,
    )


def _assert_as_if_nothing_died(ps, outcomes=()):
    """The server's parameters are the plain loop's after STEPS steps; each push was applied or rolled back."""
    final = ps.params()
    for key, want in _oracle(STEPS).items():
        np.testing.assert_array_equal(np.asarray(final[key]), np.asarray(want), err_msg=key)
    assert {o for out in outcomes for o in out} <= {"applied", "rolled_back"}


def _kill(ps, shard, how="sigkill"):
    """Kills shard `shard`, found from the server's stats: its process (SIGKILL) or, on Ray, its actor (`ray.kill`)."""
    pid = ps.stats()["shards"][shard]["where"]["pid"]
    if how == "ray.kill":
        import ray

        ray.kill(ps._transport.actors[shard])
    else:
        os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture(params=["multiprocessing", "ray"])
def restarting(request):
    """A transport that restarts shards."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param


def test_killed_shards_are_restarted_and_the_run_ends_as_if_none_had_died(tmp_path, restarting):
    rng = random.Random(0)
    ps = _server(tmp_path, restarting)
    prefix = getattr(ps._transport, "shm_prefix", None)
    killed = []

    def killer():  # twice, at random steps, a random shard (on Ray: its process, then its actor)
        for at, how in zip(sorted(rng.sample(range(15, STEPS - 5), 2)), ["sigkill", "ray.kill" if restarting == "ray" else "sigkill"]):
            while ps.step < at and not ps._closed:
                time.sleep(0.02)
            killed.append(_kill(ps, rng.randrange(2), how))
            while ps.stats()["restarts"] < len(killed):
                time.sleep(0.05)

    thread = threading.Thread(target=killer)
    try:
        thread.start()
        outcomes = ps.run_workers(_train_slowly, range(WORKERS))
        thread.join(120)
        stats = ps.stats()
        assert stats["restarts"] == 2 and stats["steps"] == STEPS
        assert any(step > 0 for step in stats["rolled_back_to"]), stats  # not only to the first checkpoint
        pids = [s["where"]["pid"] for s in stats["shards"]]
        assert not set(pids) & set(killed)
        _assert_as_if_nothing_died(ps, outcomes)
    finally:
        ps.close()
    assert wait_for(lambda: all(gone(pid) for pid in killed + pids), 30)  # (Ray ends a killed actor's process a moment later)
    if prefix is not None:
        assert shm.sweep(prefix) == []  # nothing left behind


def test_a_push_in_flight_when_a_shard_dies_is_rolled_back(tmp_path, restarting):
    ps = _server(tmp_path, restarting)
    try:
        a, b = ps.client(0), ps.client(1)
        start = a.pull()
        b.pull()
        pending = a.push(_grads(start, 0))  # waits for worker 1's push: step 0 is open
        _kill(ps, 1)
        assert pending.result(timeout=120) == "rolled_back"
        for c in (a, b):  # both see the checkpoint (step 0), on both shards
            np.testing.assert_array_equal(np.asarray(c.pull(timeout=120)["a"]), np.asarray(start["a"]))
        fa, fb = a.push(_grads(start, 0)), b.push(_grads(start, 1))
        assert (fa.result(120), fb.result(120)) == ("applied", "applied")
        stats = ps.stats()
        assert (stats["steps"], stats["restarts"]) == (1, 1) and stats["pushes_rolled_back"] >= 1
    finally:
        ps.close()


def test_a_push_after_a_restart_reaches_the_restarted_shard_not_its_dead_predecessor(tmp_path):
    """A thread's connection to the dead shard is found dead before a push is staged on it: the push goes to the
    restarted shard and is applied by every shard alike (else: applied on one, "rolled_back" on the other, and
    every later save waits for a cut the shards can never reach)."""
    zeros = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    ps = jaxps.ParameterServer(
        zeros, optax.sgd(1.0), shards=2, transport="multiprocessing", assign=lambda path, leaf: int(path == "['b']"),
        checkpoint=jaxps.Checkpointing(tmp_path, every=10**6), on_shard_failure="restart",
    )
    try:
        ones = jax.tree.map(np.ones_like, zeros)
        assert ps.push(ones).result(60) == "applied"  # this thread has a connection to each shard now
        _kill(ps, 1)
        assert wait_for(lambda: ps.stats()["restarts"] == 1, 120)
        assert ps.push(ones).result(60) == "applied"
        assert [s["steps"] for s in ps.stats()["shards"]] == [1, 1]
        for leaf in ps.params().values():  # rolled back to step 0, then one push
            np.testing.assert_array_equal(np.asarray(leaf), -np.ones(4, np.float32))
        assert ps.save(tmp_path, wait=False).result(60) == 1  # and this thread's saves are served
    finally:
        ps.close()


def test_a_push_staged_on_a_shard_that_dies_before_it_is_sent_is_rolled_back(tmp_path, monkeypatch):
    """The other way round: staged on the live connection, the shard killed before the push is submitted to it.
    Its part is answered as lost with the shard ("rolled_back"), and the rollback takes back the other's."""
    from jaxps.transports import shm_channel

    zeros = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    ps = jaxps.ParameterServer(
        zeros, optax.sgd(1.0), shards=2, transport="multiprocessing", assign=lambda path, leaf: int(path == "['b']"),
        checkpoint=jaxps.Checkpointing(tmp_path, every=10**6), on_shard_failure="restart",
    )
    submit, killed = shm_channel.SharedMemoryChannel.submit, []

    def kill_then_submit(channel, request, payload=None, timeout=None):
        if channel.index == 1 and isinstance(request, jaxps.service.Push) and not killed:
            killed.append(_kill(ps, 1))
            assert wait_for(lambda: gone(killed[0]))
        return submit(channel, request, payload, timeout)

    try:
        ones = jax.tree.map(np.ones_like, zeros)
        monkeypatch.setattr(shm_channel.SharedMemoryChannel, "submit", kill_then_submit)
        assert ps.push(ones).result(120) == "rolled_back"
        monkeypatch.undo()
        assert wait_for(lambda: ps.stats()["restarts"] == 1, 120)
        for leaf in ps.params().values():
            np.testing.assert_array_equal(np.asarray(leaf), np.zeros(4, np.float32))
        assert ps.push(ones).result(60) == "applied" and ps.save(tmp_path, wait=False).result(60) == 1
    finally:
        ps.close()


@pytest.mark.slow
def test_a_restarted_ray_actor_that_dies_before_it_serves_is_placed_again(tmp_path, ray_session, monkeypatch):
    """As when Ray places it on the node just lost: the restart tries again, and the run goes on."""
    from jaxps.transports.ray_transport import RayTransport

    ps = _server(tmp_path, "ray")
    new_actor, made = RayTransport._new_actor, []

    def dies_at_first(transport, config):
        actor = new_actor(transport, config)
        made.append(actor)
        if len(made) == 1:
            ray_session.kill(actor, no_restart=True)
        return actor

    try:
        _sync_steps(ps, 2)
        monkeypatch.setattr(RayTransport, "_new_actor", dies_at_first)
        _kill(ps, 1, "ray.kill")
        assert wait_for(lambda: ps.stats()["restarts"] == 1, 120) and len(made) == 2
        _sync_steps(ps, 1)
    finally:
        ps.close()


def _sync_steps(ps, n):
    """`n` sync steps of the oracle's gradients, both workers pushing from this thread."""
    clients = [ps.client(w) for w in range(WORKERS)]
    for _ in range(n):
        params = [c.pull(timeout=120) for c in clients]
        futures = [c.push(_grads(p, w)) for w, (c, p) in enumerate(zip(clients, params))]
        assert [f.result(120) for f in futures] == ["applied"] * WORKERS


@pytest.mark.parametrize("start", ["restored from an older step", pytest.param("fresh", marks=pytest.mark.slow)])
def test_fail_over_goes_back_to_this_servers_own_checkpoints_only(tmp_path, start):
    """The directory holds steps 10 and 20 of an earlier run. A server restored from step 10 (or a fresh one) that
    loses a shard at step 13 (or 3) goes back to its own latest checkpoint, 10 (or 0), never forward to step 20
    of a line that is not its own."""
    d = tmp_path / "ck"
    with jaxps.ParameterServer(_params(), optax.sgd(1.0), shards=2, mode="sync", workers=WORKERS, assign=_assign) as first:
        for _ in range(2):
            _sync_steps(first, 10)
            first.save(d)
    assert jaxps.checkpoint.steps(d) == [10, 20]
    kw = dict(shards=2, transport="multiprocessing", mode="sync", workers=WORKERS, assign=_assign, on_shard_failure="restart")
    kw["checkpoint"] = jaxps.Checkpointing(d, every=1000)
    if start == "fresh":
        with pytest.warns(RuntimeWarning, match=r"step 0 saved in .*, which holds later steps \[10, 20\]"):
            ps = jaxps.ParameterServer(_params(), optax.sgd(1.0), **kw)
    else:
        ps = jaxps.ParameterServer.restore(d, _params(), optax.sgd(1.0), step=10, **kw)
    try:
        own = ps.step
        _sync_steps(ps, 3)
        _kill(ps, 0)
        wait_for(lambda: ps.stats()["restarts"] == 1, 120)
        assert ps.step == own and ps.stats()["rolled_back_to"] == [own]
        _sync_steps(ps, STEPS - own)
        _assert_as_if_nothing_died(ps)
    finally:
        ps.close()


def test_a_shard_that_keeps_dying_ends_the_run_saying_so(tmp_path, restarting):
    ps = _server(tmp_path, restarting)
    try:
        ps.client(0)
        for n in range(3):
            _kill(ps, 0)
            deadline = time.monotonic() + 120
            while n < 2 and ps.stats()["restarts"] <= n and time.monotonic() < deadline:
                time.sleep(0.05)
        with pytest.raises(jaxps.ShardDiedError, match="3 shard deaths within 60 s"):
            for _ in range(100):
                ps.stats()
                time.sleep(0.1)
    finally:
        ps.close()


def test_restart_needs_a_checkpoint_and_a_transport_that_restarts(tmp_path):
    with pytest.raises(ValueError, match="give checkpoint=jaxps.Checkpointing"):
        jaxps.ParameterServer(_params(), optax.sgd(1.0), transport="multiprocessing", on_shard_failure="restart")
    with pytest.raises(ValueError, match="InProcessTransport cannot restart shards"):
        jaxps.ParameterServer(_params(), optax.sgd(1.0), checkpoint=jaxps.Checkpointing(tmp_path, every=5), on_shard_failure="restart")
    with pytest.raises(ValueError, match="unknown on_shard_failure='retry'"):
        jaxps.ParameterServer(_params(), optax.sgd(1.0), on_shard_failure="retry")


def test_pushes_from_before_a_rollback_are_rolled_back_alike_on_every_shard():
    """The pure rule: versions of a new epoch are newer than any a client has seen."""
    assert next_epoch(0) == EPOCH and next_epoch(EPOCH + 5) == 2 * EPOCH
    clock = Clock.start(2).restarted(next_epoch(17), applied=10)
    old = Contribution(0, 17, "g", based_on=17, oldest=17)
    new = Contribution(0, next_epoch(17), "g", based_on=next_epoch(17), oldest=next_epoch(17))
    assert clock.rolled_back(old, sync=True) and clock.rolled_back(old, sync=False)
    assert not clock.rolled_back(new, sync=True) and not clock.rolled_back(new, sync=False)
    clock, steps, outcome = Sync().push(clock, old)
    assert (steps, outcome, clock.pushes_rolled_back) == ([], "rolled_back", 1)
    assert clock.applied == 10


def _push_ones(client, pushes):
    outcomes = []
    for _ in range(pushes):
        params = client.pull(timeout=300)
        time.sleep(0.02)
        outcomes.append(client.push(jax.tree.map(jnp.ones_like, params)).result(timeout=300))
    return outcomes


def test_async_after_a_rollback_every_shard_holds_the_same_pushes_as_the_server_reports(tmp_path):
    """Every push adds 1 to every leaf: after a kill, all leaves on all shards must agree and count the steps kept."""
    zeros = jax.tree.map(jnp.zeros_like, _params())
    ps = jaxps.ParameterServer(
        zeros, optax.sgd(-1.0), shards=2, transport="multiprocessing", mode="async", assign=_assign,
        checkpoint=jaxps.Checkpointing(tmp_path, every=10), on_shard_failure="restart",
    )
    try:
        def killer():
            while ps.step < 40:
                time.sleep(0.02)
            _kill(ps, 0)

        thread = threading.Thread(target=killer)
        thread.start()
        outcomes = ps.run_workers(_push_ones, [40, 40])
        thread.join(60)
        stats = ps.stats()
        values = {float(v) for leaf in jax.tree_util.tree_leaves(ps.params()) for v in np.asarray(leaf).ravel()}
        assert values == {float(stats["steps"])}, (values, stats["steps"])  # one cut, and the server says which
        assert stats["restarts"] == 1 and {o for out in outcomes for o in out} <= {"applied", "rolled_back"}
        applied = sum(o == "applied" for out in outcomes for o in out)
        # every push said applied is kept or counted lost (a lost one may have said rolled_back: in flight to the dead shard)
        assert applied - stats["steps_lost"] <= stats["steps"] <= applied
    finally:
        ps.close()


@pytest.mark.slow
def test_a_ray_node_lost_mid_run_its_shard_comes_back_on_another_node():
    """A 4-node `ray.cluster_utils.Cluster` in a process of its own (the tests' Ray session is another)."""
    assert "equal to the plain loop" in run_script("failover_node_script.py")


def test_a_shard_of_a_resharded_server_that_dies_is_restarted(tmp_path, restarting):
    """Fail-over after `ps.reshard`: a shard of the new plan is killed, restarted from a checkpoint (written
    by either plan), and the run ends as if nothing had happened."""
    ps = _server(tmp_path, restarting)
    killed = []

    def reshard_then_kill():
        while ps.step < 5:
            time.sleep(0.02)
        ps.reshard(3)
        resharded_at = ps.step
        while ps.step < resharded_at + 6:
            time.sleep(0.02)
        killed.append(_kill(ps, 2))  # a shard the first plan did not have
        wait_for(lambda: ps.stats()["restarts"] == 1, 60)

    thread = threading.Thread(target=reshard_then_kill)
    try:
        thread.start()
        outcomes = ps.run_workers(functools.partial(_train, pause=0.15), range(WORKERS))
        thread.join(120)
        stats = ps.stats()
        assert ps.plan.num_shards == 3 and len(killed) == 1
        assert stats["restarts"] == 1 and stats["steps"] == STEPS, stats
        _assert_as_if_nothing_died(ps, outcomes)
    finally:
        ps.close()
