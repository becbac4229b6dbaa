"""Value leaves: parameters that workers set instead of differentiating (BatchNorm statistics).

A worker pushes the full tree: gradients at gradient leaves, its current values
at value leaves. `values(tx, is_value, merge)` wraps an optax transformation so
that `tx` steps the gradient leaves only (its state has no slots for value
leaves) and each value leaf becomes the merged pushed value, exactly:

- "mean": the value pushed for the step. In sync mode the shard has already
  averaged a step's pushes, so this is the mean over the step's workers; in
  async mode every push is its own step, so it is that push's value.
- "latest": the same arithmetic as "mean", named for async use: the value of
  the last push applied.
- "running": an exponential running mean over pushes, `v <- v + (x - v) / window`
  (async: with `window` = the number of workers it tracks the mean of the
  workers' current values). With `window=1` it is exactly "latest", so a single
  worker gets exactly what a plain single-process program computes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

MERGES = ("mean", "latest", "running")
IsValue = Callable[[str, Any], bool]


class ValueTransform(NamedTuple):
    """An optax transformation over gradient leaves, plus the merge of value leaves.

    `init`/`update` follow optax (`update` returns value leaves' updates as
    `new - old`, which floating point may round); `apply(params, opt_state,
    pushed) -> (params, opt_state)` is the exact step jaxps runs.
    """

    init: Callable
    update: Callable
    apply: Callable
    tx: optax.GradientTransformation
    is_value: IsValue
    merge: str
    window: int


def value_filter(spec: Any) -> IsValue:
    """`spec` -> `is_value(path, leaf)`.

    `spec` is a callable, or a tree path / list of them, each naming a leaf or a
    subtree by its `keystr` prefix (`"['batch_stats']"`, `"['bn']['mean']"`); a
    bare name (`"batch_stats"`) is a top-level key.
    """
    if callable(spec):
        return spec
    names = [spec] if isinstance(spec, str) else list(spec)
    prefixes = [n if n.startswith(("[", ".")) else f"[{n!r}]" for n in names]
    return lambda path, leaf: any(path == p or path.startswith((p + "[", p + ".")) for p in prefixes)


def values(tx: optax.GradientTransformation, is_value: Any, merge: str = "mean", window: int = 1) -> ValueTransform:
    """`tx` over the gradient leaves; value leaves (`is_value`, see `value_filter`) merged by `merge`."""
    if merge not in MERGES:
        raise ValueError(f"unknown merge={merge!r}; valid: {', '.join(MERGES)}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(tx, ValueTransform):
        raise ValueError("tx already has value leaves (jaxps.values was applied twice)")
    is_value = value_filter(is_value)
    rate = 1.0 if merge != "running" else 1.0 / window

    def flags(tree):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        return [bool(is_value(jax.tree_util.keystr(p), x)) for p, x in leaves], [x for _, x in leaves], treedef

    def gradient_part(tree):
        f, leaves, treedef = flags(tree)
        return jax.tree_util.tree_unflatten(treedef, [None if v else x for v, x in zip(f, leaves)])

    def init(params):
        return tx.init(gradient_part(params))

    def merged(old, new):
        new = new.astype(old.dtype)
        return new if rate == 1.0 else (old + rate * (new - old)).astype(old.dtype)

    def apply(params, opt_state, pushed):
        f, old, treedef = flags(params)
        grads = jax.tree_util.tree_leaves(pushed)
        grad_params = jax.tree_util.tree_unflatten(treedef, [None if v else x for v, x in zip(f, old)])
        grad_tree = jax.tree_util.tree_unflatten(treedef, [None if v else g for v, g in zip(f, grads)])
        updates, opt_state = tx.update(grad_tree, opt_state, grad_params)
        stepped = iter(jax.tree_util.tree_leaves(optax.apply_updates(grad_params, updates)))
        out = [merged(p, g) if v else next(stepped) for v, p, g in zip(f, old, grads)]
        return jax.tree_util.tree_unflatten(treedef, out), opt_state

    def update(pushed, opt_state, params=None):
        if params is None:
            raise ValueError("jaxps.values: update needs params (value leaves are replaced, not added to)")
        new, opt_state = apply(params, opt_state, pushed)
        return jax.tree.map(lambda n, p: n - p, new, params), opt_state

    return ValueTransform(init, update, apply, tx, is_value, merge, window)


def with_values(tx: Any, spec: Any, params: Any, mode: str, workers: int | None) -> Any:
    """The server's `tx` given `ParameterServer(values=spec)`: merged by mean in sync mode, running mean otherwise.

    Paths in `spec` that name no leaf of `params` are an error naming them.
    """
    if spec is None:
        return tx
    if isinstance(tx, ValueTransform):
        raise ValueError("give value leaves once: either ParameterServer(values=...) or tx=jaxps.values(...)")
    paths = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not callable(spec):
        for name in [spec] if isinstance(spec, str) else list(spec):
            if not any(value_filter(name)(p, x) for p, x in paths):
                raise ValueError(f"values: {name!r} names no leaf of the parameter tree (paths: {[p for p, _ in paths][:10]})")
    if mode == "sync":
        return values(tx, spec, "mean")
    return values(tx, spec, "running", window=workers or 1)


def value_paths(tx: Any, params: Any) -> list[str]:
    """The paths of `params` that `tx` treats as value leaves (none for a plain optax `tx`)."""
    if not isinstance(tx, ValueTransform):
        return []
    return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if tx.is_value(jax.tree_util.keystr(p), x)]
