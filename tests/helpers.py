"""Small trees, gradients and oracles shared by the tests."""

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax


def params_tree():
    """Six leaves of assorted shapes under nested dicts and a list."""
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {
        "conv": {"kernel": f(3, 3, 1, 4), "bias": f(4)},
        "dense": {"kernel": f(8, 3), "bias": f(3)},
        "embed": [f(5, 2)],
        "scale": f(),
    }


def grads_like(params, seed, integer=False):
    """Deterministic gradients shaped like `params`; small integers when `integer`."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if integer:
        new = [jnp.asarray(rng.integers(-8, 9, np.shape(x)), x.dtype) for x in leaves]
    else:
        new = [jnp.asarray(rng.standard_normal(np.shape(x)), x.dtype) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def optax_oracle(tx):
    """A jitted plain optax step on the whole tree: (params, opt_state, grads) -> (params, opt_state)."""

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def mean(grads_list):
    """The mean of gradient trees, summed in list order (as the server does)."""
    return jax.tree.map(lambda *g: functools.reduce(lambda a, b: a + b, g) / len(g), *grads_list)


def assert_trees_equal(actual, expected, ulp=0):
    """Same structure, and every leaf the same shape, dtype and bits (or within `ulp` units in the last place).

    `ulp` is for optimizers with transcendental functions (Adam's bias
    correction `b ** count`): XLA's CPU compiler evaluates those inside each
    fusion, and which vector lane an element lands in depends on which leaves
    share the compiled program, so differently sharded programs may round a
    few elements an ulp apart per step (as jitted and un-jitted optax do).
    """
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    assert a_def == e_def, f"tree structure differs:\n{a_def}\n{e_def}"
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        name = jax.tree_util.keystr(path)
        assert np.shape(a) == np.shape(e), f"{name}: shape {np.shape(a)} != {np.shape(e)}"
        assert jnp.result_type(a) == jnp.result_type(e), f"{name}: dtype {jnp.result_type(a)} != {jnp.result_type(e)}"
        if ulp:
            a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            spacing = np.spacing(np.maximum(np.abs(np.asarray(a)), np.abs(np.asarray(e))).astype(np.asarray(a).dtype))
            off = np.abs(a64 - e64) / np.asarray(spacing, np.float64)
            assert np.all(off <= ulp), f"{name}: {np.max(off)} ulp apart (allowed {ulp})"
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=name)


# optimizers whose step calls a transcendental function (see assert_trees_equal),
# and how many ulp apart their sharded and unsharded steps may be after a few steps
TRANSCENDENTAL = {"adam", "masked_adamw", "multi_transform"}
ULP = 8


def optimizers():
    """The optimizers the sharded == unsharded oracle covers, path-aware ones included."""
    not_bias = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "bias" not in jax.tree_util.keystr(path), p)
    labels = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: "embed" if "embed" in jax.tree_util.keystr(path) else "rest", p
    )
    return {
        "sgd": optax.sgd(0.1),
        "momentum": optax.sgd(0.1, momentum=0.9),
        "adam": optax.adam(1e-2),
        "masked_adamw": optax.adamw(1e-2, weight_decay=0.1, mask=not_bias),
        "multi_transform": optax.multi_transform({"embed": optax.sgd(0.5), "rest": optax.adam(1e-2)}, labels),
    }


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def import_example(name: str):
    """`examples/<name>.py` as a module whose functions travel to worker processes by value.

    Run as a script, an example's functions live in `__main__` and travel by
    value; imported, they would travel by reference to a module the workers
    cannot import.
    """
    spec = importlib.util.spec_from_file_location(f"jaxps_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module


def wait_for(predicate, seconds=20.0) -> bool:
    """Whether `predicate()` comes true within `seconds` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie, not yet reaped by its parent, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def ray_cluster(*nodes: dict):
    """A `ray.cluster_utils.Cluster` on this machine, for a script of its own: a head of 2 CPUs and a node per
    entry of `nodes` (`add_node`'s keyword arguments); this process joined to it, the tests' folder on its
    workers' path. Yields `(cluster, [node, ...])`; all of it is shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        added = [cluster.add_node(**options) for options in nodes]
        cluster.wait_for_nodes()
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_script(name: str, timeout: float = 600) -> str:
    """Runs tests/`name` in a Python process of its own; its stdout, once it has exited with status 0."""
    out = subprocess.run([sys.executable, str(Path(__file__).parent / name)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout
