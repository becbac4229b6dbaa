"""Checkpoints of a running server: the cut (pure), save/restore over every transport, resharding, errors, crashes."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import jaxps
from jaxps import checkpoint as ck
from jaxps.consistency import SSP, Async, Clock, Contribution, Sync, cut_of


# -- the cut, pure ------------------------------------------------------------------
def c(worker, step=0, grads="g"):
    return Contribution(worker, step, grads, None)


def test_cut_of_takes_the_largest_mark():
    assert cut_of([3, 5, 4]) == 5
    assert cut_of([(2, 1), (1, 3, 1), ()]) == (2, 3, 1)


def test_async_hold_queues_beyond_the_cut_and_goes_to_it():
    policy = Async()
    clock = Clock.start(None)
    for w in (0, 1, 0):
        clock, _, _ = policy.push(clock, c(w))
    clock, mark = policy.hold(clock)
    assert mark == (2, 1)
    assert not policy.admits(clock, c(0)) and not policy.admits(clock, c(1)) and not policy.admits(clock, c(2))
    assert clock.hold == (2, 1) and policy.reached(clock)  # held where it is: a cut at its own mark is there already
    clock, steps = policy.cut(clock, (3, 1, 1))  # another shard saw one more push of workers 0 and 2
    assert steps == [] and not policy.reached(clock)
    assert policy.admits(clock, c(0)) and not policy.admits(clock, c(1)) and policy.admits(clock, c(2))
    clock, _, _ = policy.push(clock, c(0))
    assert not policy.admits(clock, c(0)) and not policy.reached(clock)
    clock, _, _ = policy.push(clock, c(2))
    assert policy.reached(clock) and clock.pushes == (3, 1, 1) and clock.applied == 5
    clock, steps = policy.release(clock)
    assert clock.hold is None and policy.admits(clock, c(1))


def test_a_push_based_on_a_version_the_shard_has_not_reached_counts_no_negative_staleness():
    """After a take-over a worker may push on a step its pull read from the dead primary that the standby is still
    getting (pulls are not held back for it): its staleness is 0, not negative."""
    policy, clock = Async(), Clock.start(None)
    clock, _, _ = policy.push(clock, Contribution(0, 0, "g", 0))
    clock, _, _ = policy.push(clock, Contribution(1, 0, "g", 3))  # read version 3; this shard is at 1
    clock, _, _ = policy.push(clock, Contribution(0, 1, "g", 0))  # two versions behind
    assert (clock.staleness_max, clock.staleness_sum, clock.staleness_count) == (2, 2, 3)


def test_sync_hold_closes_no_step_beyond_the_cut():
    policy = Sync()
    clock = Clock.start(2)
    clock, _, _ = policy.push(clock, c(0, 0))
    clock, mark = policy.hold(clock)
    assert mark == 0
    clock, steps, _ = policy.push(clock, c(1, 0))  # completes step 0, but the shard is held at version 0
    assert steps == [] and clock.version == 0 and policy.admits(clock, c(0, 1))
    clock, steps = policy.cut(clock, 1)  # another shard had closed step 0: go to 1, no further
    assert [s.version for s in steps] == [0] and policy.reached(clock)
    clock, steps, _ = policy.push(clock, c(0, 1))
    clock, steps, _ = policy.push(clock, c(1, 1))
    assert steps == [] and clock.version == 1  # step 1 waits for the release
    clock, steps = policy.release(clock)
    assert [s.version for s in steps] == [1] and clock.version == 2


def test_sync_lagging_shard_closes_steps_up_to_the_cut_on_leave():
    policy = Sync()
    clock = Clock.start(2)
    clock, _, _ = policy.push(clock, c(0, 0))
    clock, _ = policy.hold(clock)
    clock, steps = policy.cut(clock, 1)
    assert not policy.reached(clock)
    clock, steps = policy.leave(clock, 1)  # worker 1 left: step 0 closes with worker 0 alone
    assert [s.version for s in steps] == [0] and policy.reached(clock)


def test_after_a_rollback_ssp_counts_progress_as_a_restarted_shard_does():
    # worker 0 pushed 3 times, worker 1 30 times, and both joined a second run_workers there; then a shard died
    # and every shard rolled back: the live ones (`restarted`) and the restarted one (`start`) must agree
    policy, clock = SSP(max_staleness=1), Clock.start(2)
    for worker, n in ((0, 3), (1, 30)):
        for k in range(n):
            clock, _, _ = policy.push(clock, Contribution(worker, k, "g", 0))
    for worker in (0, 1):
        clock, _ = policy.leave(clock, worker)
        clock, _ = policy.join(clock, worker)
    live, restarted = clock.restarted(version=5, applied=5), Clock.start(2, version=5, applied=5)
    for clock in (live, restarted):
        clock, _, _ = policy.push(clock, Contribution(1, 0, "g", 5))
        assert policy.pull_ready(clock, 0) and policy.pull_ready(clock, 1)  # worker 1 one push ahead: within 1
        clock, _, _ = policy.push(clock, Contribution(1, 1, "g", 5))
        assert policy.pull_ready(clock, 0) and not policy.pull_ready(clock, 1)  # two ahead: it waits, worker 0 not
    assert live.joined_at == restarted.joined_at


def test_restored_clock_starts_at_the_step():
    clock = Clock.start(2, version=7, applied=6)
    assert clock.version == 7 and clock.applied == 6 and clock.pushes == (0, 0)


# -- over every transport -----------------------------------------------------------
def push_all(ps, params, ks):
    for k in ks:
        assert ps.push(helpers.grads_like(params, k)).result() == "applied"


@pytest.mark.slow
def test_resume_is_bit_identical_for_momentum(make_server, tmp_path):
    params, tx = helpers.params_tree(), optax.sgd(0.1, momentum=0.9)
    ps = make_server(params, tx, shards=2)
    push_all(ps, params, range(3))
    assert ps.save(tmp_path / "ck") == 3
    push_all(ps, params, range(3, 6))
    uninterrupted = ps.params()
    ps.close()
    restored = make_server.restore(tmp_path / "ck", params, tx, shards=2)
    assert restored.step == 3
    push_all(restored, params, range(3, 6))
    assert restored.step == 6
    helpers.assert_trees_equal(restored.params(), uninterrupted)


@pytest.mark.slow
def test_resume_in_sync_mode_is_bit_identical(make_server, tmp_path):
    params, tx = helpers.params_tree(), optax.sgd(0.1, momentum=0.9)

    def steps(ps, ks):
        clients = [ps.client(0), ps.client(1)]
        for k in ks:
            futures = [cl.push(helpers.grads_like(params, 2 * k + w)) for w, cl in enumerate(clients)]
            assert [f.result() for f in futures] == ["applied", "applied"]
            for cl in clients:
                cl.pull()

    ps = make_server(params, tx, shards=2, mode="sync", workers=2)
    steps(ps, range(2))
    assert ps.save(tmp_path / "ck") == 2
    steps(ps, range(2, 4))
    uninterrupted = ps.params()
    restored = make_server.restore(tmp_path / "ck", params, tx, shards=2, mode="sync", workers=2)
    assert restored.step == 2
    steps(restored, range(2, 4))
    helpers.assert_trees_equal(restored.params(), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(3, 1), (1, 2), (2, 5)])
def test_reshard_with_adam_equals_plain_optax(make_server, tmp_path, before, after):
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    ps = make_server(params, tx, shards=before)
    push_all(ps, params, range(3))
    ps.save(tmp_path / "ck")
    restored = make_server.restore(tmp_path / "ck", params, tx, shards=after)
    assert restored.step == 3
    push_all(restored, params, range(3, 5))
    step, expected, opt_state = helpers.optax_oracle(tx), params, tx.init(params)
    for k in range(5):
        expected, opt_state = step(expected, opt_state, helpers.grads_like(params, k))
    helpers.assert_trees_equal(restored.params(), expected, ulp=helpers.ULP)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_save_racing_with_pushes_from_two_threads_is_a_consistent_cut(make_server, tmp_path, mode):
    # sgd with lr -1 from zeros: every push adds its value to every leaf, so a cut holding
    # the same pushes on every shard has the same value in every leaf (integers: exact, any order)
    params = {"a": jnp.zeros((4,)), "b": {"c": jnp.zeros((3, 2)), "d": jnp.zeros(())}, "e": jnp.zeros((5,))}
    ps = make_server(params, optax.sgd(-1.0), shards=3, mode=mode, workers=2)
    rounds, errors = 30, []

    def work(w):
        client = ps.client(w)
        try:
            for k in range(rounds):
                client.pull()
                value = float(2 ** ((2 * k + w) % 16))
                client.push(jax.tree.map(lambda x: jnp.full(x.shape, value), params))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            client.leave()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    saved = []
    while any(t.is_alive() for t in threads) and len(saved) < 3:
        saved.append(ps.save(tmp_path / "ck", wait=False).result())
    for t in threads:
        t.join()
    assert not errors
    ps.save(tmp_path / "ck")  # the final state too
    total = sum(2 ** ((2 * k + w) % 16) for k in range(rounds) for w in range(2))
    final = jax.tree_util.tree_leaves(ps.params())
    assert all(np.all(np.asarray(x) == (total if mode == "async" else total / 2)) for x in final)
    for step in ck.steps(tmp_path / "ck"):
        _, state = ck.read(tmp_path / "ck", step)
        values = {float(v) for p, x in state.items() if p.startswith("params") for v in np.ravel(x)}
        assert len(values) == 1, f"step {step}: leaves hold different sums {sorted(values)}"


@pytest.mark.slow
def test_checkpointing_in_the_background_keeps_k(make_server, tmp_path):
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    ps = make_server(params, tx, shards=2, checkpoint=jaxps.Checkpointing(tmp_path / "ck", every=2, keep=2, poll=0.01))
    for k in range(12):
        ps.push(helpers.grads_like(params, k)).result()
        if k % 2:  # step k + 1, two past the last save: the next save is of this step
            wait_for_save(tmp_path / "ck", k + 1)
    ps.close()  # waits for a save in flight
    kept = ck.steps(tmp_path / "ck")
    assert kept == [10, 12], kept
    restored = make_server.restore(tmp_path / "ck", params, tx, shards=1)
    assert restored.step == kept[-1]


@pytest.mark.slow
def test_save_keep_and_repeated_save(make_server, tmp_path):
    params, tx = helpers.params_tree(), optax.sgd(0.1)
    ps = make_server(params, tx, shards=2)
    for k in range(4):
        push_all(ps, params, [k])
        assert ps.save(tmp_path / "ck", keep=2) == k + 1
    assert ps.save(tmp_path / "ck", keep=2) == 4  # nothing new: the same step, not written again
    assert ck.steps(tmp_path / "ck") == [3, 4]
    assert ps.save(tmp_path / "ck", keep=1) == 4 and ck.steps(tmp_path / "ck") == [4]  # its keep= holds all the same


def test_the_step_a_server_holds_unchanged_is_not_written_again(tmp_path, monkeypatch):
    """Writing a complete step again first removes it: a process killed then would leave no checkpoint of it (with
    keep=1, none at all). A server restored from a step, or that saved it, holds that state until its next step: a
    save, and a reshard through that directory, leave the step as it is. A step removed meanwhile is written."""
    params, tx, d = helpers.params_tree(), optax.sgd(0.1, momentum=0.9), tmp_path / "ck"
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        push_all(ps, params, range(3))
        ps.save(d, keep=1)
        push_all(ps, params, range(3, 5))
        uninterrupted = ps.params()
    prepare = ck.prepare
    with jaxps.ParameterServer.restore(d, params, tx, shards=2) as ps:
        monkeypatch.setattr(ck, "prepare", lambda *a, **k: pytest.fail("step 3 written again"))
        assert ps.save(d, keep=1) == 3
        ps.reshard(3, directory=d)
        assert ck.steps(d) == [3] and len(ps.stats()["shards"]) == 3
        push_all(ps, params, range(3, 5))
        helpers.assert_trees_equal(ps.params(), uninterrupted)
        monkeypatch.setattr(ck, "prepare", prepare)
        ps.save(d)
        monkeypatch.setattr(ck, "prepare", lambda *a, **k: pytest.fail("step 5 written again"))
        ps.reshard(2, directory=d)
        monkeypatch.setattr(ck, "prepare", prepare)
        os.replace(d, tmp_path / "moved")
        assert ps.save(d) == 5 and ck.steps(d) == [5]
    with jaxps.ParameterServer.restore(d, params, tx, shards=1) as ps:
        helpers.assert_trees_equal(ps.params(), uninterrupted)


def test_a_step_another_server_wrote_since_is_written_again(tmp_path):
    """Two servers restored from one directory: the second saves the first's step anew from another line. The
    first still holds its own state at that step, which its save (and a reshard through the directory) must
    write, not take the other's checkpoint for its own."""
    params, tx, d = helpers.params_tree(), optax.sgd(0.1, momentum=0.9), tmp_path / "ck"
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        push_all(ps, params, range(3))
        ps.save(d)
        push_all(ps, params, range(3, 5))
        ps.save(d)
        at_5 = ps.params()
    first = jaxps.ParameterServer.restore(d, params, tx, shards=2)
    try:
        with jaxps.ParameterServer.restore(d, params, tx, step=3, shards=2) as other:
            push_all(other, params, [7, 8])  # step 5 of another line
            assert other.save(d) == 5
        first.reshard(3, directory=d)
        helpers.assert_trees_equal(first.params(), at_5)
        with jaxps.ParameterServer.restore(d, params, tx, shards=2) as again:
            helpers.assert_trees_equal(again.params(), at_5)
    finally:
        first.close()


def test_a_bad_keep_is_refused_before_anything_is_written(tmp_path):
    with jaxps.ParameterServer(helpers.params_tree(), optax.sgd(0.1), shards=2) as ps:
        for keep in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=f"keep must be a positive int or None, got {keep!r}"):
                ps.save(tmp_path / "ck", keep=keep)
        assert not (tmp_path / "ck").exists()
    for bad in (dict(every=True), dict(every=2.0), dict(every=1, poll=0), dict(every=1, poll=-1.0), dict(every=1, keep=0)):
        with pytest.raises(ValueError, match=r"Checkpointing\((every|poll|keep)=\.\.\.\) must be a positive"):
            jaxps.Checkpointing(tmp_path / "ck", **bad)
    assert jaxps.Checkpointing(tmp_path / "ck", every=np.int64(5), keep=np.int64(2)).keep == 2


def test_saving_after_restoring_an_older_step_keeps_the_new_line_and_leaves_the_old_one(tmp_path):
    """Steps 10, 20, 30 of a first run; a second restores step 10 and saves step 15 with keep=2: step 15 stays (it
    used to be removed by its own retention, being older than 20 and 30), the later steps are left alone and
    named in a warning, and retention counts only the steps up to the one saved."""
    params, tx, d = helpers.params_tree(), optax.sgd(0.1), tmp_path / "ck"
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        for k in range(30):
            push_all(ps, params, [k])
            if (k + 1) % 10 == 0:
                ps.save(d)
    assert ck.steps(d) == [10, 20, 30]
    with jaxps.ParameterServer.restore(d, params, tx, shards=2, step=10) as ps:
        push_all(ps, params, range(100, 105))
        with pytest.warns(RuntimeWarning, match=r"step 15 saved in .*, which holds later steps \[20, 30\].* restores step 30, not 15"):
            assert ps.save(d, keep=2) == 15
        assert ck.steps(d) == [10, 15, 20, 30]
        saved = {15: ps.params()}
        push_all(ps, params, range(105, 110))
        assert ps.save(d, keep=2) == 20  # replaces the first run's step 20; retention: [15, 20] of the steps to 20
        saved[20] = ps.params()
        assert ck.steps(d) == [15, 20, 30]
    for step, want in saved.items():
        with jaxps.ParameterServer.restore(d, params, tx, shards=2, step=step) as restored:
            helpers.assert_trees_equal(restored.params(), want)


def test_each_save_holds_its_own_step_though_snapshots_reuse_their_arrays(tmp_path):
    """A shard copies each snapshot into the arrays of the last one it wrote: every checkpoint still holds its step."""
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    expected = []
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        for k in range(3):
            ps.push(helpers.grads_like(params, k)).result()
            assert ps.save(tmp_path / f"ck{k}") == k + 1
            expected.append(ps.params())
    for k in range(3):
        with jaxps.ParameterServer.restore(tmp_path / f"ck{k}", params, tx, shards=2) as restored:
            helpers.assert_trees_equal(restored.params(), expected[k])


def wait_for_save(directory, step, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not any(s >= step for s in ck.steps(directory)):
        assert time.monotonic() < deadline, f"no checkpoint at step >= {step} within {timeout} s"
        time.sleep(0.01)


# -- errors and crashes (transport-independent) ---------------------------------------
def test_in_process_restore_keeps_the_callers_jax_settings(tmp_path):
    """Parts are read on threads of their own, the shards built on the caller's: under `jax.enable_x64`,
    a float64 Adam server restores as float64 and goes on bit for bit as the one that saved."""
    params = {"a": np.arange(6, dtype=np.float64) / 7, "b": np.ones((2, 3), np.float64) / 3}
    grads = jax.tree.map(lambda x: np.full_like(x, 0.1), params)
    with jax.enable_x64(True):
        with jaxps.ParameterServer(params, optax.adam(1e-3), shards=2) as ps:
            ps.push(grads).result()
            ps.save(tmp_path)
            ps.push(grads).result()
            want = ps.pull()
        with jaxps.ParameterServer.restore(tmp_path, params, optax.adam(1e-3), shards=2) as restored:
            restored.push(grads).result()
            got = restored.pull()
    assert all(x.dtype == np.float64 for x in jax.tree.leaves(got))
    helpers.assert_trees_equal(got, want)


def test_restore_errors_name_the_paths(tmp_path):
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        ps.push(helpers.grads_like(params, 0)).result()
        ps.save(tmp_path / "ck")
    other = {**params, "embed": [jnp.zeros((6, 2))]}
    with pytest.raises(ck.CheckpointError, match=r"\['embed'\]\[0\]: checkpoint \(5, 2\) float32, template \(6, 2\) float32"):
        jaxps.ParameterServer.restore(tmp_path / "ck", other, tx)
    with pytest.raises(ck.CheckpointError, match=r"opt_state"):
        jaxps.ParameterServer.restore(tmp_path / "ck", params, optax.sgd(0.1, momentum=0.9))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxps.ParameterServer.restore(tmp_path / "nowhere", params, tx)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 7; complete steps: \[1\]"):
        jaxps.ParameterServer.restore(tmp_path / "ck", params, tx, step=7)
    with jaxps.ParameterServer(other, tx) as ps:  # another model's directory
        with pytest.raises(ck.CheckpointError, match=r"(?s)another model.*\[.embed.\]\[0\]: checkpoint \(5, 2\) float32, this model \(6, 2\) float32"):
            ps.save(tmp_path / "ck")
    with pytest.raises(ck.CheckpointError, match="another model"):
        jaxps.ParameterServer(other, tx, checkpoint=jaxps.Checkpointing(tmp_path / "ck", every=10))
    assert ck.steps(tmp_path / "ck") == [1]


@pytest.mark.slow
def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import helpers, optax, jaxps
        from jaxps import checkpoint as ck
        params = helpers.params_tree()
        ps = jaxps.ParameterServer(params, optax.adam(1e-2), shards=2)
        ps.push(helpers.grads_like(params, 0)).result()
        ps.save({str(tmp_path / 'ck')!r})
        ps.push(helpers.grads_like(params, 1)).result()
        write = ck.write_part
        def dying(directory, step, part, state):
            if part == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # part 0 written, part 1 not, no metadata
            write(directory, step, part, state)
        ck.write_part = dying
        ps.save({str(tmp_path / 'ck')!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ck.steps(tmp_path / "ck") == [1]
    assert (tmp_path / "ck" / "2").is_dir()  # the incomplete step, ignored
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    with jaxps.ParameterServer.restore(tmp_path / "ck", params, tx) as ps:
        assert ps.step == 1
        ps.push(helpers.grads_like(params, 1)).result()
        assert ps.save(tmp_path / "ck") == 2  # the stale step 2 is replaced
    assert ck.steps(tmp_path / "ck") == [1, 2]


def test_the_driver_reads_the_index_once_for_all_shards(tmp_path, monkeypatch):
    """A restore into N shards and a reshard to N read each part's index once (the driver's read, handed to the
    shards), not once per shard (N x N files: an object read each on gs://); the state is still bit for bit."""
    params, tx = helpers.params_tree(), optax.adam(1e-2)
    reads, read_index = [], ck.read_index
    monkeypatch.setattr(ck, "read_index", lambda *a, **k: reads.append(1) or read_index(*a, **k))
    with jaxps.ParameterServer(params, tx, shards=2) as ps:
        push_all(ps, params, range(3))
        ps.save(tmp_path / "ck")
        reads.clear()
        ps.reshard(4)
        assert len(reads) == 1
        push_all(ps, params, range(3, 4))
    reads.clear()
    with jaxps.ParameterServer.restore(tmp_path / "ck", params, tx, shards=4) as restored:
        assert len(reads) == 1 and restored.step == 3
        push_all(restored, params, range(3, 5))
        step, expected, opt_state = helpers.optax_oracle(tx), params, tx.init(params)
        for k in range(5):
            expected, opt_state = step(expected, opt_state, helpers.grads_like(params, k))
        helpers.assert_trees_equal(restored.params(), expected, ulp=helpers.ULP)
