"""Push filters (`jaxps.filters`), unchanged pulls that move nothing, and the byte counts, against oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxps
from helpers import assert_trees_equal, grads_like, mean, optax_oracle, params_tree
from jaxps import filters

BF16 = jnp.bfloat16


def nbytes(tree, dtype=None):
    return sum(x.size * np.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(tree))


def cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype).astype(x.dtype), tree)


def test_precision_is_optax_on_cast_gradients_and_halves_the_bytes(make_server):
    # sync, two workers on their transport's own execution units (the filter travels with the clients):
    # every step is one optax step on the mean of the gradients cast to bfloat16 and back, bit for bit
    params, tx, steps = params_tree(), optax.adam(1e-2), 3
    ps = make_server(params, tx, shards=2, mode="sync", workers=2, push_filter=filters.precision(BF16))

    def work(client, offset):
        for t in range(steps):
            client.pull(timeout=60)
            client.push(grads_like(params, seed=100 * t + client.worker)).result(timeout=60)
        return client.worker

    assert ps.run_workers(work, [0, 0]) == [0, 1]
    step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
    for t in range(steps):
        expected, opt_state = step(expected, opt_state, mean([cast(grads_like(params, seed=100 * t + w), BF16) for w in range(2)]))
    assert_trees_equal(ps.params(), expected)
    stats = ps.stats()
    assert stats["bytes_pushed"] == 2 * steps * nbytes(params, BF16) == 2 * steps * nbytes(params) // 2
    assert stats["bytes_pulled"] == 2 * steps * nbytes(params) + nbytes(params)  # the workers' pulls, and ps.params()


def test_top_k_with_error_feedback_conserves_the_gradient_and_unchanged_pulls_move_nothing(make_server):
    # a push of g and then 1/fraction zero pushes leave the parameters where one push of g would, exactly
    params, tx, fraction = params_tree(), optax.sgd(0.1), 0.25
    ps = make_server(params, tx, shards=2, push_filter=filters.top_k(fraction))
    client, g = ps.client(0), grads_like(params, seed=1)
    zeros = jax.tree.map(jnp.zeros_like, g)
    for grads in [g] + [zeros] * int(1 / fraction):
        client.pull(timeout=60)
        assert client.push(grads).result(timeout=60) == "applied"
    expected, _ = optax_oracle(tx)(params, tx.init(params), g)
    first = client.pull(timeout=60)
    assert_trees_equal(first, expected)
    # each push sent ceil(n / 4) (index, value) pairs per leaf
    sent = sum(max(1, -(-x.size // 4)) * 8 for x in jax.tree.leaves(params))
    stats = ps.stats()
    assert stats["bytes_pushed"] == (1 + int(1 / fraction)) * sent
    # the server has not stepped since: pulling again moves no array bytes, and gives the same parameters
    again = client.pull(timeout=60)
    assert ps.stats()["bytes_pulled"] == stats["bytes_pulled"]
    assert_trees_equal(again, expected)
    client.push(g).result(timeout=60)  # a step: the next pull moves the shards' bytes again
    client.pull(timeout=60)
    assert ps.stats()["bytes_pulled"] == stats["bytes_pulled"] + nbytes(params)


def test_a_ragged_chain_crosses_only_significant_entries_as_16_bit(make_server):
    # significant entries only (how many varies by push), their values as bfloat16: the shard applies exactly that
    params, tx, threshold = params_tree(), optax.sgd(0.1), 1.0
    ps = make_server(params, tx, shards=2, push_filter=filters.chain(filters.significant(threshold, error_feedback=False), filters.precision(BF16)))
    client, expected, step = ps.client(0), params, optax_oracle(tx)
    sent = 0
    for seed in (1, 2):
        g = grads_like(params, seed)
        client.pull(timeout=60)
        client.push(g).result(timeout=60)
        kept = jax.tree.map(lambda x: jnp.where(jnp.abs(x) > threshold, x.astype(BF16).astype(x.dtype), 0), g)
        expected, _ = step(expected, tx.init(params), kept)
        sent += sum(int((jnp.abs(x) > threshold).sum()) * (4 + 2) + 4 for x in jax.tree.leaves(g))
    assert_trees_equal(client.pull(timeout=60), expected)
    assert ps.stats()["bytes_pushed"] == sent


def test_filters_compose_in_order():
    # chain(top_k, precision): the largest entries, their values cast; decoded as precision then top_k
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
    like = jax.ShapeDtypeStruct(x.shape, x.dtype)
    f = filters.chain(filters.top_k(0.2, error_feedback=False), filters.precision(jnp.float16))
    payload, _ = f.encode(x, f.init(like))
    assert [a.dtype for a in payload] == [jnp.int32, jnp.float16] and payload[0].shape == (6,)
    top = np.argsort(-np.abs(np.asarray(x)).ravel())[:6]
    expected = np.zeros(30, np.float32)
    expected[top] = np.asarray(x).ravel()[top].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(f.decode(payload, like)), expected.reshape(6, 5))


def test_bad_filter_configuration_is_a_clear_error_at_construction():
    for bad in (0, 1.5, -0.1, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            filters.top_k(bad)
    with pytest.raises(ValueError, match="floating dtype.*int32"):
        filters.precision(jnp.int32)
    with pytest.raises(ValueError, match="not a dtype"):
        filters.precision("sixteen")
    with pytest.raises(ValueError, match="threshold >= 0"):
        filters.significant(-1.0)
    with pytest.raises(ValueError, match="ragged"):
        filters.chain(filters.significant(0.1), filters.top_k(0.5))
    with pytest.raises(TypeError, match="PushFilter"):
        filters.chain(filters.precision(BF16), "bf16")
    with pytest.raises(ValueError, match="none of bf16, fp16"):
        filters.from_spec("topk:0.01+int8")
    params = params_tree()
    with pytest.raises(TypeError, match="PushFilter"):
        jaxps.ParameterServer(params, optax.sgd(0.1), push_filter="bf16")
    # a filter of one's own whose decode does not give the leaf back is refused, naming the leaf
    flatten = filters.PushFilter(lambda like: (), lambda g, s: ((g.ravel(),), s), lambda p, like: p[0])
    with pytest.raises(ValueError, match=r"decode gives float32\[36\] for \['conv'\]\['kernel'\], which is float32\[3, 3, 1, 4\]"):
        jaxps.ParameterServer(params, optax.sgd(0.1), push_filter=flatten)


def test_filter_state_is_the_clients_and_a_bad_push_changes_nothing():
    params = params_tree()
    ps = jaxps.ParameterServer(params, optax.sgd(1.0), push_filter=filters.top_k(0.5))
    client, g = ps.client(0), grads_like(params, seed=1)
    client.pull()
    client.push(g).result()
    state, before = client.filter_state, ps.params()
    residual_norm = sum(float(jnp.abs(r).sum()) for r in state)
    assert residual_norm > 0  # half of g waits in the worker's state
    # NaN, and a wrong shape: refused before anything is encoded; neither the state nor the shard moves
    with pytest.raises(jaxps.PushError, match="NaN"):
        client.push(jax.tree.map(lambda x: x * jnp.nan, g))
    bad = dict(g, scale=jnp.zeros(3))
    with pytest.raises(jaxps.PushError, match=r"\['scale'\]"):
        client.push(bad)
    assert all(a is b for a, b in zip(client.filter_state, state))
    assert_trees_equal(ps.params(), before)
    # a worker that leaves and comes back starts afresh, unless its state is carried over
    client.leave()
    fresh = ps.client(0)
    assert fresh.filter_state is None
    fresh.filter_state = state
    fresh.pull()
    zeros = jax.tree.map(jnp.zeros_like, g)
    fresh.push(zeros).result()  # sends the other half
    expected, _ = optax_oracle(optax.sgd(1.0))(params, optax.sgd(1.0).init(params), g)
    assert_trees_equal(ps.params(), expected)
    ps.close()


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_gradients_a_float16_filter_overflows_are_refused_like_nan(nonfinite):
    # 1e5 is finite in float32 and Inf in float16: the push is refused (or skipped), never applied as Inf
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    tx = optax.adam(1e-3)
    with jaxps.ParameterServer(params, tx, shards=2, push_filter=filters.precision(jnp.float16), nonfinite=nonfinite) as ps:
        client = ps.client(0)
        client.pull()
        big = {"w": jnp.array([1.0, 1e5, 2.0]), "b": jnp.ones(2)}
        if nonfinite == "raise":
            with pytest.raises(jaxps.PushError, match=r"the push filter made NaN or Inf of finite gradients in \[\"\['w'\] \(float32\[3\]\)\"\]"):
                client.push(big)
        else:
            assert client.push(big).result() == "skipped"
        assert ps.step == 0 and ps.stats()["pushes_applied"] == 0
        assert_trees_equal(ps.params(), params)
        small = {"w": jnp.array([1.0, 6e4, 2.0]), "b": jnp.ones(2)}  # in float16's range: applied, as float16
        assert client.push(small).result() == "applied"
        expected, _ = optax_oracle(tx)(params, tx.init(params), cast(small, jnp.float16))
        assert_trees_equal(ps.params(), expected)


def test_value_leaves_cross_unfiltered():
    params = {"w": jnp.ones((4,)), "batch_stats": {"mean": jnp.zeros((4,))}}
    ps = jaxps.ParameterServer(params, optax.sgd(1.0), values="batch_stats", push_filter=filters.top_k(0.25, error_feedback=False))
    with ps:
        client = ps.client(0)
        client.pull()
        client.push({"w": jnp.asarray([1.0, -4.0, 2.0, 3.0]), "batch_stats": {"mean": jnp.asarray([0.5, 0.25, -1.0, 2.0])}}).result()
        got = ps.params()
    np.testing.assert_array_equal(got["w"], [1.0, 5.0, 1.0, 1.0])  # only the largest gradient entry
    np.testing.assert_array_equal(got["batch_stats"]["mean"], [0.5, 0.25, -1.0, 2.0])  # the values, all of them
