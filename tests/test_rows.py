"""Row leaves (`rows=`): pulled rows, lazy row pushes, sync averaging and bad rows, against dense optax oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxps
from helpers import ULP, assert_trees_equal, optax_oracle
from jaxps.plan import make_plan

ROWS, DIM = 40, 3


def table_params():
    """An embedding table (a row leaf), a bias table (a row leaf) and a dense leaf."""
    rng = np.random.default_rng(0)
    return {
        "emb": jnp.asarray(rng.standard_normal((ROWS, DIM)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((ROWS,)), jnp.float32),
        "w": jnp.asarray(rng.standard_normal((DIM,)), jnp.float32),
    }


def row_grads(ids, seed):
    """A row push's gradients: one row per id of each table, and the dense leaf's."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    return {
        "emb": np.asarray(rng.standard_normal((n, DIM)), np.float32),
        "bias": np.asarray(rng.standard_normal((n,)), np.float32),
        "w": np.asarray(rng.standard_normal((DIM,)), np.float32),
    }


def dense(grads, ids):
    """The dense gradient a row push stands for: rows added into zeros (repeats add up)."""
    out = {}
    for name in ("emb", "bias"):
        full = np.zeros((ROWS, *grads[name].shape[1:]), np.float32)
        np.add.at(full, np.asarray(ids), grads[name])
        out[name] = jnp.asarray(full)
    return {**out, "w": jnp.asarray(grads["w"])}


def lazy_oracle(tx):
    """One optax step on the dense gradient, then every row not in `touched` put back (params and state): lazy."""
    step = optax_oracle(tx)

    def lazy(params, opt_state, grads, touched):
        new_params, new_state = step(params, opt_state, grads)
        mask = np.zeros(ROWS, bool)
        mask[np.asarray(touched)] = True

        def keep(old, new):
            if np.ndim(new) >= 1 and np.shape(new)[0] == ROWS:
                m = mask.reshape((ROWS,) + (1,) * (np.ndim(new) - 1))
                return jnp.asarray(np.where(m, np.asarray(new), np.asarray(old)))
            return new

        return jax.tree.map(keep, params, new_params), jax.tree.map(keep, opt_state, new_state)

    return lazy


def test_plan_splits_row_leaves_into_contiguous_near_equal_ranges():
    params = table_params()
    plan = make_plan(params, 3, rows=["emb", "['bias']"])
    assert plan.rows == {"['bias']": [(0, 0, 13), (1, 13, 26), (2, 26, 40)], "['emb']": [(0, 0, 13), (1, 13, 26), (2, 26, 40)]}
    assert list(plan.paths) == ["['w']"] and "['emb'] rows 0:13 on 0, 13:26 on 1, 26:40 on 2" in repr(plan)
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    assert_trees_equal(plan.merge(plan.split(leaves)), jax.tree.map(np.asarray, params))
    assert make_plan(params, 3, rows=lambda path, x: x.ndim == 2).row_leaves == {"['emb']": 1}
    with pytest.raises(ValueError, match=r"rows= names \['table'\], which are not leaf paths"):
        make_plan(params, 2, rows=["table"])
    with pytest.raises(ValueError, match=r"without rows to split.*\['s'\] \(float32\[\]\)"):
        make_plan({"s": jnp.zeros(()), "t": jnp.zeros((4, 2))}, 2, rows=["s"])
    with pytest.raises(ValueError, match="every shard needs at least one leaf or row"):
        make_plan({"t": jnp.zeros((2, 2))}, 3, rows=["t"])


def test_pulled_rows_are_the_tables_rows_and_sgd_row_pushes_equal_dense_pushes(make_server):
    # sgd is stateless: a row push is the dense push with zeros elsewhere, bit for bit
    params, tx = table_params(), optax.sgd(0.1)
    ps = make_server(params, tx, shards=3, rows=["emb", "bias"])
    client, step = ps.client(0), optax_oracle(tx)
    expected, opt_state = params, tx.init(params)
    pushes = [[5, 39, 5, 0], [13, 12, 26], [7]]  # repeats, ids across shard boundaries, one shard only
    for seed, ids in enumerate(pushes):
        got = client.pull(rows={"emb": ids, "bias": ids}, timeout=60)
        for name in ("emb", "bias"):
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name])[ids])
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(expected["w"]))
        grads = row_grads(ids, seed)
        assert client.push(grads, rows={"emb": ids, "bias": ids}).result(timeout=60) == "applied"
        expected, opt_state = step(expected, opt_state, dense(grads, ids))
    assert_trees_equal(client.pull(timeout=60), expected)  # a plain pull: the whole tables
    assert_trees_equal(ps.params(), expected)
    # bytes follow the rows: each push sent its distinct rows of both tables and the dense leaf
    distinct = sum(len(set(ids)) for ids in pushes)
    assert ps.stats()["bytes_pushed"] == distinct * (DIM + 1) * 4 + len(pushes) * DIM * 4


def test_adam_row_pushes_are_lazy(make_server):
    # only the rows pushed, and their rows of Adam's moments, change; the count advances with every push
    params, tx = table_params(), optax.adam(0.05)
    ps = make_server(params, tx, shards=2, rows=["emb", "bias"])
    client, lazy = ps.client(0), lazy_oracle(tx)
    expected, opt_state = params, tx.init(params)
    for seed, ids in enumerate([[1, 30, 1], [30, 2], [25]]):
        client.pull(rows={"emb": ids}, timeout=60)
        grads = row_grads(ids, seed)
        assert client.push(grads, rows={"emb": ids, "bias": ids}).result(timeout=60) == "applied"
        expected, opt_state = lazy(expected, opt_state, dense(grads, ids), ids)
    got = ps.params()
    assert_trees_equal(got, expected, ulp=ULP)
    untouched = [r for r in range(ROWS) if r not in (1, 2, 25, 30)]
    np.testing.assert_array_equal(np.asarray(got["emb"])[untouched], np.asarray(params["emb"])[untouched])


def test_sync_averages_row_pushes_over_the_workers(make_server):
    # each step is one lazy Adam step on the mean of the workers' zero-filled gradients, over the union of their rows
    params, tx, steps = table_params(), optax.adam(0.05), 2
    ps = make_server(params, tx, shards=2, mode="sync", workers=2, rows=["emb", "bias"])
    ids_of = lambda t, w: [3 + w + 10 * t, 21, 3 + w + 10 * t]  # row 21 from both workers, others from one

    def work(client, _):
        for t in range(steps):
            client.pull(rows={"emb": ids_of(t, client.worker)}, timeout=60)
            ids = ids_of(t, client.worker)
            client.push(row_grads(ids, 10 * t + client.worker), rows={"emb": ids, "bias": ids}).result(timeout=60)

    ps.run_workers(work, [None, None])
    lazy, expected, opt_state = lazy_oracle(tx), params, tx.init(params)
    for t in range(steps):
        g = [dense(row_grads(ids_of(t, w), 10 * t + w), ids_of(t, w)) for w in range(2)]
        mean = jax.tree.map(lambda a, b: (a + b) / 2, *g)
        expected, opt_state = lazy(expected, opt_state, mean, ids_of(t, 0) + ids_of(t, 1))
    assert_trees_equal(ps.params(), expected, ulp=ULP)


def test_a_sync_step_of_row_pushes_is_the_dense_step_bit_for_bit_with_three_workers():
    # SGD, 3 workers (a mean by 3 rounds): the step with row pushes is the dense step of the same gradients,
    # bit for bit, on the row leaves and on the dense leaf beside them
    params, ids = table_params(), np.arange(ROWS)
    grads = [row_grads(ids, seed) for seed in range(3)]
    out = {}
    for name, kw in (("rows", {"rows": ["emb", "bias"]}), ("dense", {})):
        with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, mode="sync", workers=3, **kw) as ps:
            futures = [
                ps.client(w).push(g, **({"rows": {"emb": ids, "bias": ids}} if kw else {})) for w, g in enumerate(grads)
            ]
            assert [f.result(30) for f in futures] == ["applied"] * 3
            out[name] = ps.params()
    assert_trees_equal(out["rows"], out["dense"])


BAD_ROWS = {
    "out of range": ({"emb": [1, ROWS], "bias": [1, 2]}, r"\['emb'\] \(float32\[40, 3\]\): row ids \[40\] out of range; valid ids are 0 to 39"),
    "negative": ({"emb": [-1, 2], "bias": [1, 2]}, r"row ids \[-1\] out of range"),
    "beyond int64": ({"emb": np.array([1, 2**63 + 5], np.uint64), "bias": [1, 2]}, r"row ids \[9223372036854775813\] out of range"),
    "rows and ids differ": ({"emb": [1, 2, 3], "bias": [1, 2]}, r"\['emb'\].*a row push of 3 ids needs a gradient of shape \[3, 3\], got float32\[2, 3\]"),
    "not a row leaf": ({"w": [0], "bias": [1, 2]}, r"rows= names 'w', which is not a row leaf; the row leaves are \[\"\['bias'\]\", \"\['emb'\]\"\]"),
    "not integers": ({"emb": [0.5, 1.0], "bias": [1, 2]}, r"row ids must be a 1-D array of integers, got float64\[2\]"),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_pull_of_no_rows_is_an_empty_table_in_every_mode(mode):
    # (the client decides whom to ask: one transport will do)
    params = {"emb": table_params()["emb"]}  # a tree of one row leaf: no shard holds anything else to pull
    with jaxps.ParameterServer(params, optax.sgd(0.1), shards=2, rows=["emb"], mode=mode, workers=1) as ps:
        got = ps.client(0).pull(rows={"emb": []}, timeout=60)
    assert got["emb"].shape == (0, DIM) and got["emb"].dtype == np.float32


def test_bad_rows_change_nothing_and_the_server_keeps_serving(make_server):
    params, tx = table_params(), optax.adam(0.05)
    ps = make_server(params, tx, shards=2, rows=["emb", "bias"])
    client = ps.client(0)
    client.push(row_grads([4, 5], 0), rows={"emb": [4, 5], "bias": [4, 5]}).result(timeout=60)
    before, stats = ps.params(), ps.stats()
    for case, (rows, message) in BAD_ROWS.items():
        with pytest.raises(jaxps.PushError, match=message):
            client.push(row_grads([1, 2], 1), rows=rows)
        if case != "rows and ids differ":  # a pull names rows too
            with pytest.raises(ValueError, match=message):
                client.pull(rows=rows, timeout=60)
    assert_trees_equal(ps.params(), before)
    unchanged = lambda st: {k: v for k, v in st.items() if k not in ("shards", "bytes_pulled")}
    assert unchanged(ps.stats()) == unchanged(stats)
    assert client.push(row_grads([6], 2), rows={"emb": [6], "bias": [6]}).result(timeout=60) == "applied"
    assert ps.step == stats["steps"] + 1


def test_row_leaves_checkpoint_and_restore_into_another_shard_count(make_server, tmp_path):
    # rows and their rows of Adam's moments are saved by row range; restored into 2 shards (or a plan
    # without row leaves), the run goes on as if nothing had happened
    params, tx = table_params(), optax.adam(0.05)
    pushes = [[1, 30, 1], [14, 13, 39], [25], [0, 26], [13, 12]]
    push = lambda client, t: client.push(row_grads(pushes[t], t), rows={"emb": pushes[t], "bias": pushes[t]}).result(timeout=60)
    ps = make_server(params, tx, shards=3, rows=["emb", "bias"])
    client = ps.client(0)
    for t in range(3):
        push(client, t)
    assert ps.save(str(tmp_path)) == 3
    saved = ps.params()
    for t in range(3, 5):
        push(client, t)
    expected = ps.params()
    ps.close()
    restored = make_server.restore(str(tmp_path), params, tx, shards=2, rows=["emb", "bias"])
    assert_trees_equal(restored.params(), saved)
    client = restored.client(0)
    for t in range(3, 5):
        push(client, t)
    assert_trees_equal(restored.params(), expected, ulp=ULP)
    whole = make_server.restore(str(tmp_path), params, tx, shards=1)  # the tables whole, on one shard
    assert_trees_equal(whole.params(), saved)


def test_a_pull_asks_only_the_shards_holding_its_rows():
    params = {"emb": jnp.zeros((ROWS, DIM)), "bias": jnp.zeros((ROWS,))}
    ps = jaxps.ParameterServer(params, optax.sgd(0.1), shards=4, rows=["emb", "bias"])
    try:
        before = [s["bytes_pulled"] for s in ps.stats()["shards"]]
        got = ps.client(0).pull(rows={"emb": [0, 3, 0], "bias": [25]})
        assert got["emb"].shape == (3, DIM) and got["bias"].shape == (1,)
        moved = [s["bytes_pulled"] - b for s, b in zip(ps.stats()["shards"], before)]
        assert moved == [2 * DIM * 4, 0, 4, 0]  # rows 0 and 3 on shard 0, row 25 on shard 2; shards 1 and 3 not asked
    finally:
        ps.close()


def test_what_row_leaves_do_not_support_is_refused_at_once():
    params = table_params()
    with pytest.raises(ValueError, match="push_filter= together with row leaves"):
        jaxps.ParameterServer(params, optax.sgd(0.1), shards=2, rows=["emb"], push_filter=jaxps.filters.precision(jnp.bfloat16))
    with pytest.raises(ValueError, match="cannot be updated row by row"):
        jaxps.ParameterServer({"t": jnp.zeros((256, 256))}, optax.adafactor(1e-2), rows=["t"])
    for shards in (2, 1):  # one shard too: it updates the rows it is pushed, not the whole leaf
        with pytest.raises(jaxps.NotShardableError, match=r"reduces over whole leaves, and row leaves \(rows=\) are split.*\['emb'\]"):
            jaxps.ParameterServer(params, optax.lamb(1e-2), shards=shards, rows=["emb"])
    jaxps.ParameterServer(params, optax.adam(1e-2), rows=["emb"]).close()  # elementwise: accepted
    for dtype in (jnp.float32, jnp.bfloat16):  # a table of zeros, the usual start of a bias table: refused all the same
        zeros = {"bias": jnp.zeros((ROWS,), dtype)}
        for tx in (optax.lamb(1e-3), optax.lars(1e-3)):
            with pytest.raises(jaxps.NotShardableError, match=r"reduces over whole leaves.*\['bias'\]"):
                jaxps.ParameterServer(zeros, tx, rows=["bias"])


@pytest.mark.parametrize("tx", [optax.sgd(0.5), optax.adam(0.1)], ids=["sgd", "adam"])
def test_a_bfloat16_table_is_a_row_leaf_and_its_row_pushes_are_its_dense_pushes(tx):
    # lazy Adam and SGD on a bfloat16 table: a push of every row is the dense push, bit for bit
    params = {"emb": jnp.asarray(np.random.default_rng(0).standard_normal((9, 2)), jnp.bfloat16)}
    g = np.random.default_rng(1).standard_normal((9, 2)).astype(jnp.bfloat16)
    out = []
    for kw, push in (({"rows": ["emb"], "shards": 2}, {"rows": {"emb": np.arange(9)}}), ({}, {})):
        with jaxps.ParameterServer(params, tx, **kw) as ps:
            client = ps.client(0)
            for _ in range(2):
                client.push({"emb": g}, **push).result()
            out.append(ps.params())
    assert out[0]["emb"].dtype == jnp.bfloat16
    assert_trees_equal(out[0], out[1])
