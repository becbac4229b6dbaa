"""Checking a pushed gradient tree against the parameters, before anything changes."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxps.plan import LeafSpec, Plan

NONFINITE = ("raise", "skip", "allow")


class PushError(ValueError):
    """A pushed gradient tree does not fit the parameters; nothing was changed."""


def _leaf_dtype(x: Any) -> np.dtype:
    return np.dtype(jnp.result_type(x))


def check_structure(plan: Plan, grads: Any) -> list[Any]:
    """The leaves of `grads`, if its tree paths are those of the parameters."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    if treedef == plan.treedef:
        return leaves
    with_paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in with_paths]
    expected = [leaf.path for leaf in plan.leaves]
    if paths != expected:  # a dict for a FrozenDict, say, is fine: same paths
        missing = [p for p in expected if p not in set(paths)]
        extra = [p for p in paths if p not in set(expected)]
        raise PushError(
            "push rejected, nothing was changed: the gradient tree does not match the parameter tree; "
            f"missing paths: {missing[:10]}, unexpected paths: {extra[:10]} "
            f"(expected {plan.treedef}, got {treedef})"
        )
    return leaves


def _leaf_problem(spec: LeafSpec, x: Any) -> str | None:
    """What is wrong with gradient leaf `x` for parameter `spec`, if anything."""
    if isinstance(x, jax.Array) and x.is_deleted():
        return f"{spec.path}: the array was deleted (donated to a jitted call?); expected {spec.describe()}"
    if getattr(x, "dtype", None) == spec.dtype and getattr(x, "shape", None) == spec.shape:
        return None  # the common case, without jnp.result_type's cost
    try:
        dtype = _leaf_dtype(x)
    except TypeError:
        dtype = None
    if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
        got = getattr(x, "dtype", None) or type(x).__name__
        return f"{spec.path}: {got} is not numeric; expected {spec.describe()}"
    shape = tuple(np.shape(x))
    if shape != spec.shape:
        return f"{spec.path}: shape {list(shape)}, expected {list(spec.shape)} ({dtype.name} -> {spec.dtype.name})"
    if not jnp.can_cast(dtype, spec.dtype, casting="same_kind"):
        return f"{spec.path}: dtype {dtype.name} cannot be cast to the parameter's {spec.dtype.name} (shape {list(shape)})"
    return None


def check_leaves(specs: Sequence[LeafSpec], leaves: Sequence[Any]) -> None:
    """Raises `PushError` naming every leaf that is not numeric, or whose shape or dtype does not fit."""
    problems = [p for p in (_leaf_problem(spec, x) for spec, x in zip(specs, leaves)) if p is not None]
    if problems:
        raise PushError("push rejected, nothing was changed: " + "; ".join(problems))


def finite_flags(leaves: Sequence[jax.Array]) -> jax.Array:
    """Per leaf, whether it is free of NaN and Inf: computed on the device(s), nothing waits for it.

    One compiled call per device the leaves are on; the flags end up on the
    first leaf's device.
    """
    places = [x.sharding for x in leaves]
    if all(p == places[0] for p in places):
        return _finite_flags(leaves)
    groups: dict[Any, list[int]] = {}
    for k, place in enumerate(places):
        groups.setdefault(place, []).append(k)
    flags = [jax.device_put(_finite_flags([leaves[k] for k in ks]), places[0]) for ks in groups.values()]
    order = np.argsort(np.concatenate([ks for ks in groups.values()]))
    return jnp.concatenate(flags)[order]


@jax.jit
def _finite_flags(leaves: Sequence[jax.Array]) -> jax.Array:
    """`finite_flags` of leaves on one device. The sums decide at once when all are finite (a vectorized sum is
    ~3x faster than XLA's `all(isfinite(x))` on CPU); if one overflows (or is not finite), every leaf is checked
    element by element. One branch for all leaves, not one per leaf: 100 leaves of 40 KB, 0.42 -> 0.36 ms.
    """
    sums = jnp.stack([jnp.sum(x, dtype=jnp.promote_types(x.dtype, jnp.float32)) for x in leaves])
    each = lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])  # noqa: E731
    return jax.lax.cond(jnp.all(jnp.isfinite(sums)), lambda xs: jnp.ones(len(xs), bool), each, leaves)


def _host_finite(x: np.ndarray) -> bool:
    """One pass, no temporary: NaN and Inf make the sum non-finite (an overflowing sum is re-checked).

    A contiguous float32 array is summed as its dot product with itself: BLAS's
    `sdot` costs ~40% of numpy's pairwise float32 sum, and a sum of squares
    cannot cancel an Inf (it overflows sooner: those arrays are re-checked too).
    """
    if x.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if x.dtype == np.float32 and x.flags.c_contiguous:
                flat = x.reshape(-1)
                total = np.dot(flat, flat)
            else:
                total = x.sum()
            if np.isfinite(total):
                return True
    return bool(np.isfinite(x).all())


def nonfinite_paths(specs: Sequence[LeafSpec], leaves: Sequence[Any]) -> list[str]:
    """Paths of floating-point leaves holding NaN or Inf (one device sync when all are finite)."""
    floats = [(s, x) for s, x in zip(specs, leaves) if jnp.issubdtype(s.dtype, jnp.inexact)]
    on_device = [x for _, x in floats if isinstance(x, jax.Array)]
    on_host = [np.asarray(x) for _, x in floats if not isinstance(x, jax.Array)]
    if (not on_device or bool(np.all(finite_flags(on_device)))) and all(_host_finite(x) for x in on_host):
        return []
    return [s.path for s, x in floats if not bool(np.isfinite(np.asarray(x)).all())]  # no cast: keeps complex parts, float64 range


CHUNK_BYTES = 1 << 20  # copied and then checked while still in cache


def host_finite(x: np.ndarray) -> bool:
    """Whether host array `x` is free of NaN and Inf (always, for integers)."""
    return not jnp.issubdtype(x.dtype, jnp.inexact) or _host_finite(x)


def copy_checked(dst: np.ndarray, src: np.ndarray) -> bool:
    """`np.copyto(dst, src)`, and whether the copied values are free of NaN and Inf.

    Chunk by chunk, so the check reads what the copy just wrote from the
    cache, not memory: about 30% less than a copy and a separate check.
    """
    if not jnp.issubdtype(dst.dtype, jnp.inexact):  # numpy does not count bfloat16 as inexact
        np.copyto(dst, src)
        return True
    d, s = dst.reshape(-1), np.asarray(src).reshape(-1)
    step = max(1, CHUNK_BYTES // d.itemsize)
    finite = True
    for i in range(0, d.size, step):
        chunk = d[i : i + step]
        np.copyto(chunk, s[i : i + step])
        finite = finite and _host_finite(chunk)
    return finite


def cast(specs: Sequence[LeafSpec], leaves: Sequence[Any]) -> list[Any]:
    """Leaves in their parameter dtype: jax arrays stay on their device, the rest become numpy.

    Every leaf is converted here, so a push fails (if it does) before any shard sees it.
    """
    out = []
    for spec, x in zip(specs, leaves):
        try:
            if isinstance(x, jax.Array):
                out.append(x if x.dtype == spec.dtype else x.astype(spec.dtype))
            else:
                out.append(np.asarray(x, dtype=spec.dtype))
        except Exception as e:
            raise PushError(f"push rejected, nothing was changed: {spec.path} cannot be converted to {spec.describe()}: {e}") from e
    return out


def reject_nonfinite(plan: Plan, bad: Sequence[str], nonfinite: str) -> bool:
    """Whether a push with NaN/Inf at paths `bad` is skipped; raises `PushError` if it must be refused."""
    if bad and nonfinite == "raise":
        raise nonfinite_error(plan, bad)
    return bool(bad)


def nonfinite_error(plan: Plan, bad: Sequence[str]) -> PushError:
    """The error refusing a push with NaN/Inf at paths `bad`."""
    bad = set(bad)
    shown = [f"{s.path} ({s.describe()})" for s in plan.leaves if s.path in bad]
    return PushError(
        f"push rejected, nothing was changed: NaN or Inf in {shown[:10]}; "
        "pass nonfinite='skip' to ParameterServer to skip such pushes instead"
    )


def float_positions(specs: Sequence[LeafSpec]) -> list[int]:
    """Positions of the leaves that can hold NaN or Inf."""
    return [i for i, s in enumerate(specs) if jnp.issubdtype(s.dtype, jnp.inexact)]


def check_gradients(plan: Plan, grads: Any) -> list[Any]:
    """Flat gradient leaves cast to the parameter dtypes (NaN and Inf are checked apart).

    Raises `PushError` naming the tree paths, shapes and dtypes at fault.
    """
    leaves = check_structure(plan, grads)
    check_leaves(plan.leaves, leaves)
    return cast(plan.leaves, leaves)
