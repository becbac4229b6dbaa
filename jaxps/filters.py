"""Push filters: what of a gradient crosses to the shard, in the style of optax.

A filter works leaf by leaf. On the worker, `encode(g, state) -> (payload,
state)` turns one gradient leaf into a tuple of arrays (the payload) and
carries per-leaf state from push to push (`init(like)` makes the first; `like`
has the leaf's `shape` and `dtype`). On the shard, `decode(payload, like)`
turns the payload back into a gradient of the leaf's shape and dtype, and the
optimizer applies exactly that. Both run under `jax.jit`: payload shapes are
fixed by the leaf's shape. A *ragged* filter (`significant`) also has
`lengths(payload)`, run on the host after `encode`: how many leading entries
of each payload array cross (None: all); the shard pads the rest with zeros
before `decode`.

    ps = jaxps.ParameterServer(params, tx, push_filter=jaxps.filters.chain(
        jaxps.filters.top_k(0.01), jaxps.filters.precision(jnp.bfloat16)))

Built in: `precision(dtype)`, `top_k(fraction)`, `significant(threshold)`;
`chain(f, g, ...)` applies `g` to each array of `f`'s payload; `from_spec("topk:0.01+bf16")`
reads one from a command line. The lossy
selections keep what they did not send (error feedback) and add it to the
next push, so over time every gradient arrives.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PushFilter(NamedTuple):
    """A push filter (see the module docstring); build your own with these fields.

    `elementwise`: `encode` maps each array to one array of the same shape
    (it may then follow or precede a ragged filter in a `chain`).
    """

    init: Callable[[Any], Any]
    encode: Callable[[jax.Array, Any], tuple[tuple, Any]]
    decode: Callable[[tuple, Any], jax.Array]
    lengths: Callable[[tuple], tuple] | None = None
    elementwise: bool = False


def precision(dtype: Any) -> PushFilter:
    """Floating-point gradients cross as `dtype` (e.g. `jnp.bfloat16`, `jnp.float16`) and are cast back on the shard.

    Exact in the sense that the shard applies `g.astype(dtype).astype(leaf dtype)`;
    integer arrays (and non-float leaves) cross unchanged.
    """
    try:
        wire = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"precision(dtype): {dtype!r} is not a dtype; use a floating dtype such as jnp.bfloat16") from None
    if not jnp.issubdtype(wire, jnp.floating):
        raise ValueError(f"precision(dtype) needs a floating dtype (bfloat16, float16, float32), got {wire.name}")

    def encode(g, state):
        return (g.astype(wire) if jnp.issubdtype(g.dtype, jnp.floating) else g,), state

    def decode(payload, like):
        return payload[0].astype(like.dtype)

    return PushFilter(lambda like: (), encode, decode, elementwise=True)


def top_k(fraction: float, error_feedback: bool = True) -> PushFilter:
    """Per leaf, only the largest-magnitude `fraction` of entries cross, as int32 indices and values.

    A leaf of n entries sends `ceil(fraction * n)` of them (at least one).
    With `error_feedback` the rest waits in the worker's filter state and
    is added to its next push.
    """
    _check_fraction(fraction)

    def count(size: int) -> int:
        return min(size, max(1, math.ceil(fraction * size)))

    def encode(g, residual):
        acc = g + residual if error_feedback else g
        flat = acc.ravel()
        _, idx = jax.lax.top_k(jnp.abs(flat), count(flat.size))
        idx = idx.astype(jnp.int32)
        kept = flat.at[idx].set(0).reshape(g.shape) if error_feedback else ()
        return (idx, flat[idx]), kept

    return PushFilter(_residual if error_feedback else _stateless, encode, _scatter)


def significant(threshold: float, error_feedback: bool = True) -> PushFilter:
    """Per leaf, only entries whose magnitude exceeds `threshold` cross, as int32 indices and values.

    How many cross varies from push to push (a ragged filter): the payload is
    sized for every entry, and only the significant ones leave the worker.
    With `error_feedback` the rest accumulates until it is significant.
    """
    if not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"significant(threshold) needs a finite threshold >= 0, got {threshold!r}")

    def encode(g, residual):
        acc = g + residual if error_feedback else g
        flat = acc.ravel()
        send = jnp.abs(flat) > threshold
        n = send.sum(dtype=jnp.int32)
        (idx,) = jnp.nonzero(send, size=flat.size, fill_value=0)
        idx = idx.astype(jnp.int32)
        values = jnp.where(jnp.arange(flat.size) < n, flat[idx], 0)
        kept = jnp.where(send, 0, flat).reshape(g.shape) if error_feedback else ()
        return (idx, values, n[None]), kept

    def lengths(payload):
        n = int(np.asarray(payload[2])[0])
        return (n, n, None)

    return PushFilter(_residual if error_feedback else _stateless, encode, _scatter, lengths)


def chain(*filters: PushFilter) -> PushFilter:
    """`filters` one after another: each later filter encodes every array of the earlier one's payload.

    The shard decodes in reverse. E.g. `chain(top_k(0.01), precision(jnp.bfloat16))`
    sends 1% of the entries with 16-bit values. A ragged filter may only be
    combined with elementwise ones (`precision`).
    """
    if not filters:
        raise ValueError("chain() needs at least one filter")
    for f in filters:
        if not isinstance(f, PushFilter):
            raise TypeError(f"chain() takes jaxps.filters.PushFilter values, got {type(f).__name__}")
    out = filters[0]
    for f in filters[1:]:
        out = _pair(out, f)
    return out


def from_spec(spec: str) -> PushFilter:
    """A filter from a command-line spec: `bf16`, `fp16`, `topk:FRACTION`, `sig:THRESHOLD`, or several joined by `+`.

    E.g. `from_spec("topk:0.01+bf16")` is `chain(top_k(0.01), precision(jnp.bfloat16))`.
    """
    made = []
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        if name in ("bf16", "fp16") and not arg:
            made.append(precision(jnp.bfloat16 if name == "bf16" else jnp.float16))
        elif name in ("topk", "sig") and arg:
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"{part!r}: {arg!r} is not a number") from None
            made.append(top_k(value) if name == "topk" else significant(value))
        else:
            raise ValueError(f"{part!r} is none of bf16, fp16, topk:FRACTION, sig:THRESHOLD")
    return chain(*made)


def _pair(first: PushFilter, then: PushFilter) -> PushFilter:
    if first.lengths is not None and then.lengths is not None or (
        (first.lengths is not None and not then.elementwise) or (then.lengths is not None and not first.elementwise)
    ):
        raise ValueError(
            "chain(): a ragged filter (significant) can only be chained with elementwise filters (precision), "
            "since how much of its payload crosses is decided after encoding"
        )

    def inner_likes(like):
        payload, _ = jax.eval_shape(first.encode, _spec(like), first.init(_spec(like)))
        return [_spec(a) for a in payload]

    def init(like):
        return first.init(like), tuple(then.init(a) for a in inner_likes(like))

    def encode(g, state):
        state_first, state_then = state
        payload, state_first = first.encode(g, state_first)
        out, states = [], []
        for a, s in zip(payload, state_then):
            p, s = then.encode(a, s)
            out += p
            states.append(s)
        return tuple(out), (state_first, tuple(states))

    def decode(payload, like):
        pieces, at = [], 0
        for a in inner_likes(like):
            arity = len(jax.eval_shape(then.encode, a, then.init(a))[0])
            pieces.append(then.decode(tuple(payload[at : at + arity]), a))
            at += arity
        return first.decode(tuple(pieces), like)

    if first.lengths is not None:
        lengths = first.lengths  # `then` is elementwise: the same arrays, in the same places
    elif then.lengths is not None:
        lengths = then.lengths  # `first` is elementwise: one array, which `then` encodes
    else:
        lengths = None
    return PushFilter(init, encode, decode, lengths, first.elementwise and then.elementwise)


def _check_fraction(fraction: Any) -> None:
    if not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"top_k(fraction) needs a fraction in (0, 1], got {fraction!r}")


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _residual(like) -> jax.Array:
    return jnp.zeros(like.shape, like.dtype)


def _stateless(like) -> tuple:
    return ()


def _scatter(payload, like) -> jax.Array:
    """Indices and values -> a dense leaf (zeros elsewhere); repeated index 0 with value 0 pads a ragged payload."""
    idx, values = payload[0], payload[1]
    size = math.prod(like.shape)
    return jnp.zeros(size, like.dtype).at[idx].add(values.astype(like.dtype)).reshape(like.shape)
