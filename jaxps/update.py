"""The pure optimizer step of a shard, and the check that sharding is exact.

A shard's optimizer runs on its *view* of the parameter tree (the full tree
with `None` for leaves of other shards), so path-aware optax (`masked`,
`multi_transform`, weight-decay masks) sees every leaf under its own path.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import optax

from jaxps.plan import Plan, make_plan
from jaxps.value_leaves import ValueTransform

# optax transforms whose update reduces over the whole tree (or numbers its
# leaves), so that a shard, seeing only its leaves, would compute another step.
WHOLE_TREE_TRANSFORMS = (
    "clip_by_global_norm",
    "apply_if_finite",
    "skip_not_finite",
    "skip_large_updates",
    "add_noise",
    "normalize_by_update_norm",
    "scale_by_lbfgs",
    "scale_by_polyak",
    "scale_by_backtracking_linesearch",
    "scale_by_zoom_linesearch",
    "scale_by_distance_over_gradients",
    "scale_by_prodigy",
    "scale_by_mechanize",
    "sam",
)


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads):
    """One optax step: `tx.update` then `optax.apply_updates`.

    With value leaves (`jaxps.values`), `grads` holds their pushed values, and
    they are merged into the parameters exactly (see `jaxps.values`).
    """
    if isinstance(tx, ValueTransform):
        return tx.apply(params, opt_state, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def mean_gradients(grads: Sequence[Any], count: jax.Array):
    """Mean of gradient trees, summed in the given (worker) order.

    `count` (how many) is an argument, not a constant: XLA would divide by a
    constant as a multiplication by its rounded reciprocal (7/3 one ulp off),
    not as the division eager JAX (and so a user's optax loop) makes.
    """
    return jax.tree.map(lambda *g: functools.reduce(operator.add, g) / count.astype(g[0].dtype), *grads)


class Steps(NamedTuple):
    """One step compiled three ways. `donating(params, opt_state, *rest)` donates the parameters and the
    optimizer state; `lent(...)` only the state (the params are lent to a reader, an in-process pull, and
    must stay alive); `into(spare, params, opt_state, *rest)` as `lent`, writing the new parameters into
    `spare` (donated: an earlier version of them that nobody holds any more) instead of fresh memory.
    """

    donating: Callable
    lent: Callable
    into: Callable


def _compiled(step: Callable) -> Steps:
    """`step(params, opt_state, *rest, spare=None)` compiled three ways (`into` passes it the spare)."""
    into = lambda spare, *args: step(*args, spare=spare)  # noqa: E731  (listed first: donated buffers go to outputs in order)
    return Steps(
        jax.jit(step, donate_argnums=(0, 1)),
        jax.jit(step, donate_argnums=(1,)),
        jax.jit(into, donate_argnums=(0, 2), keep_unused=True),
    )


def compile_step(tx: optax.GradientTransformation) -> Steps:
    """Jitted `step(params, opt_state, grads) -> (params, opt_state)`, as `Steps`."""
    return _compiled(lambda params, opt_state, grads, spare=None: apply_gradients(tx, params, opt_state, grads))


def compile_guarded_step(tx: optax.GradientTransformation) -> Steps:
    """As `compile_step`, for a push checked on the device: `step(params, opt_state, grads, flags)` returns
    `(params, opt_state, ok)`, the step's result if every flag is set (every leaf finite), else its inputs."""

    def step(params, opt_state, grads, flags, spare=None):
        ok = jax.numpy.all(flags)
        apply = lambda p, s, g, sp: apply_gradients(tx, p, s, g)  # noqa: E731
        return (*jax.lax.cond(ok, apply, functools.partial(_keep, ok), params, opt_state, grads, spare), ok)

    return _compiled(step)


def _keep(ok: jax.Array, params, opt_state, grads, spare):
    """A guarded step's other branch (`ok` is False): its inputs. With a spare, the params come out of a select
    XLA cannot fold away, so it writes them into the spare's buffers; passed through, they would make XLA copy
    the params before the step and its result after it (25M-param Adam, held pulls: 8 -> 26 steps/s)."""
    if spare is None:
        return params, opt_state
    return jax.tree.map(lambda old, p: jax.numpy.where(ok, old, p), spare, params), opt_state


def transform_names(tx: Any) -> list[str]:
    """Names of the optax transform factories `tx` is built from (best effort)."""
    names: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, optax.GradientTransformation):
            visit(obj.update)
        elif callable(obj) and hasattr(obj, "__qualname__") and hasattr(obj, "__closure__"):
            qualname = obj.__qualname__
            if "<locals>" in qualname:  # e.g. "adam.<locals>.update_fn" -> "adam"
                names.append(qualname.rsplit(".<locals>", 1)[0].rsplit(".", 1)[-1])
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents)
                except ValueError:  # empty cell
                    pass
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item)

    visit(tx)
    return list(dict.fromkeys(names))


class NotShardableError(ValueError):
    """The optimizer's step differs when its leaves are split into shards."""


def check_shardable(tx: optax.GradientTransformation, plan: Plan, leaves: Sequence[Any]) -> None:
    """Refuses transforms whose sharded step differs from the unsharded one.

    Runs two steps of `tx` on the whole tree and on each shard's view with the
    same probe gradients (large enough to trip norm clipping) and compares, in
    one compiled program: the probes are made on the device and only a flag per
    leaf comes back (a start costs about four optimizer steps of the tree).
    """
    if plan.num_shards == 1:
        halved = [path for path, i in plan.row_leaves.items() if plan.leaves[i].shape[0] >= 2]
        if not halved:
            return
        # row leaves are updated row by row even on one shard: probe them as if split in two
        plan = make_plan(jax.tree.unflatten(plan.treedef, list(leaves)), 2, assign=lambda *_: 0, rows=halved)
    else:
        named = [n for n in transform_names(tx) if n in WHOLE_TREE_TRANSFORMS]
        if named:
            raise NotShardableError(_not_shardable_message(named, plan))
    agree = np.asarray(jax.jit(functools.partial(_sharded_agrees, tx, plan))(list(leaves)))
    differ = [plan.leaves[i].path for i in np.flatnonzero(~agree)]
    if differ:
        raise NotShardableError(_not_shardable_message(transform_names(tx), plan, differ))


def _sharded_agrees(tx, plan: Plan, leaves: list) -> jax.Array:
    """Per leaf: whether two steps of `tx` on each shard's view give the steps on the whole tree (traced): the
    parameters after them, and the first step's updates on their own scale (with a small learning rate, a
    differing step would look like a rounding of the parameters).

    The steps start from probe parameters, not from `leaves` (whose shapes and dtypes they take): from a table
    of zeros, a whole-leaf rule (lamb's trust ratio) would step alike either way and pass unseen. They grow
    along each leaf, so that a rule over a whole leaf sees its parts differ from it."""
    probes = [[_probe(x, i, k) for i, x in enumerate(leaves)] for k in range(2)]
    leaves = [_probe(x, i, 2) * _ramp(x) for i, x in enumerate(leaves)]
    whole = _run_steps(tx, plan.merge(plan.split(leaves)), [plan.merge(plan.split(p)) for p in probes])
    parts, probe_parts = plan.split(leaves), [plan.split(p) for p in probes]
    per_shard = [_run_steps(tx, plan.view(s, parts[s]), [plan.view(s, p[s]) for p in probe_parts]) for s in range(plan.num_shards)]
    leaves_of = jax.tree_util.tree_leaves
    agree = []
    for k, outcome in enumerate(whole):  # the params after the steps, then the first step's updates
        got = leaves_of(plan.merge([leaves_of(steps[k]) for steps in per_shard]))
        agree.append(jax.numpy.stack([_close(a, b, of_scale=k > 0) for a, b in zip(leaves_of(outcome), got)]))
    return jax.numpy.all(jax.numpy.stack(agree), axis=0)


def _ramp(x: jax.Array) -> jax.Array:
    """From 0.1 to 2 along `x`'s elements (in its dtype; ones for integer leaves)."""
    jnp = jax.numpy
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.ones(x.shape, x.dtype)
    return (0.1 + 1.9 * jax.lax.iota(jnp.float32, x.size) / max(x.size - 1, 1)).reshape(x.shape).astype(x.dtype)


def _probe(x: jax.Array, i: int, k: int) -> jax.Array:
    """Probe gradient `k` for leaf `i`: values spread over [-100, 100] (a multiplicative hash of the
    position), zeros for integer leaves; made where it is used, nothing moves from the host."""
    jnp = jax.numpy
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    h = (jax.lax.iota(jnp.uint32, x.size) + jnp.uint32((i * 7919 + k * 104729) % 2**32)) * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    return ((h.astype(jnp.float32) * 2.0**-32 - 0.5) * 200.0).reshape(x.shape).astype(x.dtype)


def _close(a: jax.Array, b: jax.Array, rtol: float = 1e-5, atol: float = 1e-6, of_scale: bool = False) -> jax.Array:
    """`np.allclose(a, b, rtol, atol, equal_nan=True)`, traced, in at least float32. `of_scale`: `atol` is
    `rtol` of `b`'s largest magnitude instead (updates, on their own scale). For dtypes narrower than float32,
    within a few of their own ulps, of the value and of the leaf's scale: XLA may keep a fused chain in float32
    in one program and round between steps in another (bfloat16's ulp is 2**-7, 0.8% of the value)."""
    jnp = jax.numpy
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.all(a == b)
    narrow = jnp.dtype(a.dtype).itemsize < 4
    if narrow:
        rtol = max(rtol, 4 * float(jnp.finfo(a.dtype).eps))
    wide = a.dtype if not narrow else jnp.float32  # float8 types do not promote implicitly
    a, b = a.astype(wide), b.astype(wide)
    if of_scale or narrow:
        atol = rtol * jnp.max(jnp.abs(b), initial=0.0)
    ok = (jnp.abs(a - b) <= atol + rtol * jnp.abs(b)) | (a == b) | (jnp.isnan(a) & jnp.isnan(b))
    return jnp.all(ok)


def _run_steps(tx, params, grads_seq) -> list:
    """`len(grads_seq)` optax steps from `tx.init` (traced): `[the params after them, the first step's updates]`
    (with value leaves, whose step is not `tx.update`'s, the params alone)."""
    opt_state = tx.init(params)
    updates_seq = []
    for grads in grads_seq:
        if isinstance(tx, ValueTransform):
            params, opt_state = tx.apply(params, opt_state, grads)
            continue
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        updates_seq.append(updates)
    return [params, *updates_seq[:1]]


def _not_shardable_message(names: list[str], plan: Plan, differ: list[str] | None = None) -> str:
    if differ and any(path in plan.row_leaves for path in differ):
        return (
            f"the optimizer (built from {', '.join(names)}) reduces over whole leaves, and row leaves (rows=) are split "
            f"by rows over the shards and updated row by row: the step differs at {differ[:5]}. Row leaves need an "
            "elementwise optimizer (sgd, momentum, adam, adagrad, rmsprop, ...), or leave those leaves out of rows=."
        )
    if differ:
        what = f"the optimizer (built from {', '.join(names)}) reduces over the whole parameter tree: the step differs at {differ[:5]}"
    else:
        what = f"the optimizer reduces over the whole parameter tree ({', '.join(names)})"
    return (
        f"{what}, so split into {plan.num_shards} shards it would not give the unsharded step. "
        "Use shards=1, or drop the whole-tree transform (e.g. clip per leaf with optax.clip, "
        "or clip on the worker before push)."
    )
