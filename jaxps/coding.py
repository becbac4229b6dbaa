"""A push filter applied to a plan's leaves: `Encoder` on the worker, `Decoder` on each shard.

Leaves marked unfiltered (value leaves, `jaxps.values`) cross as they are. A
shard's payload is the flat list of its leaves' payload arrays, in leaf order.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxps.filters import PushFilter
from jaxps.plan import LeafSpec, Plan
from jaxps.validate import PushError

_SMALLEST_BUCKET = 256  # a ragged array is padded to a power of two from here: few compiled decodes


def _like(spec: LeafSpec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype)


class Encoder:
    """A worker's filter and its state (per leaf); `encode` runs one compiled call for the whole tree."""

    def __init__(self, push_filter: PushFilter, plan: Plan, filtered: Sequence[bool]):
        self.filter, self.plan, self.filtered = push_filter, plan, tuple(filtered)
        self.state: list | None = None  # made at the first push
        self._encode = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encode": None}  # the compiled call is made again where it lands

    def encode(self, leaves: Sequence[Any]) -> tuple[list[list], list, list[int]]:
        """Per shard, the flat payload arrays of `leaves` (the gradients); the filter state after them; and the
        positions of the filtered leaves whose payload holds NaN or Inf (finite gradients can overflow a
        narrower dtype: float16 holds at most 65504).

        The state is not kept here: the client commits it once the push is sent.
        """
        f = self.filter
        if self.state is None:
            self.state = [f.init(_like(s)) if on else () for s, on in zip(self.plan.leaves, self.filtered)]
        if self._encode is None:

            def finite(payload) -> jax.Array:
                floats = [a for a in payload if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact)]
                return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(a).all() for a in floats])) if floats else jax.numpy.bool_(True)

            def encode_all(leaves, states):
                out = [f.encode(g, s) if on else ((g,), s) for g, s, on in zip(leaves, states, self.filtered)]
                flags = jax.numpy.stack([finite(p) if on else jax.numpy.bool_(True) for (p, _), on in zip(out, self.filtered)])
                return [p for p, _ in out], [s for _, s in out], flags

            self._encode = jax.jit(encode_all)
        payloads, state, flags = self._encode(list(leaves), self.state)
        spoiled = [int(i) for i in np.flatnonzero(~np.asarray(flags))]
        if f.lengths is not None:
            payloads = [_trim(p, f.lengths) if on else p for p, on in zip(payloads, self.filtered)]
        return [[a for i in ids for a in payloads[i]] for ids in self.plan.shard_leaves], state, spoiled


def _trim(payload: Sequence[Any], lengths) -> list:
    """The part of a ragged payload that crosses: host arrays cut to `lengths(payload)`."""
    host = [np.asarray(a) for a in payload]
    return [a if n is None else a[:n] for a, n in zip(host, lengths(host))]


class Decoder:
    """A shard's side of the filter: checks a payload against the filter's shapes and decodes it."""

    def __init__(self, push_filter: PushFilter, specs: Sequence[LeafSpec], filtered: Sequence[bool]):
        self.filter, self.specs, self.filtered = push_filter, tuple(specs), tuple(filtered)
        self.payload_specs = [payload_specs(push_filter, s) if on else (_like(s),) for s, on in zip(specs, filtered)]
        self._decode = jax.jit(push_filter.decode, static_argnums=1)  # one compiled decode per payload and leaf shape

    @property
    def layout(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        """The largest payload's arrays `(shape, dtype)`: what a push buffer must hold."""
        return [(tuple(a.shape), np.dtype(a.dtype)) for p in self.payload_specs for a in p]

    def decode(self, arrays: Sequence[Any]) -> list:
        """The gradient leaves a payload stands for; raises `PushError` naming the leaf if it does not fit."""
        arity = sum(len(p) for p in self.payload_specs)
        if len(arrays) != arity:
            raise PushError(f"push rejected, nothing was changed: a filtered payload of {len(arrays)} arrays, expected {arity}")
        out, at = [], 0
        ragged = self.filter.lengths is not None
        for spec, expected, on in zip(self.specs, self.payload_specs, self.filtered):
            pieces = [_fit(spec, e, arrays[at + j], ragged and on) for j, e in enumerate(expected)]
            at += len(expected)
            out.append(self._decode(tuple(pieces), _like(spec)) if on else pieces[0])
        return out


def _fit(spec: LeafSpec, expected: jax.ShapeDtypeStruct, x: Any, ragged: bool) -> Any:
    """`x` checked against the payload array it must be (cut short and padded back, if `ragged`)."""
    shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype)
    short = ragged and len(shape) == len(expected.shape) and shape[1:] == expected.shape[1:] and shape[:1] <= expected.shape[:1]
    if dtype != expected.dtype or (shape != expected.shape and not short):
        raise PushError(
            f"push rejected, nothing was changed: {spec.path} ({spec.describe()}): a filtered payload array is "
            f"{dtype.name}{list(shape)}, expected {np.dtype(expected.dtype).name}{list(expected.shape)}"
        )
    if shape == expected.shape or not shape:
        return x
    full = expected.shape[0]
    bucket = min(full, max(_SMALLEST_BUCKET, 1 << max(shape[0] - 1, 0).bit_length()))
    padded = np.zeros((bucket, *shape[1:]), dtype)
    padded[: shape[0]] = np.asarray(x)
    return padded


def payload_specs(push_filter: PushFilter, spec: LeafSpec) -> tuple:
    """The payload arrays' shapes and dtypes for leaf `spec`; checks that `decode` gives the leaf back."""
    like = _like(spec)
    try:
        payload, _ = jax.eval_shape(push_filter.encode, like, push_filter.init(like))
        decoded = jax.eval_shape(push_filter.decode, payload, like)
    except Exception as e:
        raise ValueError(f"push_filter cannot encode {spec.path} ({spec.describe()}): {type(e).__name__}: {e}") from e
    payload = tuple(payload)
    if (tuple(decoded.shape), np.dtype(decoded.dtype)) != (spec.shape, spec.dtype):
        raise ValueError(
            f"push_filter's decode gives {np.dtype(decoded.dtype).name}{list(decoded.shape)} for {spec.path}, "
            f"which is {spec.describe()}"
        )
    return payload


def check(push_filter: Any, plan: Plan, filtered: Sequence[bool]) -> None:
    """Refuses a filter that is not a `PushFilter` or cannot round-trip some leaf's shape and dtype."""
    if not isinstance(push_filter, PushFilter):
        raise TypeError(f"push_filter must be a jaxps.filters.PushFilter (e.g. jaxps.filters.precision(jnp.bfloat16)), got {push_filter!r}")
    for spec, on in zip(plan.leaves, filtered):
        if on:
            payload_specs(push_filter, spec)
