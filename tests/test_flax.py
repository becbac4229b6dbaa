"""The Flax drop-ins (jaxps.nnx.Optimizer, jaxps.TrainState), value leaves and the worker helpers.

Oracles, not snapshots: plain flax/optax programs on the same data, step by
step (bit for bit for sgd), and the mean of the workers' values in sync mode.
Functions and modules that travel to worker processes live at module level.
"""

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxps
import jaxps.nnx
from helpers import ULP, assert_trees_equal, mean, optax_oracle


# -- models and data -----------------------------------------------------------------
class NnxNet(nnx.Module):
    """Dense, BatchNorm, Dropout, Dense: every kind of state the drop-ins must carry."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(8)(x))
        return nn.Dense(3)(nn.relu(x))


def batches(seed, n=4, size=8):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 6)).astype(np.float32), rng.integers(0, 3, size).astype(np.int32)) for _ in range(n)]


def nnx_loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@jaxps.nnx.jit
def nnx_train_step(model, optimizer, metrics, x, y):
    """The official Flax example's fused step: gradients, metrics, optimizer update in place."""
    (loss, logits), grads = nnx.value_and_grad(nnx_loss, has_aux=True)(model, x, y)
    metrics.update(loss=loss, logits=logits, labels=y)
    optimizer.update(model, grads)


def new_metrics():
    return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def nnx_worker(model, optimizer, data):
    """A run_workers worker around the unchanged step; returns its metrics."""
    metrics = new_metrics()
    for x, y in data:
        nnx_train_step(model, optimizer, metrics, x, y)
    return metrics


@pytest.fixture
def where(transport):
    """ParameterServer keywords for `transport` (as conftest's make_server), for drop-ins that start their own server."""
    from conftest import DATA_PATHS

    if transport in DATA_PATHS:
        return {"transport": "ray", "transport_options": {"data_path": DATA_PATHS[transport]}}
    return {"transport": transport}


def full_state(model):
    return nnx.as_pure(nnx.state(model, (nnx.Param, nnx.BatchStat)))


# -- nnx.Optimizer ---------------------------------------------------------------------
def test_nnx_optimizer_equals_nnx_optimizer_step_by_step(where):
    _nnx_optimizer_equals_nnx_optimizer("sgd", where)


def test_nnx_optimizer_equals_nnx_optimizer_with_adam():
    _nnx_optimizer_equals_nnx_optimizer("adam", {"transport": "inprocess"})


def _nnx_optimizer_equals_nnx_optimizer(name, where):
    tx = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-2)}[name]
    plain, served = NnxNet(nnx.Rngs(0)), NnxNet(nnx.Rngs(0))
    plain_opt = nnx.Optimizer(plain, tx, wrt=nnx.Param)
    opt = jaxps.nnx.Optimizer(served, tx, wrt=nnx.Param, shards=2, **where)  # the one changed line
    try:
        m_plain, m_served = new_metrics(), new_metrics()
        for x, y in batches(0):
            nnx_train_step(plain, plain_opt, m_plain, x, y)
            nnx_train_step(served, opt, m_served, x, y)
            assert_trees_equal(full_state(served), full_state(plain), ulp=0 if name == "sgd" else ULP)
        assert_trees_equal(opt.server.params(), full_state(plain), ulp=0 if name == "sgd" else ULP)  # a complete model
        assert int(opt.step[...]) == int(plain_opt.step[...]) == opt.server.step == 4
        assert_trees_equal(m_served.compute(), m_plain.compute(), ulp=0 if name == "sgd" else ULP)
        # eagerly too (outside nnx.jit)
        grads = nnx.grad(lambda m: nnx_loss(m, *batches(1)[0])[0])(served)
        opt.update(served, grads)
        assert opt.server.step == 5
    finally:
        opt.server.close()


def test_nnx_optimizer_in_a_plain_nnx_jit_or_twice_in_a_step_is_an_error_that_says_what_to_do():
    model = NnxNet(nnx.Rngs(0))
    opt = jaxps.nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, y = batches(0)[0]
    grad = lambda m: nnx.grad(lambda m: nnx_loss(m, x, y)[0])(m)  # noqa: E731
    try:
        with pytest.raises(RuntimeError, match=r"inside jax.jit / nnx.jit.*jaxps.nnx.jit \(instead of nnx.jit\)"):
            nnx.jit(lambda m, o: o.update(m, grad(m)))(model, opt)
        with pytest.raises(RuntimeError, match="twice in one compiled step"):
            jaxps.nnx.jit(lambda m, o: [o.update(m, grad(m)) for _ in range(2)])(model, opt)
        assert opt.server.step == 0 and int(opt.step[...]) == 0  # nothing pushed, nothing counted
        before = nnx.as_pure(nnx.state(model, nnx.Param))

        def three_steps(m, o):  # a loop of updates in one compiled step: one push would stand for three
            nnx.scan(lambda c, _: ((c[1].update(c[0], grad(c[0])), c)[1], None), length=3)((m, o), None)

        with pytest.raises(RuntimeError, match=r"ran 3 times in one compiled step \(in a loop"):
            jaxps.nnx.jit(three_steps)(model, opt)
        assert opt.server.step == 0 and int(opt.step[...]) == 0
        assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), before)
        nan_grad = lambda m: jax.tree.map(lambda g: g * jnp.nan, grad(m))  # noqa: E731
        with pytest.raises(jaxps.PushError, match=r"NaN or Inf in .*\['l1'\]\['bias'\]"):
            jaxps.nnx.jit(lambda m, o: o.update(m, nan_grad(m)))(model, opt)
        assert opt.server.step == 0 and int(opt.step[...]) == 0  # refused: nothing applied, nothing counted
        assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), before)
        clone = nnx.clone(model)  # a model other than the Optimizer's: refused, as eagerly, not pulled into the wrong one
        with pytest.raises(ValueError, match="not given that model"):
            jaxps.nnx.jit(lambda m, o: o.update(m, grad(m)))(clone, opt)
        with pytest.raises(ValueError, match="serves the model it was built with"):
            opt.update(clone, grad(clone))
        assert opt.server.step == 0 and int(opt.step[...]) == 0
        assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), before)
        jaxps.nnx.jit(lambda m, o: o.update(m, grad(m)))(model, opt)
        assert opt.server.step == 1 and int(opt.step[...]) == 1
        assert_trees_equal(full_state(model), opt.server.params())
    finally:
        opt.server.close()


def test_nnx_optimizer_names_missing_gradients():
    model = NnxNet(nnx.Rngs(0))
    opt = jaxps.nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.grad(lambda m: nnx_loss(m, *batches(1)[0])[0])(model)
    del grads["l2"]
    with pytest.raises(ValueError, match=r"no gradient for .*\['l2'\]\['bias'\]"):
        opt.update(model, grads)
    opt.server.close()


def _oracle_sync_workers(tx, calls, workers=2):
    """Sync training of NnxNet by hand: each step, every worker's grads and BatchNorm stats from
    the server's state with its own rng stream (key folded with the worker index, continued
    across calls); one optax step on the mean gradient; batch stats the mean of the workers'."""
    init = NnxNet(nnx.Rngs(0))
    replicas = [nnx.clone(init) for _ in range(workers)]
    for i, m in enumerate(replicas):
        jaxps.nnx.worker_rngs(m, i)
    params, stats = nnx.as_pure(nnx.state(init, nnx.Param)), nnx.as_pure(nnx.state(init, nnx.BatchStat))
    opt_state, step = tx.init(params), optax_oracle(tx)
    grad_fn = nnx.jit(nnx.value_and_grad(nnx_loss, has_aux=True))
    merged_per_call = []
    for data in calls:
        metrics = new_metrics()  # one metric over every worker's batches: what merging must give
        for t in range(len(data[0])):
            grads, new_stats = [], []
            for i, m in enumerate(replicas):
                nnx.update(m, params)
                nnx.update(m, stats)
                (loss, logits), g = grad_fn(m, *data[i][t])
                metrics.update(loss=loss, logits=logits, labels=data[i][t][1])
                grads.append(nnx.as_pure(g))
                new_stats.append(nnx.as_pure(nnx.state(m, nnx.BatchStat)))
            params, opt_state = step(params, opt_state, mean(grads))
            stats = mean(new_stats)
        merged_per_call.append(metrics)
    state = full_state(_with(init, params, stats))
    return state, merged_per_call


def _with(model, *states):
    model = nnx.clone(model)
    for s in states:
        nnx.update(model, s)
    return model


def test_run_workers_sync_equals_the_mean_of_workers_with_metrics_and_rngs_across_calls(where):
    tx = optax.sgd(0.1, momentum=0.9)
    calls = [[batches(10 * c + i, n=2) for i in range(2)] for c in range(2)]
    model = NnxNet(nnx.Rngs(0))
    opt = jaxps.nnx.Optimizer(model, tx, wrt=nnx.Param, shards=2, mode="sync", workers=2, **where)
    try:
        got = [opt.run_workers(nnx_worker, model, call) for call in calls]
        expected_state, expected_metrics = _oracle_sync_workers(tx, calls)
        assert_trees_equal(opt.server.params(), expected_state)
        for g, e in zip(got, expected_metrics):
            assert isinstance(g, nnx.MultiMetric)
            assert int(g.loss.count[...]) == 4 and int(g.accuracy.count[...]) == 32  # 2 workers x 2 batches (x 8)
            assert_trees_equal(g.compute(), e.compute(), ulp=ULP)  # sums in another order
        assert opt.server.step == 4 and int(opt.step[...]) == 4  # the updates the driver's model now holds
        # the driver's model goes on: run_workers gave worker 0 a new client, which its next step pushes through
        nnx_train_step(model, opt, new_metrics(), *batches(5, n=1)[0])
        assert (opt.server.step, opt.server.stats()["pushes_dropped"], int(opt.step[...])) == (5, 0, 5)
        assert_trees_equal(full_state(model), opt.server.params())
    finally:
        opt.server.close()


TRACED = []  # one entry per trace of counted_step
WORKER_MODELS = []  # weak references to every worker's model


@jaxps.nnx.jit
def counted_step(model, optimizer, x, y):
    TRACED.append(1)  # runs when the step is traced, not when it runs
    optimizer.update(model, nnx.grad(lambda m: nnx_loss(m, x, y)[0])(model))


def counted_worker(model, optimizer, data):
    WORKER_MODELS.append(weakref.ref(model))
    for x, y in data:
        counted_step(model, optimizer, x, y)


def test_run_workers_traces_the_step_once_and_keeps_no_worker_model():
    """Every worker gets a new Optimizer at every call: the step is traced once for all of them, as `nnx.jit`
    traces once for one `nnx.Optimizer`, and no worker's model copy outlives its call (each was traced anew and
    kept alive by JAX's cache: memory grew with every call)."""
    TRACED.clear(), WORKER_MODELS.clear()
    model = NnxNet(nnx.Rngs(0))
    opt = jaxps.nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param, shards=2, mode="sync", workers=2)
    try:
        for c in range(3):
            opt.run_workers(counted_worker, model, [batches(10 * c + i, n=2) for i in range(2)])
        counted_step(model, opt, *batches(7, n=1)[0])  # the driver's own step: the same trace
        gc.collect()
        assert len(TRACED) == 1
        assert len(WORKER_MODELS) == 6 and all(ref() is None for ref in WORKER_MODELS)
        assert opt.server.step == 7 and int(opt.step[...]) == 7
        assert_trees_equal(full_state(model), opt.server.params())
    finally:
        opt.server.close()


def test_two_optimizers_updated_in_one_step_each_push_once():
    """Two models, two Optimizers (e.g. a GAN's), one compiled step that updates both: each pushes its own once."""
    models = [NnxNet(nnx.Rngs(s)) for s in (0, 1)]
    opts = [jaxps.nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    x, y = batches(3, n=1)[0]
    grad = lambda m: nnx.grad(lambda m: nnx_loss(m, x, y)[0])(m)  # noqa: E731
    try:
        jaxps.nnx.jit(lambda a, b, oa, ob: (oa.update(a, grad(a)), ob.update(b, grad(b))))(*models, *opts)
        for m, o in zip(models, opts):
            assert o.server.step == 1 and int(o.step[...]) == 1
            assert_trees_equal(full_state(m), o.server.params())
        with pytest.raises(RuntimeError, match="is a copy"):
            nnx.clone(opts[0]).update(models[0], grad(models[0]))
    finally:
        for o in opts:
            o.server.close()


def results_worker(model, optimizer, kind):
    loss = nnx.metrics.Average("loss")
    loss.update(loss=jnp.float32(kind[1]))
    return {
        "names": {"worker": f"w{kind[1]}"},
        "arrays": {"losses": np.array([1.0, 2.0 + kind[1]])},
        "metrics": {"loss": loss, "lr": 0.1 * (1 + kind[1])},
    }[kind[0]]


def test_run_workers_merges_metrics_and_returns_other_results_as_a_list():
    """Dicts of metrics and numbers are merged; dicts of strings or arrays are results like any other (a dict of
    strings was divided by the worker count: a TypeError after training had run; arrays were averaged)."""
    model = NnxNet(nnx.Rngs(0))
    opt = jaxps.nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param, mode="sync", workers=2)
    try:
        assert opt.run_workers(results_worker, model, [("names", 0), ("names", 1)]) == [{"worker": "w0"}, {"worker": "w1"}]
        arrays = opt.run_workers(results_worker, model, [("arrays", 0), ("arrays", 1)])
        assert [a["losses"].tolist() for a in arrays] == [[1.0, 2.0], [1.0, 3.0]]
        merged = opt.run_workers(results_worker, model, [("metrics", 0), ("metrics", 1)])
        assert float(merged["loss"].compute()) == 0.5 and merged["lr"] == pytest.approx(0.15)
    finally:
        opt.server.close()


@pytest.fixture
def as_a_script():
    """This module's functions pickled by value, as cloudpickle sends those of a script's `__main__`."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_workers_and_steps_of_a_script_run_in_worker_processes(as_a_script):
    """A worker function and its `jaxps.nnx.jit` / `jaxps.jit` step sent by value to the worker processes (as
    `examples/flax_nnx.py`'s are) train as those sent by reference do (nothing of this process's threads goes
    with the step)."""
    test_run_workers_sync_equals_the_mean_of_workers_with_metrics_and_rngs_across_calls({"transport": "multiprocessing"})
    test_train_state_workers_sync_batch_stats_are_the_mean({"transport": "multiprocessing"})


def test_worker_rngs_are_per_worker_and_continue():
    model = NnxNet(nnx.Rngs(0))
    x = jnp.asarray(batches(0)[0][0])
    a, b = nnx.clone(model), nnx.clone(model)
    jaxps.nnx.worker_rngs(a, 0)
    jaxps.nnx.worker_rngs(b, 1)
    first_a, first_b = a(x), b(x)
    assert not np.array_equal(first_a, first_b)  # different dropout masks
    saved = nnx.as_pure(nnx.state(a, nnx.RngState))
    second_a = a(x)
    c = nnx.clone(model)
    jaxps.nnx.worker_rngs(c, 0, saved)  # a later call picks up where worker 0 left off
    np.testing.assert_array_equal(c(x), second_a)
    assert not np.array_equal(second_a, first_a)


def test_merge_metrics():
    a, b, whole = nnx.metrics.Welford(), nnx.metrics.Welford(), nnx.metrics.Welford()
    xs, ys = jnp.arange(5.0), jnp.arange(5.0, 12.0) ** 2
    a.update(values=xs), b.update(values=ys), whole.update(values=jnp.concatenate([xs, ys]))
    merged = jaxps.nnx.merge_metrics([a, b])
    got, want = merged.compute(), whole.compute()
    np.testing.assert_allclose([got.mean, got.standard_deviation], [want.mean, want.standard_deviation], rtol=1e-5)
    m1, m2 = new_metrics(), new_metrics()
    m1.update(loss=jnp.float32(1.0), logits=jnp.eye(3), labels=jnp.array([0, 1, 0]))
    m2.update(loss=jnp.float32(3.0), logits=jnp.eye(3), labels=jnp.array([0, 1, 2]))
    merged = jaxps.nnx.merge_metrics([{"train": m1, "n": 2.0}, {"train": m2, "n": 4.0}])
    assert float(merged["train"].compute()["loss"]) == 2.0 and float(merged["train"].compute()["accuracy"]) == np.float32(5 / 6)
    assert merged["n"] == 3.0  # plain numbers: the mean over workers


# -- value leaves on the server ------------------------------------------------------
def value_tree(seed):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {"params": {"w": f(3, 2), "b": f(2)}, "batch_stats": {"mean": f(2), "var": f(2)}}


def test_values_sync_are_the_mean_of_the_workers_values(make_server):
    tx, init = optax.sgd(0.1, momentum=0.9), value_tree(0)
    ps = make_server(init, tx, shards=3, mode="sync", workers=2, values=["batch_stats"])
    pushes = [[value_tree(100 * t + i) for i in range(2)] for t in range(3)]
    for t in range(3):
        clients = [ps.client(i) for i in range(2)]
        futures = [c.push(p) for c, p in zip(clients, pushes[t])]
        assert [f.result(timeout=60) for f in futures] == ["applied"] * 2
    params, opt_state, step = init["params"], tx.init(init["params"]), optax_oracle(tx)
    for t in range(3):
        params, opt_state = step(params, opt_state, mean([p["params"] for p in pushes[t]]))
    expected = {"params": params, "batch_stats": mean([p["batch_stats"] for p in pushes[2]])}
    assert_trees_equal(ps.params(), expected)


def test_values_async_running_mean():
    tx, init = optax.sgd(0.5), value_tree(0)
    ps = jaxps.ParameterServer(init, tx, shards=2, mode="async", workers=2, values="batch_stats")
    v = init["batch_stats"]
    for t in range(3):
        pushed = value_tree(t + 1)
        assert ps.client(t % 2).push(pushed).result(timeout=60) == "applied"
        v = jax.tree.map(lambda old, new: old + 0.5 * (new - old), v, pushed["batch_stats"])  # window = 2 workers
    np.testing.assert_allclose(jax.tree.leaves(ps.params()["batch_stats"]), jax.tree.leaves(v), rtol=1e-6)
    ps.close()


@pytest.mark.parametrize("merge", ["latest", "running", "mean"])
def test_values_with_one_worker_are_exactly_the_pushed_values(merge):
    tx, init = jaxps.values(optax.sgd(0.5), lambda path, leaf: "batch_stats" in path, merge=merge), value_tree(0)
    with jaxps.ParameterServer(init, tx, shards=2) as ps:
        for t in range(3):
            ps.push(value_tree(t + 1))
        assert_trees_equal(ps.params()["batch_stats"], value_tree(3)["batch_stats"])
    assert optax.tree_utils.tree_get(tx.init(init), "trace") is None  # no optimizer slots for value leaves


def test_values_are_saved_and_restored_with_the_parameters(tmp_path):
    tx, init = optax.adam(1e-2), value_tree(0)
    with jaxps.ParameterServer(init, tx, shards=2, values="batch_stats") as ps:
        ps.push(value_tree(1))
        assert ps.save(tmp_path) == 1
        ps.push(value_tree(2))
        expected = ps.params()
    with jaxps.ParameterServer.restore(tmp_path, init, tx, shards=3, values="batch_stats") as ps:
        ps.push(value_tree(2))
        assert_trees_equal(ps.params(), expected)


def test_values_errors_name_the_paths():
    with pytest.raises(ValueError, match=r"'batch_stat' names no leaf.*\['params'\]\['b'\]"):
        jaxps.ParameterServer(value_tree(0), optax.sgd(0.1), values=["batch_stat"])
    with pytest.raises(ValueError, match="unknown merge='median'"):
        jaxps.values(optax.sgd(0.1), ["batch_stats"], merge="median")
    with pytest.raises(ValueError, match="give value leaves once"):
        jaxps.ParameterServer(value_tree(0), jaxps.values(optax.sgd(0.1), "batch_stats"), values="batch_stats")
    with pytest.raises(jaxps.PushError, match=r"missing paths: \[\"\['batch_stats'\]\['mean'\]\""):
        with jaxps.ParameterServer(value_tree(0), optax.sgd(0.1), values="batch_stats") as ps:
            ps.push({"params": value_tree(1)["params"], "batch_stats": {"var": jnp.ones(2)}})


# -- linen TrainState ------------------------------------------------------------------
class FlaxState(train_state.TrainState):
    batch_stats: dict


def linen_step(state, x, y):
    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])


linen_train_step = jaxps.jit(linen_step)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_train_state_equals_flax_train_state_step_by_step(name):
    where = {"transport": "inprocess"}  # every transport: test_train_state_workers_sync_batch_stats_are_the_mean
    tx = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-2)}[name]
    model = LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
    plain = FlaxState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
    state = jaxps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"], shards=2, **where)  # fmt: skip
    assert isinstance(state, train_state.TrainState)
    try:
        for x, y in batches(0):
            plain, state = linen_train_step(plain, x, y), linen_train_step(state, x, y)
            assert_trees_equal((state.params, state.batch_stats), (plain.params, plain.batch_stats), ulp=0 if name == "sgd" else ULP)
        assert int(state.step) == int(plain.step) == state.server.step == 4
        served = state.server.params()  # complete linen variables
        assert_trees_equal({"params": served["params"], "batch_stats": served["batch_stats"]},
                           {"params": plain.params, "batch_stats": plain.batch_stats}, ulp=0 if name == "sgd" else ULP)  # fmt: skip
        state = linen_step(state, *batches(1)[0])  # eagerly too
        assert state.server.step == 5
    finally:
        state.server.close()


def test_train_state_in_a_plain_jax_jit_or_twice_in_a_step_is_an_error_that_says_what_to_do():
    model = LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
    state = jaxps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1), batch_stats=variables["batch_stats"])
    x, y = batches(0)[0]
    try:
        with pytest.raises(RuntimeError, match=r"inside jax.jit / nnx.jit.*jaxps.jit \(linen, instead of jax.jit\)"):
            jax.jit(linen_step)(state, x, y)
        with pytest.raises(RuntimeError, match="twice in one compiled step"):
            jaxps.jit(lambda s: linen_step(linen_step(s, x, y), x, y))(state)
        with pytest.raises(RuntimeError, match=r"made 1 update\(s\) and returned 0 state\(s\) holding one"):
            jaxps.jit(lambda s: linen_step(s, x, y).params)(state)  # the state, and its push, dropped
        with pytest.raises(RuntimeError, match=r"made 1 update\(s\) and returned 2 state\(s\) holding one"):
            jaxps.jit(lambda s: (lambda new: (new, {"last": new}))(linen_step(s, x, y)))(state)  # pushed twice?
        assert state.server.step == 0
        step_or_loss = jaxps.jit(lambda s, train: linen_step(s, x, y) if train else jnp.sum(s.params["Dense_0"]["bias"]),
                                 static_argnames="train")  # fmt: skip
        step_or_loss(state, train=False)  # a trace without an update: nothing to return
        after = jaxps.jit(lambda s: {"state": linen_step(s, x, y), "n": 1})(state)["state"]  # found at any depth
        assert after.pending is None and after.server.step == 1 and int(after.step) == 1
        assert_trees_equal({"params": after.params, "batch_stats": after.batch_stats}, state.server.params())
        # jax.jit's decorator form, donating the state as flax's guides do: not passed on (the state's params are
        # the server's own in-process), so the server keeps them
        donating = jaxps.jit(static_argnames="scale", donate_argnums=0)(lambda s, scale: linen_step(s, x * scale, y))
        for _ in range(2):
            after = donating(after, scale=1.0)
        assert after.server.step == 3 and int(after.step) == 3
        assert_trees_equal({"params": after.params, "batch_stats": after.batch_stats}, state.server.params())
    finally:
        state.server.close()


def linen_guide_step(state, x, y):
    """Flax's BatchNorm guide: apply_gradients(grads=...), then replace(batch_stats=...)."""
    grads, updates = jax.grad(lambda p: _linen_loss(state, p, x, y), has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"])


def test_train_state_with_the_flax_guide_pattern_pushes_the_new_batch_stats():
    tx, model = optax.sgd(0.1, momentum=0.9), LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
    plain = FlaxState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
    state = jaxps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
    plain_step, step = jax.jit(linen_guide_step), jaxps.jit(linen_guide_step)
    try:
        for x, y in batches(0):
            plain, state = plain_step(plain, x, y), step(state, x, y)
            assert_trees_equal((state.params, state.batch_stats), (plain.params, plain.batch_stats))
        assert_trees_equal(state.server.params(), {"params": plain.params, "batch_stats": plain.batch_stats})
    finally:
        state.server.close()


def linen_worker(client, data):
    state = jaxps.TrainState.from_client(client, LinenNet().apply)
    for x, y in data:
        state = linen_train_step(state, x, y)
    return int(state.step)


def test_train_state_workers_sync_batch_stats_are_the_mean(where):
    tx, model = optax.sgd(0.1), LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
    state = jaxps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"], mode="sync", workers=2, **where)  # fmt: skip
    data = [batches(i, n=2) for i in range(2)]
    try:
        assert state.server.run_workers(linen_worker, data) == [2, 2]
        plain = FlaxState.create(apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"])
        grad_fn = jax.jit(lambda s, x, y: jax.grad(lambda p: _linen_loss(s, p, x, y), has_aux=True)(s.params))
        apply = jax.jit(lambda s, g, b: s.apply_gradients(grads=g, batch_stats=b))
        for t in range(2):
            out = [grad_fn(plain, *data[i][t]) for i in range(2)]
            plain = apply(plain, mean([g for g, _ in out]), mean([u["batch_stats"] for _, u in out]))
        assert_trees_equal(state.server.params(), {"params": plain.params, "batch_stats": plain.batch_stats})
        # the driver's state goes on: run_workers gave worker 0 a new client, which its next step pushes through
        state = linen_train_step(state, *batches(5, n=1)[0])
        assert (state.server.step, state.server.stats()["pushes_dropped"], int(state.step)) == (3, 0, 1)
        assert_trees_equal(state.server.params(), {"params": state.params, "batch_stats": state.batch_stats})
    finally:
        state.server.close()


def _linen_loss(state, params, x, y):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates


# -- the example -----------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_diff_is_small():
    """`diff` of the single-process and the jaxps example shows only what jaxps needs."""
    out = subprocess.run(["diff", str(EXAMPLES / "flax_nnx_single.py"), str(EXAMPLES / "flax_nnx.py")], capture_output=True, text=True).stdout
    added = [l for l in out.splitlines() if l.startswith(">")]
    removed = [l for l in out.splitlines() if l.startswith("<")]
    construction = [l for l in added if "jaxps.nnx.Optimizer(" in l or "transport=args.transport, mode=" in l]
    # beyond the server's construction: the import, --transport, jaxps.nnx.jit and run_workers instead of train
    assert len(construction) == 2 and len(added) - len(construction) <= 5 and len(removed) <= 3, out
    assert any("optimizer.run_workers(train, model" in l for l in added) and any("@jaxps.nnx.jit" in l for l in added)
