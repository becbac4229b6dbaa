"""The pure parts (plan, clocks, optimizer checks) and in-process end-to-end loops."""

import concurrent.futures
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxps
from helpers import TRANSCENDENTAL, ULP, assert_trees_equal, grads_like, optax_oracle, optimizers, params_tree
from jaxps.consistency import Clock, Contribution, Sync, make_policy

# -- plan ------------------------------------------------------------------------


def test_plan_balances_bytes_and_is_inspectable():
    params = {"big": jnp.ones(1000), "mid": jnp.ones(600), "a": jnp.ones(300), "b": jnp.ones(300), "c": jnp.ones(10)}
    plan = jaxps.make_plan(params, 2)
    assert sorted(plan.bytes_per_shard) == [4 * 1010, 4 * 1200]  # largest first, each to the lightest shard
    assert plan.paths["['big']"] != plan.paths["['mid']"]
    assert set(plan.paths) == {"['big']", "['mid']", "['a']", "['b']", "['c']"}


def test_plan_is_the_same_in_every_process():
    code = (
        "import sys; sys.path.insert(0, 'tests'); import jaxps, helpers;"
        "print(sorted(jaxps.make_plan(helpers.params_tree(), 3).paths.items()))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu", "PATH": ""},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert outs == {str(sorted(jaxps.make_plan(params_tree(), 3).paths.items())) + "\n"}


def test_plan_assign_callable():
    plan = jaxps.make_plan(params_tree(), 2, assign=lambda path, leaf: int("dense" in path))
    assert {p for p, s in plan.paths.items() if s == 1} == {"['dense']['kernel']", "['dense']['bias']"}


def test_plan_errors():
    with pytest.raises(ValueError, match=r"asked for 7 shards but the parameter tree has only 6 leaves"):
        jaxps.make_plan(params_tree(), 7)
    with pytest.raises(ValueError, match=r"assign must return a shard index in \[0, 2\)"):
        jaxps.make_plan(params_tree(), 2, assign=lambda path, leaf: 5)
    with pytest.raises(ValueError, match=r"left shards \[1\] without leaves"):
        jaxps.make_plan(params_tree(), 2, assign=lambda path, leaf: 0)
    for bad in (0, -1, 2.0, True, "2", None):  # (True was taken for 1 shard, and saved as `true` in checkpoints)
        with pytest.raises(ValueError, match=r"shards must be a positive int, got " + re.escape(repr(bad))):
            jaxps.make_plan(params_tree(), bad)
    plan = jaxps.make_plan(params_tree(), np.int64(2))  # as `assign` may return one
    assert plan.num_shards == 2 and type(plan.num_shards) is int


# -- clocks (pure) ------------------------------------------------------------------


def test_sync_clock_closes_steps_in_worker_order_and_drops_late_pushes():
    policy, clock = Sync(backup=1), Clock.start(3)
    clock, steps, outcome = policy.push(clock, Contribution(2, 0, "g2", 0))
    assert (steps, outcome, clock.version) == ([], None, 0)
    clock, steps, outcome = policy.push(clock, Contribution(0, 0, "g0", 0))
    assert [s.gradients for s in steps] == [["g0", "g2"]] and clock.version == 1
    clock, steps, outcome = policy.push(clock, Contribution(1, 0, "g1", 0))
    assert (steps, outcome, clock.pushes_dropped) == ([], "dropped", 1)
    assert policy.pull_ready(clock, 1) and not policy.pull_ready(policy.push(clock, Contribution(1, 1, "x", 1))[0], 1)


def test_sync_clock_leave_lowers_the_quorum():
    policy, clock = Sync(), Clock.start(2)
    clock, steps, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
    assert not steps
    clock, steps = policy.leave(clock, 1)
    assert [s.gradients for s in steps] == [["g0"]]


def test_sync_clock_a_worker_that_pushed_and_left_still_counts_for_its_step():
    # worker 1 pushes its last step and leaves before worker 0's push for the same step arrives:
    # the step must wait for worker 0 and be the mean of both, not close on worker 1 alone
    policy, clock = Sync(), Clock.start(2)
    clock, steps, _ = policy.push(clock, Contribution(1, 0, "g1", 0))
    clock, steps = policy.leave(clock, 1)
    assert not steps and clock.version == 0
    clock, steps, outcome = policy.push(clock, Contribution(0, 0, "g0", 0))
    assert [s.gradients for s in steps] == [["g0", "g1"]] and outcome is None
    # with a backup worker, 2 of 3 are enough, whoever has left
    policy, clock = Sync(backup=1), Clock.start(3)
    clock, _, _ = policy.push(clock, Contribution(2, 0, "g2", 0))
    clock, steps = policy.leave(clock, 2)
    assert not steps
    clock, steps, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
    assert [s.gradients for s in steps] == [["g0", "g2"]]


def test_sync_clock_counts_a_returning_worker_from_the_step_it_joins_at():
    # a shard behind the others (version 1, they are at 2) is told worker 2 comes back at step 2: it closes
    # step 1 without worker 2, step 2 waits for it, and worker 2's pull waits for version 2
    policy, clock = Sync(), Clock.start(3)
    clock, _ = policy.leave(clock, 2)
    for w in (0, 1):
        clock, _, _ = policy.push(clock, Contribution(w, 0, f"g{w}", 0))
    assert policy.first_step(clock, [2]) == 1
    clock, first = policy.join(clock, 2, at=2)
    assert first == 2 and clock.version == 1 and not policy.pull_ready(clock, 2)
    for w in (0, 1):
        clock, steps, _ = policy.push(clock, Contribution(w, 1, f"g{w}", 1))
    assert [s.workers for s in steps] == [(0, 1)] and clock.version == 2 and policy.pull_ready(clock, 2)
    for w in (0, 1):
        clock, steps, _ = policy.push(clock, Contribution(w, 2, f"g{w}", 2))
    assert not steps  # waits for worker 2 now
    clock, steps, _ = policy.push(clock, Contribution(2, 2, "g2", 2))
    assert [s.workers for s in steps] == [(0, 1, 2)]


def test_sync_clock_a_worker_rejoining_after_its_last_push_joins_the_step_after():
    policy, clock = Sync(), Clock.start(2)
    clock, _, _ = policy.push(clock, Contribution(1, 0, "g1", 0))
    clock, _ = policy.leave(clock, 1)
    assert policy.first_step(clock, [1]) == 1  # its push for step 0 is in: never twice for a step
    clock, first = policy.join(clock, 1)
    assert first == 1
    # ... and leaving again before step 1 is for good: step 1 and after do not wait for it
    clock, _ = policy.leave(clock, 1)
    clock, steps, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
    assert [s.workers for s in steps] == [(0, 1)]
    clock, steps, _ = policy.push(clock, Contribution(0, 1, "g0", 1))
    assert [s.workers for s in steps] == [(0,)]


def test_sync_clock_a_worker_joined_for_a_later_step_counts_after_a_rollback_on_every_shard_alike():
    policy, clock = Sync(), Clock.start(2)
    clock, _ = policy.leave(clock, 1)
    clock, _, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
    clock, _ = policy.join(clock, 1, at=3)
    clock = clock.restarted(version=0, applied=0)  # every shard rolled back to a checkpoint of step 0
    assert clock.stats()["workers_left"] == [] and policy.quorum(clock, 0) == 2  # it counts from there


def test_sync_shards_agree_on_the_join_step_after_a_push_that_reached_one_of_them():
    # worker 1 died mid-push: shard A has its push for step 0, shard B not. Both join it at step 1 (the
    # latest first step of all), so neither waits for a push for step 0 that will never come
    policy = Sync()
    a, b = Clock.start(2), Clock.start(2)
    a, _, _ = policy.push(a, Contribution(1, 0, "g1", 0))
    a, _ = policy.leave(a, 1)
    b, _ = policy.leave(b, 1)
    at = max(policy.first_step(a, [1]), policy.first_step(b, [1]))
    assert at == 1
    a, _ = policy.join(a, 1, at)
    b, _ = policy.join(b, 1, at)
    for clock in (a, b):
        clock, steps, _ = policy.push(clock, Contribution(0, 0, "g0", 0))
        assert clock.version == 1 and policy.quorum(clock, 1) == 2


def test_a_sync_step_takes_the_mean_eager_jax_computes():
    # 7/3 as XLA computes a division by the constant 3 (times its rounded reciprocal) is one ulp off
    ps = jaxps.ParameterServer({"s": jnp.float32(0.0)}, optax.sgd(1.0), mode="sync", workers=3)
    with ps:
        clients = [ps.client(w) for w in range(3)]
        futures = [c.push({"s": jnp.float32(g)}) for c, g in zip(clients, (8.0, 2.0, -3.0))]
        assert [f.result(60) for f in futures] == ["applied"] * 3
        assert np.asarray(ps.params()["s"]) == -(np.float32(7.0) / np.float32(3.0))


def test_a_running_workers_client_is_not_given_out_twice():
    with jaxps.ParameterServer(params_tree(), optax.sgd(0.1), mode="sync", workers=2) as ps:

        def ask_again(client, worker):
            try:
                ps.client(worker)
            except ValueError as e:
                return str(e)
            finally:
                client.push(grads_like(params_tree(), 0))

        assert ps.run_workers(ask_again, [1, 0]) == [f"worker {w} is running in run_workers, with the client run_workers gave it" for w in (1, 0)]
        assert ps.client(0).worker == 0 and ps.step == 1


def test_gradients_on_another_device_than_the_shards_are_taken_and_checked_there():
    # two CPU devices stand in for a machine's GPUs (they must exist before JAX starts: a fresh interpreter)
    script = os.path.join(os.path.dirname(__file__), "multi_device_script.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_ssp_clock_counts_a_rejoined_worker_from_its_join():
    policy, clock = make_policy("ssp", 2, 0, 1), Clock.start(2)
    for t in range(3):
        clock, _, _ = policy.push(clock, Contribution(0, t, "g", t))
    assert not policy.pull_ready(clock, 0)  # 3 pushes ahead of worker 1
    for w in (0, 1):
        clock, _ = policy.leave(clock, w)
        clock, _ = policy.join(clock, w)  # a new run_workers
    assert policy.pull_ready(clock, 0) and policy.pull_ready(clock, 1)
    clock, _, _ = policy.push(clock, Contribution(0, 3, "g", 3))
    clock, _, _ = policy.push(clock, Contribution(0, 4, "g", 4))
    assert not policy.pull_ready(clock, 0) and policy.pull_ready(clock, 1)


def test_run_workers_in_sync_and_ssp_needs_one_argument_per_worker():
    for mode, kw in (("sync", {}), ("ssp", {"max_staleness": 1})):
        with jaxps.ParameterServer(params_tree(), optax.sgd(0.1), mode=mode, workers=3, **kw) as ps:
            with pytest.raises(ValueError, match=r"needs one argument per worker, got 2: steps would wait forever for workers \[2\]"):
                ps.run_workers(lambda client, arg: arg, [0, 1])
            assert ps.run_workers(lambda client, arg: arg, [0, 1, 2]) == [0, 1, 2]
    with jaxps.ParameterServer(params_tree(), optax.sgd(0.1), workers=3) as ps:  # async: fewer is fine
        assert ps.run_workers(lambda client, arg: arg, [7]) == [7]


def test_leave_tells_every_shard_even_if_one_is_gone():
    from jaxps.client import Client
    from jaxps.transport import Leave, ShardChannel

    class Gone(ShardChannel):
        def submit(self, request, payload=None, timeout=None):
            raise jaxps.ShardDiedError("shard 0 is gone")

    class Alive(ShardChannel):
        def __init__(self):
            self.left = []

        def submit(self, request, payload=None, timeout=None):
            assert isinstance(request, Leave)
            self.left.append(request.worker)
            future = concurrent.futures.Future()
            future.set_result(None)
            return future

    alive = Alive()
    client = Client(3, jaxps.make_plan(params_tree(), 2), [Gone(), alive])
    with pytest.raises(jaxps.ShardDiedError, match="shard 0 is gone"):
        client.leave()
    assert alive.left == [3] and client.left


def test_bad_modes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mode 'bsp'; valid modes: async, sync, ssp"):
        jaxps.ParameterServer(params_tree(), optax.sgd(0.1), mode="bsp")
    with pytest.raises(ValueError, match="needs workers=N"):
        make_policy("sync", None, 0, None)
    with pytest.raises(ValueError, match="needs max_staleness"):
        make_policy("ssp", 2, 0, None)
    with pytest.raises(ValueError, match=r"backup_workers must be an int in \[0, workers=2\)"):
        make_policy("sync", 2, 2, None)


def test_nonfinite_allow_applies_unchecked_but_still_checks_shapes():
    params = {"w": np.zeros(3, np.float32)}
    with jaxps.ParameterServer(params, optax.sgd(1.0), nonfinite="allow") as ps:
        assert ps.push({"w": np.array([np.nan, 1.0, np.inf], np.float32)}).result() == "applied"
        np.testing.assert_array_equal(ps.pull()["w"], np.array([np.nan, -1.0, -np.inf], np.float32))
        with pytest.raises(jaxps.PushError, match=r"\['w'\]: shape \[2\], expected \[3\]"):
            ps.push({"w": np.ones(2, np.float32)})
        assert ps.step == 1


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int32])
@pytest.mark.parametrize("bad_at", [None, "first", "second chunk", "last"])
def test_copy_checked_copies_and_finds_nan_in_any_chunk(dtype, bad_at):
    from jaxps.validate import CHUNK_BYTES, copy_checked

    chunk = CHUNK_BYTES // np.dtype(dtype).itemsize
    src = np.arange(chunk * 3 // 2).astype(dtype)  # a chunk and a half
    where = {"first": 0, "second chunk": chunk + 7, "last": src.size - 1}.get(bad_at)
    if where is not None and dtype != np.int32:
        src[where] = np.nan
    dst = np.zeros_like(src)
    finite = copy_checked(dst, src)
    assert dst.tobytes() == src.tobytes()  # bit for bit, NaN included
    assert finite == (where is None or dtype == np.int32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("layout", ["flat", "2-d", "strided"])
def test_host_finite_is_numpy_isfinite(dtype, bad, layout):
    """The host check against numpy: one bad element anywhere is found; finite values whose sum (or sum of
    squares) overflows ("huge") are finite; contiguous or not."""
    from jaxps.validate import host_finite

    x = np.linspace(-3, 3, 6 * 1001).astype(dtype).reshape(6, 1001)
    if bad is not None:
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": np.finfo(dtype).max}[bad]
        x[4, 997] = value
        x[1, 3] = value
    x = {"flat": x.reshape(-1), "2-d": x, "strided": x[:, ::2]}[layout]
    assert host_finite(x) == bool(np.isfinite(x).all())


@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf", "nan+1j", "huge"])
def test_finite_flags_are_numpy_isfinite_per_leaf(bad):
    """The device check's flags against numpy, over many leaves of several dtypes: one bad element in one leaf
    flags that leaf only; finite leaves whose sum overflows ("huge") are finite."""
    from jaxps.validate import finite_flags

    rng = np.random.default_rng(0)
    leaves = [rng.normal(size=(i % 7) * 5 + 1).astype(d) for i, d in enumerate([np.float32, jnp.bfloat16, np.float16, np.complex64] * 5)]
    if bad == "huge":  # finite, but the leaf's sum overflows
        leaves[13] = np.full(9, np.finfo(np.float32).max, np.float32)
    elif bad is not None:  # leaf 15 is complex64, leaf 13 bfloat16
        at = 15 if bad == "nan+1j" else 13
        leaves[at][0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "nan+1j": complex(1, np.nan)}[bad]
    flags = np.asarray(finite_flags([jnp.asarray(x) for x in leaves]))
    assert flags.tolist() == [bool(np.isfinite(np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)).all()) for x in leaves]
    assert flags.all() == (bad in (None, "huge"))


def test_unknown_transport_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown transport 'rey'; valid transports: .*inprocess.*multiprocessing.*ray.*Did you mean 'ray'"):
        jaxps.ParameterServer(params_tree(), optax.sgd(0.1), transport="rey")


def test_transport_by_module_path_and_registry():
    ps = jaxps.ParameterServer(params_tree(), optax.sgd(0.1), transport="jaxps.transports.inprocess:InProcessTransport")
    assert_trees_equal(ps.pull(), params_tree())
    ps.close()
    from jaxps.transports.inprocess import InProcessTransport

    jaxps.register_transport("mine", InProcessTransport)
    assert "mine" in jaxps.available_transports()
    with jaxps.ParameterServer(params_tree(), optax.sgd(0.1), transport="mine") as ps:
        assert ps.step == 0


# -- the optimizer step -----------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("name", list(optimizers()))
def test_sharded_equals_unsharded_every_optimizer(name, shards):
    tx, params = optimizers()[name], params_tree()
    with jaxps.ParameterServer(params, tx, shards=shards) as ps:
        step, expected, opt_state = optax_oracle(tx), params, tx.init(params)
        for t in range(5):
            g = grads_like(params, t)
            ps.push(g)
            expected, opt_state = step(expected, opt_state, g)
        assert_trees_equal(ps.pull(), expected, ulp=ULP if name in TRANSCENDENTAL else 0)


def _count_into_steps(monkeypatch) -> list:
    """A list that gets an entry for every call of a shard's `Steps.into` compiled from now on."""
    from jaxps import update

    into_calls, compiled = [], update._compiled

    def counted(step):
        steps = compiled(step)
        return steps._replace(into=lambda *args: into_calls.append(1) or steps.into(*args))

    monkeypatch.setattr(update, "_compiled", counted)
    return into_calls


@pytest.mark.parametrize("mode, nonfinite", [("async", "raise"), ("sync", "allow")])  # the guarded steps, the plain ones
def test_step_donates_only_params_no_pull_still_holds(monkeypatch, mode, nonfinite):
    into_calls = _count_into_steps(monkeypatch)
    tx = optax.adam(1e-3)
    with jaxps.ParameterServer(params_tree(), tx, shards=2, mode=mode, workers=1, nonfinite=nonfinite) as ps:
        step, expected, opt_state = optax_oracle(tx), params_tree(), tx.init(params_tree())
        memory = []
        for t in range(6):
            held = ps.pull()  # still referenced at the next push: the step must not donate it
            memory.append([x.unsafe_buffer_pointer() for x in jax.tree.leaves(held)])
            ps.push(grads_like(params_tree(), t))
            assert_trees_equal(held, expected)  # intact (a donated array would be deleted)
            expected, opt_state = step(expected, opt_state, grads_like(params_tree(), t))
        # each step but the first wrote into the params of the pull before the held one (dropped by then)
        assert len(into_calls) == 5 * 2 and all(memory[t] == memory[t - 2] for t in range(2, 6)), memory
        for t in range(6, 9):
            ps.pull()  # dropped at once: the step donates
            ps.push(grads_like(params_tree(), t))
            expected, opt_state = step(expected, opt_state, grads_like(params_tree(), t))
        assert_trees_equal(ps.pull(), expected, ulp=ULP)
        assert len(into_calls) == 5 * 2  # a dropped pull's step donates
        shard = ps._channels[0]._service.shard
        donating, lent, _ = shard._guarded if nonfinite == "raise" else shard._steps  # jax-array pushes, checked on the device, take the guarded steps
        assert lent._cache_size() == 1  # each compiled once
        assert donating._cache_size() == 1


def test_a_refused_push_while_a_pull_is_held_changes_nothing(monkeypatch):
    """Each pull held through the next push (async, checked on the device): a push with Inf goes through the
    same step into the spare params (`update._keep` writes the old params there), the held pulls stay intact,
    the future says so, and the run goes on as optax's without it."""
    into_calls = _count_into_steps(monkeypatch)
    tx = optax.adam(1e-3)
    with jaxps.ParameterServer(params_tree(), tx, shards=2, mode="async", workers=1) as ps:
        step, expected, opt_state = optax_oracle(tx), params_tree(), tx.init(params_tree())
        for t in range(7):
            held, before = ps.pull(), expected
            g = grads_like(params_tree(), t)
            if t in (2, 3):  # twice in a row: the second refused step's spare holds the first one's output
                g = {**g, "dense": {**g["dense"], "bias": g["dense"]["bias"].at[1].set(jnp.inf)}}
                with pytest.raises(jaxps.PushError, match=r"NaN or Inf in \[\"\['dense'\]\['bias'\]"):
                    ps.push(g).result(timeout=30)
            else:
                ps.push(g).result(timeout=30)
                expected, opt_state = step(expected, opt_state, g)
            assert_trees_equal(held, before, ulp=ULP)  # intact through the push
            assert_trees_equal(ps.pull(), expected, ulp=ULP)
        assert len(into_calls) == 6 * 2  # every step but the first, the refused ones too, wrote into a spare
        assert (ps.step, ps.stats()["pushes_refused"]) == (5, 2)


def test_a_held_pull_whose_predecessor_a_reader_donated_still_steps():
    """The step of a held pull writes into the params of the pull before it, unless a reader deleted those
    (donated them to a jit of its own): then into fresh memory, and the run is as optax's."""
    tx = optax.adam(1e-3)
    with jaxps.ParameterServer(params_tree(), tx, shards=2) as ps:
        step, expected, opt_state = optax_oracle(tx), params_tree(), tx.init(params_tree())
        held = ps.pull()
        for t in range(4):
            ps.push(grads_like(params_tree(), t))
            expected, opt_state = step(expected, opt_state, grads_like(params_tree(), t))
            before, held = held, ps.pull()
            for x in jax.tree.leaves(before):
                jax.jit(lambda x: x + 1, donate_argnums=0)(x)  # the reader donates what it held
            del before
        assert_trees_equal(ps.pull(), expected, ulp=ULP)


def test_a_reader_that_donates_the_servers_own_arrays_gets_a_clear_error():
    """In-process, a pull lends the shard's own arrays; a jitted call that donates them deletes the server's
    parameters: the next pull or push says so (not "Array has been deleted"), every time."""
    with jaxps.ParameterServer(params_tree(), optax.sgd(0.1), shards=2) as ps:
        jax.jit(lambda tree: jax.tree.map(lambda x: x * 2, tree), donate_argnums=0)(ps.pull())
        for call in (ps.pull, lambda: ps.push(grads_like(params_tree(), 0)).result(30), ps.params):
            with pytest.raises(RuntimeError, match=r"shard \d's parameters were deleted: an in-process pull lends .* donated them"):
                call()


def test_a_pulled_tree_its_reader_donated_is_pulled_again_in_full():
    """A client keeps the leaves of its last pull and is answered "unchanged" while it holds them; leaves its
    reader donated (deleted) are not held: the next pull of the same version brings them again."""
    params = {f"w{i}": np.full(100, i, np.float32) for i in range(10)}  # many small leaves: copied out of the buffer
    with jaxps.ParameterServer(params, optax.sgd(0.1), transport="multiprocessing") as ps:
        pulled = ps.pull()
        jax.jit(lambda tree: jax.tree.map(lambda x: x * 2, tree), donate_argnums=0)(pulled)
        assert all(x.is_deleted() for x in jax.tree.leaves(pulled))
        assert_trees_equal(ps.pull(), params)


def test_whole_tree_transforms_are_refused_by_name():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    with pytest.raises(jaxps.NotShardableError, match="clip_by_global_norm"):
        jaxps.ParameterServer(params_tree(), tx, shards=2)
    with jaxps.ParameterServer(params_tree(), tx, shards=1) as ps:  # one shard sees the whole tree: exact
        step, opt_state = optax_oracle(tx), tx.init(params_tree())
        ps.push(grads_like(params_tree(), 0))
        expected, _ = step(params_tree(), opt_state, grads_like(params_tree(), 0))
        assert_trees_equal(ps.pull(), expected, ulp=ULP)


def test_the_probe_takes_every_float_dtype_a_leaf_may_have():
    # float8 does not promote implicitly: the probe compares it in float32
    params = {"a": jnp.ones(4, jnp.float8_e4m3fn), "b": jnp.ones(3, jnp.bfloat16), "c": jnp.ones(2, jnp.complex64), "d": jnp.arange(3)}
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2) as ps:
        assert ps.plan.num_shards == 2
    with pytest.raises(jaxps.NotShardableError, match="clip_by_global_norm"):
        jaxps.ParameterServer(params, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), shards=2)


def test_unknown_whole_tree_transforms_are_caught_by_the_probe():
    def scale_by_global_max():  # a user's transform that reduces over all leaves
        def update(updates, state, params=None):
            top = jnp.max(jnp.stack([jnp.max(jnp.abs(u)) for u in jax.tree.leaves(updates)]))
            return jax.tree.map(lambda u: u / top, updates), state

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    with pytest.raises(jaxps.NotShardableError, match=r"built from .*scale_by_global_max.*the step differs at"):
        jaxps.ParameterServer(params_tree(), optax.chain(scale_by_global_max(), optax.sgd(0.1)), shards=2)


# -- round trips ---------------------------------------------------------------------------

leaf = st.tuples(
    st.lists(st.integers(0, 3), max_size=3), st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32])
).map(lambda s: jnp.arange(int(np.prod(s[0], dtype=int)), dtype=s[1]).reshape(s[0]))
trees = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
    ),
    max_leaves=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, shards=st.integers(1, 4))
def test_random_pytrees_round_trip(tree, shards):
    shards = min(shards, len(jax.tree.leaves(tree)))
    with jaxps.ParameterServer(tree, optax.identity(), shards=shards) as ps:
        assert_trees_equal(ps.pull(), tree)
        ps.push(jax.tree.map(jnp.zeros_like, tree)).result(timeout=30)
        assert_trees_equal(ps.pull(), tree)


# -- flax training loops ------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(16)(x)))


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    return x, jnp.asarray(x[:, :2] * 2.0 - x[:, 2:])


def test_linen_loop_matches_plain_optax():
    x, y = _data()
    model, tx = MLP(), optax.sgd(0.05, momentum=0.9)
    variables = model.init(jax.random.key(0), x)
    loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    grad_fn = jax.jit(jax.grad(loss))

    params, opt_state = variables["params"], tx.init(variables["params"])
    step = optax_oracle(tx)
    for _ in range(10):
        params, opt_state = step(params, opt_state, grad_fn(params, x, y))

    with jaxps.ParameterServer(variables["params"], tx, shards=2) as ps:
        for _ in range(10):
            ps.push(grad_fn(ps.pull(), x, y))
        assert_trees_equal(ps.params(), params)


def test_nnx_loop_matches_plain_optax():
    x, y = _data()

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 16, rngs=rngs), nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    def loss(state, graphdef, x, y):
        return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    tx = optax.sgd(0.05)

    plain, opt_state = state, tx.init(state)
    step = optax_oracle(tx)
    for _ in range(10):
        plain, opt_state = step(plain, opt_state, grad_fn(plain, graphdef, x, y))

    with jaxps.ParameterServer(state, tx, shards=3) as ps:
        for _ in range(10):
            ps.push(grad_fn(ps.pull(), graphdef, x, y))
        final = ps.params()
    assert isinstance(final, nnx.State)
    assert_trees_equal(final, plain)
    model = nnx.merge(graphdef, final)  # back into a module
    assert model(x).shape == (32, 2)
