"""Live resharding (`ps.reshard`): the state moves to a new plan while workers run; nothing is lost or applied twice."""

import os
import threading
import time

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxps
from helpers import ULP, assert_trees_equal, gone, mean, optax_oracle, params_tree, run_script, wait_for
from jaxps.consistency import Clock, Contribution, Sync
from jaxps.transports import shm

RESHARD_AT = (10, 26)  # grow to 3 shards at the first step, shrink to 1 at the second
MORE = 10  # steps (sync) or pushes per worker (async) after the last reshard
MOST = 3000  # a worker stops here whatever happens (the driver failed)


def _gradient(params, worker):
    """A gradient that depends on the parameters pulled (so a lost or doubled step shows) and on the worker."""
    return jax.tree.map(lambda x: 0.5 * x + (worker + 1), params)


def _push_value(worker):
    """A gradient of `worker + 1` in every entry."""
    return jax.tree.map(lambda x: jnp.full(x.shape, worker + 1.0, x.dtype), params_tree())


def _total(path):
    """How many steps (pushes) each worker makes: written by the driver once it has resharded (None: go on)."""
    try:
        with open(path) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _train_sync(client, arg):
    """A sync worker: pull, push, until it has made the steps the driver wrote to `path`; the shard count its
    client ends with, and its outcomes."""
    worker, path = arg
    outcomes = []
    while len(outcomes) < (_total(path) or MOST):
        outcomes.append(client.push(_gradient(client.pull(), worker)).result())
        time.sleep(0.02)
    return client.plan.num_shards, outcomes


def _train_async(client, arg):
    """An async worker: pushes integer gradients without waiting for them until `MORE` after the driver wrote
    `path`; the shard count its client ends with, and the outcomes of its pushes."""
    worker, path = arg
    futures, stop = [], MOST
    while len(futures) < stop:
        if len(futures) % 4 == 0:
            client.pull()
        futures.append(client.push(_push_value(worker)))
        if stop == MOST and _total(path) is not None:
            stop = len(futures) + MORE
        time.sleep(0.02)
    outcomes = [f.result() for f in futures]
    return client.plan.num_shards, outcomes


def _reshard_during(ps, path, reshard_at=RESHARD_AT, shards=(3, 1)):
    """Reshards `ps` to each of `shards` once its step reaches each of `reshard_at` (a thread), then writes to
    `path` how many steps a sync worker makes: `MORE` beyond the server's (a worker is at most one ahead)."""
    errors, plans = [], []

    def run():
        try:
            for at, k in zip(reshard_at, shards):
                while ps.step < at:
                    time.sleep(0.01)
                plans.append(ps.reshard(k))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            with open(f"{path}.tmp", "w") as f:
                f.write(str(ps.step + MORE))
            os.replace(f"{path}.tmp", path)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors, plans


def test_sync_training_resharded_twice_mid_run_ends_bit_identical_to_one_optax_run(make_server, transport, tmp_path):
    params = params_tree()
    tx = optax.sgd(0.05, momentum=0.9)
    ps = make_server(params, tx, shards=2, mode="sync", workers=2)
    path = str(tmp_path / "steps")
    thread, errors, plans = _reshard_during(ps, path)
    results = ps.run_workers(_train_sync, [(0, path), (1, path)])
    thread.join(60)
    assert not errors, errors
    assert [p.num_shards for p in plans] == [3, 1] and ps.plan.num_shards == 1
    assert [shards for shards, _ in results] == [1, 1]  # each worker's client followed both moves
    assert {o for _, outcomes in results for o in outcomes} == {"applied"}
    steps = _total(path)
    stats = ps.stats()
    assert stats["steps"] == steps and stats["pushes_applied"] == 2 * steps and stats["pushes_dropped"] == 0

    step, expected, state = optax_oracle(tx), params, tx.init(params)
    for _ in range(steps):
        expected, state = step(expected, state, mean([_gradient(expected, w) for w in range(2)]))
    assert_trees_equal(ps.params(), expected)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_pushes_across_a_reshard_are_each_applied_once(make_server, transport, mode, tmp_path):
    params = jax.tree.map(lambda x: jnp.round(8 * x), params_tree())  # integers: sums exact in any order
    extra = {"max_staleness": 10} if mode == "ssp" else {}
    ps = make_server(params, optax.sgd(1.0), shards=2, mode=mode, workers=2, **extra)
    path = str(tmp_path / "pushes")
    thread, errors, plans = _reshard_during(ps, path, reshard_at=(20,), shards=(3,))
    results = ps.run_workers(_train_async, [(0, path), (1, path)])
    thread.join(60)
    assert not errors, errors
    assert ps.plan.num_shards == 3 and [shards for shards, _ in results] == [3, 3]
    assert {o for _, outcomes in results for o in outcomes} == {"applied"}
    pushes = [len(outcomes) for _, outcomes in results]
    assert ps.stats()["pushes_applied"] == sum(pushes)
    # SGD with lr 1: each of worker w's pushes subtracts w + 1 from every entry, exactly once
    expected = jax.tree.map(lambda x: x - (pushes[0] * 1.0 + pushes[1] * 2.0), params)
    assert_trees_equal(ps.params(), expected)


def test_a_reshard_moves_the_optimizer_state_and_counts(make_server, transport):
    params = params_tree()
    tx = optax.adam(0.01)
    ps = make_server(params, tx, shards=3)
    for k in range(3):
        ps.push(_push_value(k)).result()
    before = ps.stats()
    plan = ps.reshard(2)
    assert plan is ps.plan and plan.num_shards == 2 and ps.step == 3
    after = ps.stats()
    for key in ("steps", "pushes_applied", "staleness_max"):
        assert after[key] == before[key], key
    ps.push(_push_value(3)).result()

    step, expected, state = optax_oracle(tx), params, tx.init(params)
    for k in range(4):
        expected, state = step(expected, state, _push_value(k))
    assert_trees_equal(ps.params(), expected, ulp=ULP)  # Adam: b ** count, evaluated per program


def test_a_failed_reshard_changes_nothing_and_the_server_goes_on(tmp_path):
    params = params_tree()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, mode="sync", workers=2) as ps:
        c0, c1 = ps.client(0), ps.client(1)
        c0.push(_push_value(0))  # step 0 waits for worker 1 while the reshard fails
        with pytest.raises(Exception):
            ps.reshard(3, directory=blocker / "below")
        assert ps.plan.num_shards == 2 and ps.step == 0
        assert c1.push(_push_value(1)).result() == "applied"
        assert ps.step == 1
        assert_trees_equal(ps.params(), jax.tree.map(lambda x: x - 1.5, params))


def test_reshard_refuses_what_it_cannot_move(tmp_path):
    params = params_tree()
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, push_filter=jaxps.filters.precision(jnp.bfloat16)) as ps:
        with pytest.raises(ValueError, match="push_filter"):
            ps.reshard(3)
        assert ps.plan.num_shards == 2
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, transport=jaxps.transports.inprocess.InProcessTransport()) as ps:
        with pytest.raises(ValueError, match="by name"):
            ps.reshard(3)


def test_old_shards_are_gone_after_close(ray_session):
    """Multiprocessing and Ray: the old plan's processes (and segments) end with the server."""
    params = params_tree()
    for transport in ("multiprocessing", "ray"):
        ps = jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, transport=transport)
        first = [s["where"]["pid"] for s in ps.stats()["shards"]]
        prefixes = [getattr(ps._transport, "shm_prefix", None)]
        ps.reshard(3)
        prefixes.append(getattr(ps._transport, "shm_prefix", None))
        second = [s["where"]["pid"] for s in ps.stats()["shards"]]
        ps.push(_push_value(0)).result()
        ps.close()
        assert wait_for(lambda: all(gone(pid) for pid in first + second), 30), transport
        for prefix in prefixes:
            if prefix is not None:
                assert shm.sweep(prefix) == []


@pytest.mark.slow
def test_scaling_out_onto_a_node_that_joined_a_ray_cluster_mid_run():
    """A `ray.cluster_utils.Cluster` in a process of its own (the tests' Ray session is another)."""
    assert "equal to the plain loop" in run_script("reshard_cluster_script.py")


def test_the_new_shards_count_a_sync_worker_from_its_earliest_push_sent_again():
    """`Clock.moved`: a worker with pushes pending for steps 0 and 1 at the cut counts for step 0 on the new shards."""
    policy, clock = Sync(), Clock.start(2)
    for step in (0, 1):
        clock, _, _ = policy.push(clock, Contribution(0, step, "gradients", None))
    moved = clock.moved()
    assert moved.pending == {} and moved.pushes == (0, 0) and moved.last_step == (None, None)
    assert policy.quorum(moved, 0) == 2  # step 0 waits for worker 0's push, sent again, and worker 1's


def test_new_shards_that_cannot_read_the_state_leave_the_server_as_it_was(monkeypatch):
    """As when the new shards are on machines that do not see the directory: a clear error, nothing changed."""
    params = params_tree()
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2) as ps:
        ps.push(_push_value(0)).result()
        plan = ps.plan

        def unreadable(*args, **kwargs):
            raise FileNotFoundError("no such directory on this node")

        monkeypatch.setattr(jaxps.shard, "read_checkpoint", unreadable)
        with pytest.raises(RuntimeError, match="every node reads"):
            ps.reshard(3)
        monkeypatch.undo()
        assert ps.plan is plan and ps.step == 1
        assert ps.push(_push_value(1)).result() == "applied"
        assert_trees_equal(ps.params(), jax.tree.map(lambda x: x - 1.0 - 2.0, params))
