"""Backup workers agree across shards: a step takes the same workers' gradients on every shard.

The oracle is in the bits: with sgd(lr=-1) from zero, worker w's push for step
s adds 2**w to row s of every leaf (halved: a step is the mean of its 2 of 3
gradients), so row s of every leaf on every shard must hold the same value, and
its bits say which workers step s took; each push's future must say "applied"
exactly when its worker is among them.
"""

import random
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxps
from jaxps.consistency import Clock, Contribution, Sync

WORKERS, BACKUP, STEPS, SHARDS = 3, 1, 20, 3


def _params():
    # "count" counts the steps (each adds the mean of its pushes' 1s): a worker reads there which step its push is for
    return {"a": jnp.zeros((STEPS,), jnp.float32), "b": jnp.zeros((STEPS, 3), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def _assign(path, leaf):
    return {"['a']": 0, "['b']": 1, "['count']": 2}[path]


def _race(client, worker):
    """Pull, then push for the step pulled, until STEPS steps are applied; random pauses make the
    shards see the pushes in different orders. Returns [(step, outcome)] of its pushes."""
    rng = random.Random(worker)
    outcomes = []
    while True:
        params = client.pull(timeout=60)
        step = int(params["count"])
        if step >= STEPS:
            return outcomes
        time.sleep(rng.random() * 0.004)
        row = np.zeros(STEPS, np.float32)
        row[step] = 2.0**worker
        grads = {"a": row, "b": np.repeat(row[:, None], 3, axis=1), "count": np.float32(1.0)}
        outcomes.append((step, client.push(grads).result(timeout=60)))


def _check_agreement(ps, outcomes):
    """Every leaf holds one value; its bits say which workers each step took; the futures say the same."""
    params = ps.params()
    assert float(params["count"]) == STEPS
    rows = np.concatenate([np.asarray(params["a"])[:, None], np.asarray(params["b"])], axis=1)
    for step in range(STEPS):
        values = set(rows[step].tolist())
        assert len(values) == 1, f"step {step}: the shards took different workers' gradients: {rows[step]}"
        bits = int(values.pop() * (WORKERS - BACKUP))  # a step adds the mean of its pushes
        took = {w for w in range(WORKERS) if bits >> w & 1}
        assert len(took) == WORKERS - BACKUP, f"step {step} took workers {sorted(took)}"
        said = {w for w in range(WORKERS) for s, outcome in outcomes[w] if s == step and outcome == "applied"}
        assert said == took, f"step {step}: the futures say {sorted(said)} applied, the parameters say {sorted(took)}"
    assert all(outcome in ("applied", "dropped") for o in outcomes for _, outcome in o)
    pushes = sum(len(o) for o in outcomes)
    stats = ps.stats()
    assert stats["steps"] == STEPS and stats["pushes_applied"] == STEPS * (WORKERS - BACKUP)
    for s in stats["shards"]:  # every shard counts the same pushes applied and dropped
        assert (s["pushes_applied"], s["pushes_dropped"]) == (STEPS * (WORKERS - BACKUP), pushes - STEPS * (WORKERS - BACKUP))


def _server(make_server):
    return make_server(_params(), optax.sgd(-1.0), shards=SHARDS, mode="sync", workers=WORKERS, backup_workers=BACKUP, assign=_assign)


@pytest.fixture
def racy():
    """Threads switch every microsecond, so pushes interleave between shards."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_racing_threads_make_the_same_step_on_every_shard(make_server, racy):
    ps = _server(make_server)
    clients = [ps.client(w) for w in range(WORKERS)]
    outcomes = [None] * WORKERS

    def run(w):
        outcomes[w] = _race(clients[w], w)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _check_agreement(ps, outcomes)


def test_racing_workers_of_run_workers_make_the_same_step_on_every_shard(make_server, transport):
    if transport == "inprocess":
        pytest.skip("in-process workers are threads: the test above")
    ps = _server(make_server)
    outcomes = ps.run_workers(_race, list(range(WORKERS)))
    _check_agreement(ps, outcomes)


def test_a_follower_takes_the_leaders_workers_whatever_arrives_first():
    """The pure rule: a following shard closes a step with the leader's workers only, once they are in."""
    policy, clock = Sync(backup=1, follows=True), Clock.start(3)
    push = lambda clock, w: policy.push(clock, Contribution(w, 0, f"g{w}", 0))
    clock, steps, _ = push(clock, 0)
    clock, steps2, _ = push(clock, 1)
    assert steps == steps2 == []  # 2 of 3 are in, but the leader has not decided
    clock, steps = policy.decide(clock, 0, (1, 2))
    assert steps == []  # worker 2's push is not here yet
    clock, steps, _ = push(clock, 2)
    (step,) = steps
    assert step.workers == (1, 2) and [c.worker for c in step.dropped] == [0] and clock.version == 1
    assert (clock.pushes_applied, clock.pushes_dropped) == (2, 1)
    clock, late = policy.decide(clock, 0, (1, 2))  # a decision sent twice changes nothing
    assert late == [] and clock.version == 1


def test_a_follower_does_not_wait_for_a_chosen_worker_that_left():
    policy, clock = Sync(backup=1, follows=True), Clock.start(3)
    clock, _, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
    clock, steps = policy.decide(clock, 0, (0, 2))
    assert steps == []
    clock, steps = policy.leave(clock, 2)  # its process died mid-push: its gradient never comes
    assert [s.workers for s in steps] == [(0,)]


def test_backup_workers_on_one_shard_need_no_leader():
    ps = jaxps.ParameterServer(_params(), optax.sgd(-1.0), shards=1, mode="sync", workers=3, backup_workers=1)
    try:
        outcomes = [None] * 3

        def run(w):
            outcomes[w] = _race(ps.client(w), w)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        _check_agreement(ps, outcomes)
    finally:
        ps.close()


def test_a_sync_pull_asks_again_until_every_shard_answers_one_version():
    """A shard asked again may answer a later version still (the others went on meanwhile):
    the pull asks the ones behind again until all agree, so its leaves and its push's step are one step."""
    import concurrent.futures

    from jaxps.client import Client
    from jaxps.transport import Pull, Push, ShardChannel

    plan = jaxps.make_plan(_params(), SHARDS, assign=_assign)

    class Scripted(ShardChannel):
        """A shard answering the first of `versions` at or after what a pull asks for, its leaves full of it."""

        def __init__(self, shard, versions):
            self.specs, self.versions, self.pushes = plan.shard_specs(shard), list(versions), []

        def submit(self, request, payload=None, timeout=None):
            future = concurrent.futures.Future()
            if isinstance(request, Pull):
                version = next(v for v in self.versions if v >= request.at_least)
                self.versions.remove(version)
                future.set_result((version, [np.full(s.shape, version, s.dtype) for s in self.specs]))
            else:
                assert isinstance(request, Push)
                self.pushes.append(request.for_step)
                future.set_result("applied")
            return future

    # shard 1 is behind; asked for version 11, it answers 12: shards 0 and 2 are then behind
    channels = [Scripted(0, [11, 12]), Scripted(1, [10, 12]), Scripted(2, [11, 12])]
    client = Client(0, plan, channels, sync=True)
    params = client.pull()
    assert all(np.all(np.asarray(x) == 12) for x in jax.tree.leaves(params)), params
    client.push({"a": np.zeros(STEPS, np.float32), "b": np.zeros((STEPS, 3), np.float32), "count": np.float32(1)}).result()
    assert [ch.pushes for ch in channels] == [[12]] * SHARDS
