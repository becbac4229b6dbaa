"""The conformance suite: every test here runs over every transport, with optax as the oracle."""

import os
import socket
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxps
from helpers import TRANSCENDENTAL, ULP, assert_trees_equal, grads_like, mean, optax_oracle, optimizers, params_tree, wait_for


@pytest.mark.parametrize("name", ["adam", "masked_adamw", "multi_transform"])
def test_sharded_equals_unsharded(make_server, name):
    tx = optimizers()[name]
    params = params_tree()
    ps = make_server(params, tx, shards=3)
    step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
    for t in range(4):
        g = grads_like(params, seed=t)
        assert ps.push(g).result(timeout=60) == "applied"
        expected, opt_state = step(expected, opt_state, g)
        assert_trees_equal(ps.pull(), expected, ulp=ULP if name in TRANSCENDENTAL else 0)
    assert ps.step == 4


def test_pull_sees_own_earlier_pushes(make_server):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.5), shards=2)
    expected = params
    for t in range(5):
        g = grads_like(params, t, integer=True)
        ps.push(g)  # not waited on
        expected = jax.tree.map(lambda p, g: p - 0.5 * g, expected, g)
        assert_trees_equal(ps.pull(), expected)


def test_sync_equals_one_step_on_the_mean_gradient(make_server):
    params, tx, n, steps = params_tree(), optax.sgd(0.1, momentum=0.9), 3, 4
    ps = make_server(params, tx, shards=2, mode="sync", workers=n)
    pulled = {}

    def worker(i):
        c = ps.client(i)
        for t in range(steps):
            pulled[(i, t)] = c.pull(timeout=60)
            assert c.push(grads_like(params, seed=100 * t + i)).result(timeout=60) == "applied"
        pulled[(i, steps)] = c.pull(timeout=60)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
    for t in range(steps + 1):
        for i in range(n):  # every worker pulled exactly the step-t parameters
            assert_trees_equal(pulled[(i, t)], expected)
        if t < steps:
            g = mean([grads_like(params, seed=100 * t + i) for i in range(n)])
            expected, opt_state = step(expected, opt_state, g)
    assert_trees_equal(ps.params(), expected)
    stats = ps.stats()
    assert stats["steps"] == steps and stats["pushes_applied"] == n * steps and stats["staleness_max"] == 0


def test_sync_pull_waits_for_the_step(make_server):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.5), mode="sync", workers=2)
    a, b = ps.client(0), ps.client(1)
    ga, gb = grads_like(params, 1, integer=True), grads_like(params, 2, integer=True)
    a.pull(), b.pull()
    fa = a.push(ga)
    with pytest.raises(TimeoutError, match=r"worker 0's pull \(in sync mode it waits for .*\) got no answer within 0\.[0-5]\d* s"):  # (what is left of it)
        a.pull(timeout=0.5)  # step 0 still needs worker 1
    with pytest.raises(TimeoutError, match=r"the push got no answer within 0.2 s"):
        fa.result(timeout=0.2)
    assert not fa.done()
    b.push(gb)
    assert fa.result(timeout=30) == "applied"
    expected = jax.tree.map(lambda p, x, y: p - 0.5 * ((x + y) / 2), params, ga, gb)
    assert_trees_equal(a.pull(timeout=30), expected)


def test_backup_workers_drop_the_straggler(make_server):
    params, tx = params_tree(), optax.sgd(0.1)
    ps = make_server(params, tx, shards=2, mode="sync", workers=3, backup_workers=1)
    clients = [ps.client(i) for i in range(3)]
    for c in clients:
        c.pull()
    g = [grads_like(params, i) for i in range(3)]
    f0, f1 = clients[0].push(g[0]), clients[1].push(g[1])
    assert (f0.result(timeout=30), f1.result(timeout=30)) == ("applied", "applied")
    assert clients[2].push(g[2]).result(timeout=30) == "dropped"
    expected, _ = optax_oracle(tx)(params, tx.init(params), mean(g[:2]))
    assert_trees_equal(ps.params(), expected)
    stats = ps.stats()
    assert (stats["steps"], stats["pushes_dropped"]) == (1, 1)
    # the straggler catches up: it pulls step 1 and takes part in step 1
    clients[2].pull(timeout=30)
    f = [clients[i].push(g[i]) for i in (2, 0)]
    assert [x.result(timeout=30) for x in f] == ["applied", "applied"]
    assert ps.step == 2


def test_async_sgd_is_order_independent(make_server):
    params, n, pushes, lr = jax.tree.map(jnp.round, params_tree()), 4, 10, 0.5
    ps = make_server(params, optax.sgd(lr), shards=3, mode="async")

    def worker(i):
        c = ps.client(i)
        futures = []
        for t in range(pushes):
            c.pull()
            futures.append(c.push(grads_like(params, 1000 * i + t, integer=True)))
        return [f.result(timeout=60) for f in futures]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    # integer params and gradients, lr = 1/2: every partial sum is exact, so any order gives the same bits
    total = jax.tree.map(lambda *g: sum(g), *[grads_like(params, 1000 * i + t, integer=True) for i in range(n) for t in range(pushes)])
    assert_trees_equal(ps.params(), jax.tree.map(lambda p, g: p - lr * g, params, total))
    assert ps.step == n * pushes
    assert ps.stats()["pushes_applied"] == n * pushes


def test_async_staleness_is_counted(make_server):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.1), shards=2)
    a, b = ps.client(0), ps.client(1)
    a.pull(), b.pull()
    b.push(grads_like(params, 1)).result(timeout=30)  # computed on version 0, applied at 0
    a.push(grads_like(params, 2)).result(timeout=30)  # computed on version 0, applied at 1
    stats = ps.stats()
    assert (stats["staleness_max"], stats["staleness_mean"]) == (1, 0.5)


def test_ssp_waits_and_resumes(make_server):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.1), shards=2, mode="ssp", workers=2, max_staleness=1)
    fast, slow = ps.client(0), ps.client(1)
    g = grads_like(params, 0)
    fast.pull()
    fast.push(g).result(timeout=30)
    fast.pull(timeout=30)  # 1 ahead of the slowest: allowed
    fast.push(g).result(timeout=30)
    with pytest.raises(TimeoutError):
        fast.pull(timeout=0.5)  # 2 ahead: waits
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("p", fast.pull(timeout=60)))
    waiter.start()
    time.sleep(0.3)
    assert "p" not in got
    slow.pull()
    slow.push(g).result(timeout=30)  # the slowest catches up by one
    waiter.join(60)
    assert "p" in got and ps.step == 3


def test_finished_workers_do_not_block_sync(make_server):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.1), mode="sync", workers=2)

    def work(client, steps):
        for t in range(steps):
            client.pull(timeout=60)
            client.push(grads_like(params, t)).result(timeout=60)
        return steps

    assert ps.run_workers(work, [2, 5]) == [2, 5]
    assert ps.step == 5


def test_sync_run_workers_twice_with_pushes_not_waited_on(make_server):
    # A worker that pushes its last gradient and leaves still counts for that step, and a
    # second run_workers starts its workers afresh: every step is one step on both workers' mean.
    params, tx, steps = params_tree(), optax.sgd(0.1, momentum=0.9), 3
    ps = make_server(params, tx, shards=2, mode="sync", workers=2)

    def work(client, offset):
        for t in range(steps):
            client.pull(timeout=60)
            client.push(grads_like(params, seed=offset + 100 * t + client.worker))  # not waited on
        return client.worker

    for offset in (0, 1000):
        assert ps.run_workers(work, [offset, offset]) == [0, 1]
    step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
    for offset in (0, 1000):
        for t in range(steps):
            expected, opt_state = step(expected, opt_state, mean([grads_like(params, seed=offset + 100 * t + i) for i in range(2)]))
    assert_trees_equal(ps.params(), expected)
    stats = ps.stats()
    assert (stats["steps"], stats["pushes_applied"], stats["pushes_dropped"]) == (2 * steps, 4 * steps, 0)


def test_a_worker_that_left_takes_part_again_from_the_current_step(make_server):
    # by hand (then leave), run_workers twice, by hand again: every phase's workers push before
    # their first pull, and each such push is for the current step, never a "dropped" straggler
    ps = make_server({"w": np.zeros(3, np.float32)}, optax.sgd(-1.0), mode="sync", workers=2)

    def push_first(client, value):
        g = {"w": np.full(3, value, np.float32)}
        first = client.push(g).result(60)
        client.pull(timeout=60)
        return [first, client.push(g).result(60)]

    def by_hand():
        clients, out = [ps.client(0), ps.client(1)], {}  # every worker's client before any pushes
        threads = [threading.Thread(target=lambda c, v: out.update({c.worker: push_first(c, v)}), args=cv) for cv in zip(clients, (1.0, 3.0))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        return [out.get(0), out.get(1)]

    phases = [by_hand()]
    for i in (0, 1):
        ps.client(i).leave()
    phases += [ps.run_workers(push_first, [1.0, 3.0]) for _ in range(2)]
    phases.append(by_hand())
    assert phases == [[["applied"] * 2] * 2] * 4
    assert (ps.step, ps.stats()["pushes_dropped"]) == (8, 0)
    np.testing.assert_array_equal(np.asarray(ps.params()["w"]), np.full(3, 16.0, np.float32))  # 8 steps of the mean, 2


def test_a_client_that_run_workers_replaced_refuses_and_its_leave_changes_nothing(make_server):
    """The driver holds worker 0's client; run_workers gives worker 0 a new one (and it leaves at the end).
    The old client's pushes would be a stale straggler's: refused, saying what to do, nothing changed; its
    leave does not make the new client leave; the new client takes part from the current step."""
    ps = make_server({"w": np.zeros(3, np.float32)}, optax.sgd(-1.0), mode="sync", workers=2)
    old = ps.client(0)
    old.pull()
    ps.run_workers(lambda c, v: c.push({"w": np.full(3, v, np.float32)}).result(60), [1.0, 3.0])
    for call in (old.pull, lambda: old.push({"w": np.ones(3, np.float32)})):
        with pytest.raises(RuntimeError, match=r"worker 0's client was replaced: .* ps.client\(0\) gives it"):
            call()
    old.leave()
    new = [ps.client(0), ps.client(1)]
    assert new[0] is not old and not ps.client(0).left
    pushes = [c.push({"w": np.full(3, v, np.float32)}) for c, v in zip(new, (1.0, 3.0))]
    assert [push.result(60) for push in pushes] == ["applied"] * 2
    assert (ps.step, ps.stats()["pushes_dropped"]) == (2, 0)
    np.testing.assert_array_equal(np.asarray(ps.params()["w"]), np.full(3, 4.0, np.float32))


def test_a_worker_joining_mid_step_counts_from_one_step_on_every_shard(make_server):
    # worker 1's push for step 0 has reached shard 0 (which closed step 0) but not yet shard 1 when
    # worker 2 joins: both shards must count worker 2 from step 1, so every step takes the same workers
    from jaxps.transport import Push

    params, tx = params_tree(), optax.sgd(0.5)
    ps = make_server(params, tx, shards=2, mode="sync", workers=3)
    ps.client(2).leave()
    c0, c1 = ps.client(0), ps.client(1)
    gate = threading.Event()

    class Gated:
        """Shard 1's channel, holding back worker 1's push until the gate opens."""

        def __init__(self, inner):
            self.inner = inner

        def submit(self, request, *args, **kwargs):
            if isinstance(request, Push):
                gate.wait(60)
            return self.inner.submit(request, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    link = c1._links[1]
    link.channel = Gated(link.channel)
    grads = {(w, t): grads_like(params, seed=10 * t + w, integer=True) for w in range(3) for t in range(4)}
    futures = [c0.push(grads[(0, 0)])]
    pushing = threading.Thread(target=lambda: futures.append(c1.push(grads[(1, 0)])))
    pushing.start()
    assert wait_for(lambda: ps.stats()["shards"][0]["version"] == 1, 60)
    assert ps.stats()["shards"][1]["version"] == 0
    c2 = ps.client(2)  # joins now
    gate.set()
    pushing.join(60)
    link.channel = link.channel.inner
    assert [f.result(60) for f in futures] == ["applied", "applied"]

    def steps(client):
        return [(client.pull(timeout=60), client.push(grads[(client.worker, t)]).result(60))[1] for t in range(1, 4)]

    outcomes = {}
    threads = [threading.Thread(target=lambda c: outcomes.update({c.worker: steps(c)}), args=(c,)) for c in (c0, c1, c2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert outcomes == {w: ["applied"] * 3 for w in range(3)}
    step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
    expected, opt_state = step(expected, opt_state, mean([grads[(0, 0)], grads[(1, 0)]]))
    for t in range(1, 4):
        expected, opt_state = step(expected, opt_state, mean([grads[(w, t)] for w in range(3)]))
    assert_trees_equal(ps.params(), expected)
    assert [s["version"] for s in ps.stats()["shards"]] == [4, 4]


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_pull_keeps_structure_shapes_and_dtypes(make_server):
    params = {
        "list": [jnp.ones((2, 3)), (jnp.zeros(4, jnp.bfloat16), Pair(jnp.arange(3.0), jnp.float32(2.5)))],
        "scalar": jnp.float32(1.0),
        "f16": jnp.full((2,), 3.0, jnp.float16),
    }
    ps = make_server(params, optax.sgd(0.5), shards=3)
    assert_trees_equal(ps.pull(), params)
    g = jax.tree.map(lambda x: jnp.ones_like(x), params)
    ps.push(g).result(timeout=30)
    assert_trees_equal(ps.pull(), jax.tree.map(lambda p: (p - 0.5 * jnp.ones_like(p)).astype(p.dtype), params))


def _snapshot(ps):
    # bytes_pulled counts the snapshot's own ps.params(); bytes_pushed must not move
    return ps.params(), ps.step, {k: v for k, v in ps.stats().items() if k not in ("shards", "bytes_pulled")}


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda g: {k: v for k, v in g.items() if k != "scale"}, r"missing paths: \[\"\['scale'\]\"\]"),
        (lambda g: {**g, "extra": jnp.ones(2)}, r"unexpected paths: \[\"\['extra'\]\"\]"),
        (lambda g: {**g, "dense": {**g["dense"], "kernel": jnp.ones((3, 8))}}, r"\['dense'\]\['kernel'\]: shape \[3, 8\], expected \[8, 3\]"),
        (lambda g: {**g, "dense": {**g["dense"], "bias": jnp.ones(3, jnp.complex64)}}, r"\['dense'\]\['bias'\]: dtype complex64 cannot be cast to the parameter's float32"),
        (lambda g: {**g, "embed": [g["embed"][0].at[1, 1].set(jnp.nan)]}, r"NaN or Inf in \[\"\['embed'\]\[0\] \(float32\[5, 2\]\)\"\]"),
        (lambda g: {**g, "scale": jnp.float32(jnp.inf)}, r"NaN or Inf in \[\"\['scale'\] \(float32\[\]\)\"\]"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf"],
)
def test_bad_push_changes_nothing(make_server, transport, bad, match):
    params, tx = params_tree(), optax.sgd(0.1, momentum=0.9)
    ps = make_server(params, tx, shards=3)
    g0, g1 = grads_like(params, 0), grads_like(params, 1)
    ps.push(g0).result(timeout=30)
    before = _snapshot(ps)
    with pytest.raises(jaxps.PushError, match=match):
        ps.push(bad(g1)).result(timeout=30)  # raised by push itself, or (NaN checked on the device) by its future
    after = _snapshot(ps)
    assert_trees_equal(after[0], before[0])
    if after[2]["pushes_refused"] > before[2]["pushes_refused"]:
        # checked on the device (in-process, async): the shards took the push, then refused it in their step
        assert transport == "inprocess" and "NaN" in match and after[2]["pushes_refused"] == 1
        for moved in ("pushes_refused", "bytes_pushed"):
            before[2].pop(moved), after[2].pop(moved)
    assert after[1:] == before[1:]
    # the server keeps serving, and its optimizer state is as if the bad push never came
    ps.push(g1).result(timeout=30)
    step, opt_state = optax_oracle(tx), tx.init(params)
    expected, opt_state = step(params, opt_state, g0)
    expected, _ = step(expected, opt_state, g1)
    assert_trees_equal(ps.pull(), expected)


def test_nan_in_an_imaginary_part_is_refused(make_server):
    params = {"z": jnp.ones(4, jnp.complex64), "w": jnp.ones(3)}
    ps = make_server(params, optax.sgd(0.1), shards=2)
    z = np.array([1 + 1j, complex(1, np.nan), 1, 1], np.complex64)
    for g in ({"z": jnp.asarray(z), "w": jnp.ones(3)}, {"z": z, "w": np.ones(3, np.float32)}):
        with pytest.raises(jaxps.PushError, match=r"NaN or Inf in \[\"\['z'\] \(complex64\[4\]\)\"\]"):
            ps.push(g).result(timeout=30)
    assert_trees_equal(ps.params(), params)
    assert ps.step == 0


@pytest.mark.parametrize("shards", [1, 2])
def test_nonfinite_skip_mode(make_server, shards):
    params = params_tree()
    ps = make_server(params, optax.sgd(0.1), shards=shards, nonfinite="skip")
    g = grads_like(params, 0)
    assert ps.push({**g, "scale": jnp.float32(jnp.nan)}).result(timeout=30) == "skipped"
    assert_trees_equal(ps.params(), params)
    assert (ps.step, ps.stats()["pushes_skipped"]) == (0, 1)
    assert ps.push(g).result(timeout=30) == "applied"
    assert ps.step == 1


@pytest.mark.parametrize("shards", [1, 3])  # one shard checks the push in its step; with several, the client does
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_a_push_checked_on_the_device_changes_nothing_on_any_shard(tmp_path, mode, shards):
    """In-process, async and ssp: jax-array gradients are checked inside the shards' step. NaN in one
    shard's leaf leaves every shard's parameters, Adam state and step as they were; the future says so."""
    params, tx = params_tree(), optax.adam(0.1)
    ps = jaxps.ParameterServer(params, tx, shards=shards, mode=mode, workers=1, **({"max_staleness": 1} if mode == "ssp" else {}))
    try:
        g0, g1 = grads_like(params, 0), grads_like(params, 1)
        ps.push(g0).result(timeout=30)
        before = ps.params()
        bad = {**g1, "dense": {**g1["dense"], "bias": g1["dense"]["bias"].at[2].set(-jnp.inf)}}
        future = ps.push(bad)
        with pytest.raises(jaxps.PushError, match=r"NaN or Inf in \[\"\['dense'\]\['bias'\] \(float32\[3\]\)\"\]"):
            future.result(timeout=30)
        with pytest.raises(jaxps.PushError):  # asked again: the same answer
            future.result(timeout=30)
        assert_trees_equal(ps.params(), before)
        stats = ps.stats()
        assert (ps.step, stats["pushes_applied"], stats["pushes_refused"]) == (1, 1, 1)
        assert ps.save(tmp_path / "ckpt") == 1  # a checkpoint counts the refused push out too
        # Adam's moments and count are as if the refused push never came
        ps.push(g1).result(timeout=30)
        step, opt_state = optax_oracle(tx), tx.init(params)
        expected, opt_state = step(params, opt_state, g0)
        expected, _ = step(expected, opt_state, g1)
        assert_trees_equal(ps.params(), expected, ulp=ULP)
        assert ps.step == 2
    finally:
        ps.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_refused_push_nobody_asked_about_is_raised_by_the_next_push(shards):
    params = params_tree()
    ps = jaxps.ParameterServer(params, optax.sgd(0.1), shards=shards)
    try:
        g, bad = grads_like(params, 0), {**grads_like(params, 0), "scale": jnp.float32(jnp.nan)}
        ps.push(bad)  # its future dropped unasked
        assert ps.stats()["pushes_refused"] == 1  # (the shards' count waits for the check)
        with pytest.raises(jaxps.PushError, match=r"earlier push of this worker was refused .* this push was not sent: .*\['scale'\]"):
            ps.push(g)
        assert ps.step == 0
        assert_trees_equal(ps.params(), params)
        assert ps.push(g).result(timeout=30) == "applied"  # told once; the worker goes on
        expected, _ = optax_oracle(optax.sgd(0.1))(params, optax.sgd(0.1).init(params), g)
        assert_trees_equal(ps.params(), expected)
        # the host may run ahead of the check by one push: the second push after a refused one raises at the latest
        ps.push(bad)
        with pytest.raises(jaxps.PushError, match="earlier push of this worker was refused"):
            for _ in range(2):
                ps.push(g)
        assert ps.stats()["pushes_refused"] == 2
    finally:
        ps.close()


def test_nonfinite_skip_counts_as_arrival_in_sync(make_server):
    params, tx = params_tree(), optax.sgd(0.1)
    ps = make_server(params, tx, mode="sync", workers=2, nonfinite="skip")
    a, b = ps.client(0), ps.client(1)
    g = grads_like(params, 0)
    fa = a.push({**g, "scale": jnp.float32(jnp.inf)})
    fb = b.push(g)
    assert (fa.result(timeout=30), fb.result(timeout=30)) == ("skipped", "applied")
    expected, _ = optax_oracle(tx)(params, tx.init(params), g)  # the mean of the finite gradients
    assert_trees_equal(ps.params(), expected)


def test_close_is_idempotent_and_final(make_server):
    ps = make_server(params_tree(), optax.sgd(0.1), shards=2)
    ps.close()
    ps.close()
    with pytest.raises(RuntimeError, match="closed"):
        ps.pull()


def test_stats_say_where_each_shard_runs(make_server, transport):
    ps = make_server(params_tree(), optax.sgd(0.1), shards=2)
    where = [s["where"] for s in ps.stats()["shards"]]
    assert all(w["host"] == socket.gethostname() for w in where)
    pids = [w["pid"] for w in where]
    if transport == "inprocess":
        assert pids == [os.getpid()] * 2
    else:  # a process of its own per shard, alive
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for pid in pids:
            os.kill(pid, 0)
    if transport.startswith("ray"):
        assert [w["actor_id"] for w in where] == [a._actor_id.hex() for a in ps._transport.actors]


def test_a_workers_last_push_refused_unasked_is_raised_by_run_workers():
    params = params_tree()
    with jaxps.ParameterServer(params, optax.sgd(0.1), shards=2, workers=1) as ps:
        g = grads_like(params, 0)

        def work(client, _):
            client.push(g)
            client.push({**g, "conv": {**g["conv"], "bias": g["conv"]["bias"] * jnp.nan}})  # not asked

        with pytest.raises(jaxps.PushError, match=r"earlier push of this worker was refused .* the worker has left: .*\['conv'\]\['bias'\]"):
            ps.run_workers(work, [None])
        stats = ps.stats()
        assert (ps.step, stats["pushes_refused"]) == (1, 1)
        assert all(s["workers_left"] == [0] for s in stats["shards"])  # it left first
