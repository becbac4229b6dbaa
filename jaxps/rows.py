"""Row leaves: pulling and pushing only the rows of a table that a batch touches.

Pure parts: checking and grouping row ids on the client, combining the row
pushes of a sync step, and the *lazy* optimizer step on the shard, which
changes only the rows pushed and their rows of optimizer state (as TF's
LazyAdam); leaf-wide state (Adam's count) advances per step as usual.

Row ids travel as `{position: ids}`, position being the leaf's place among
the shard's leaves and ids sorted, distinct and local to the shard's rows.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxps.plan import LeafSpec, Plan
from jaxps.update import apply_gradients

_SMALLEST_BUCKET = 16  # row counts are padded to a power of two from here: few compiled steps


def check_ids(plan: Plan, rows: Mapping[str, Any], error: type[Exception]) -> dict[int, np.ndarray]:
    """`{path: ids}` -> `{leaf index: int64 ids}`; raises `error` naming the path, the bad ids and the valid range."""
    if not isinstance(rows, Mapping):
        raise error(f"rows= takes {{path: ids}}, got {type(rows).__name__}")
    row_leaves = plan.row_leaves
    out = {}
    for path, ids in rows.items():
        key = path if str(path).startswith(("[", ".")) else f"[{path!r}]"
        if key not in row_leaves:
            raise error(f"rows= names {path!r}, which is not a row leaf; the row leaves are {list(row_leaves) or 'none'} (rows= of ParameterServer)")
        i = row_leaves[key]
        spec = plan.leaves[i]
        a = np.asarray(ids)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise error(f"{key} ({spec.describe()}): row ids must be a 1-D array of integers, got {a.dtype.name}{list(a.shape)}")
        bad = a[(a < 0) | (a >= spec.shape[0])] if a.size else a  # (in their own dtype: uint64 beyond 2**63 wraps in int64)
        a = a.astype(np.int64)
        if bad.size:
            raise error(f"{key} ({spec.describe()}): row ids {bad[:10].tolist()} out of range; valid ids are 0 to {spec.shape[0] - 1}")
        out[i] = a
    return out


def check_values(spec: LeafSpec, ids: np.ndarray, x: Any, error: type[Exception]) -> None:
    """A row push's gradient for `spec` must be one row per id."""
    want = (len(ids), *spec.shape[1:])
    shape = tuple(np.shape(x))
    if shape != want:
        raise error(
            f"push rejected, nothing was changed: {spec.path} ({spec.describe()}): a row push of {len(ids)} ids needs a "
            f"gradient of shape {list(want)}, got {np.dtype(getattr(x, 'dtype', np.float32)).name}{list(shape)}"
        )


def sum_by_row(ids: np.ndarray, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted ids, and the rows of `values` added up per id (as `jax.grad` of a gather adds them)."""
    distinct, inverse = np.unique(ids, return_inverse=True)
    values = np.asarray(values)
    if len(distinct) == len(ids):
        return distinct, values[np.argsort(ids, kind="stable")]
    summed = np.zeros((len(distinct), *values.shape[1:]), values.dtype)
    np.add.at(summed, inverse, values)
    return distinct, summed


def by_shard(plan: Plan, i: int, distinct: np.ndarray) -> list[tuple[int, np.ndarray, slice]]:
    """`(shard, local ids, where in distinct)` for each shard holding some of `distinct` (sorted) rows of leaf `i`."""
    out = []
    for s in range(plan.num_shards):
        start, stop = plan.row_range(i, s)
        lo, hi = np.searchsorted(distinct, [start, stop])
        if hi > lo:
            out.append((s, (distinct[lo:hi] - start).astype(np.int32), slice(lo, hi)))
    return out


def bucket(n: int) -> int:
    """The padded row count for `n` rows."""
    return max(_SMALLEST_BUCKET, 1 << max(n - 1, 0).bit_length())


def pad_ids(ids: np.ndarray, rows: int, size: int) -> np.ndarray:
    """`ids` padded to `size` entries with `rows`: out of range, so a padding row is never written."""
    out = np.full(size, rows, np.int32)
    out[: len(ids)] = ids
    return out


def pad_values(values: Any, size: int) -> np.ndarray:
    """`values` padded with zero rows to `size` rows."""
    values = np.asarray(values)
    out = np.zeros((size, *values.shape[1:]), values.dtype)
    out[: len(values)] = values
    return out


def combine(contributions: Sequence[tuple[Any, Mapping[int, np.ndarray] | None]], positions: Sequence[int], rows: Sequence[int]):
    """One sync step's pushes -> `(summed leaves, {position: ids})`, dividing is left to the caller.

    `contributions`: `(leaves, row ids by position or None)` per worker, in
    worker order. A row leaf that every worker pushed as rows is summed over
    the union of their rows (a worker that did not touch a row adds zero);
    one pushed whole by anyone is summed whole. Sums run in worker order, so
    they equal the dense sum of the zero-filled gradients bit for bit.
    """
    count = len(contributions[0][0])
    out: list[Any] = [None] * count
    ids_out: dict[int, np.ndarray] = {}
    for k in range(count):
        as_rows = k in positions and all(r is not None and k in r for _, r in contributions)
        if as_rows:
            union = np.unique(np.concatenate([r[k] for _, r in contributions]))
            total = None
            for leaves, r in contributions:
                part = np.zeros((len(union), *np.shape(leaves[k])[1:]), np.asarray(leaves[k]).dtype)
                part[np.searchsorted(union, r[k])] = np.asarray(leaves[k])
                total = part if total is None else total + part
            out[k], ids_out[k] = total, union.astype(np.int32)
        else:
            total = None
            for leaves, r in contributions:
                x = np.asarray(leaves[k])
                if r is not None and k in r:  # rows of a leaf someone else pushed whole
                    dense = np.zeros((rows[k], *x.shape[1:]), x.dtype)
                    dense[r[k]] = x
                    x = dense
                total = x if total is None else total + x
            out[k] = total
    return out, ids_out


def lazy_step(tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """Jitted `(params, opt_state, grads, ids) -> (params, opt_state)`, donating and not (as `compile_step`).

    `ids` maps a leaf's position (in the flattened params view) to padded row
    ids; `grads` holds those leaves' rows. Only those rows of the leaf and of
    its optimizer state change; padding ids (out of range) change nothing.
    """
    step = functools.partial(_lazy_apply, tx)
    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(step, donate_argnums=(1,))


def _lazy_apply(tx, params, opt_state, grads, ids):
    leaves, treedef = jax.tree.flatten(params)
    where = jax.tree.unflatten(treedef, list(range(len(leaves))))

    def gather(x, k):
        return x.at[ids[k]].get(mode="fill", fill_value=0) if k in ids else x

    sub_params = jax.tree.map(gather, params, where)
    sub_state = optax.tree_map_params(tx, gather, opt_state, where)
    new_params, new_state = apply_gradients(tx, sub_params, sub_state, grads)

    def scatter(old, new, k):
        return old.at[ids[k]].set(new, mode="drop") if k in ids else new

    marks = optax.tree_map_params(tx, lambda _, k: k, opt_state, where, transform_non_params=lambda v: jax.tree.map(lambda _: -1, v))
    params = jax.tree.map(scatter, params, new_params, where)
    opt_state = jax.tree.map(scatter, opt_state, new_state, marks)
    return params, opt_state


def check_lazy(tx: optax.GradientTransformation, view: Any, positions: Sequence[int]) -> None:
    """Refuses an optimizer whose state the lazy step cannot map row by row (tried on shapes only)."""
    leaves = jax.tree.leaves(view)
    ids = {k: jax.ShapeDtypeStruct((_SMALLEST_BUCKET,), jnp.int32) for k in positions}
    grads = jax.tree.unflatten(
        jax.tree.structure(view),
        [jax.ShapeDtypeStruct((_SMALLEST_BUCKET, *x.shape[1:]) if k in ids else x.shape, x.dtype) for k, x in enumerate(leaves)],
    )
    why = None
    try:
        state = jax.eval_shape(tx.init, view)
        _, new_state = jax.eval_shape(functools.partial(_lazy_apply, tx), view, state, grads, ids)
        if jax.tree.structure(new_state) != jax.tree.structure(state) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state))
        ):
            why = "its state is not shaped like the parameters (factored, as adafactor's)"
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        raise ValueError(
            f"rows=: the optimizer's state cannot be updated row by row ({why}); row leaves need an "
            "elementwise optax transformation whose state optax.tree_map_params can map (sgd, momentum, adam, adagrad, ...)"
        )
