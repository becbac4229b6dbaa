"""Many small arrays laid out in one buffer, onto the device in one transfer and one compiled call.

`jax.device_put` costs tens of microseconds of Python per array, whatever its
size: a 100-leaf tree pays it 100 times per pull and per push. For trees of
many small leaves (`worth_packing`), an endpoint buffer goes to the device
whole, as one uint8 array, and one jitted function (compiled once per layout)
cuts it into the leaves: copies, so the buffer is free again at once. Trees
of large leaves keep the zero-copy path (each leaf adopted where it lies),
where the copy would cost more than the per-array overhead saves.

When such a tree's leaves also share one dtype (`flat_dtype`), they lie back
to back in the buffers (`layout`: no alignment gaps), so a push is staged and
a pull delivered by one `np.concatenate` into the buffer, and a push is
checked for NaN/Inf by one pass over it. (Packing a push in one jitted call
instead measured no faster than copying leaf by leaf: a call with 100 inputs
costs about as much to dispatch.)
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxps.transports import shm

MIN_ARRAYS = 8  # fewer arrays than this: the per-array cost is small anyway
MAX_MEAN_BYTES = 256 * 1024  # larger arrays on average: copying them costs more than it saves


def _packable(dtype: np.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def worth_packing(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> bool:
    """Whether arrays `(shape, dtype)` go to the device faster packed than one by one."""
    nonempty = [int(np.prod(s, dtype=np.int64)) > 0 for s, _ in specs]
    if sum(nonempty) < MIN_ARRAYS or not all(_packable(np.dtype(d)) for _, d in specs):  # (each output a fresh buffer)
        return False
    total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in specs)
    return total <= MAX_MEAN_BYTES * len(specs)


def flat_dtype(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> np.dtype | None:
    """The dtype of a tree worth packing whose leaves all have that one dtype (else None)."""
    dtypes = {np.dtype(d) for _, d in specs}
    return dtypes.pop() if len(dtypes) == 1 and worth_packing(specs) else None


def layout(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> tuple[list[int], int]:
    """Byte offsets of the arrays in an endpoint buffer, and its size: back to back for a `flat_dtype` tree,
    else aligned (`shm.layout`). The shard and its clients lay their buffers out alike."""
    if flat_dtype(specs) is None:
        return shm.layout(specs)
    sizes = [int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in specs]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    return offsets, max(sum(sizes), 1)


def flat_view(buf, dtype: np.dtype, specs) -> np.ndarray:
    """The first elements of `buf` as one 1-d array of `dtype`: every leaf of a `flat_dtype` tree, back to back."""
    return np.frombuffer(buf, dtype, count=sum(math.prod(s) for s, _ in specs))  # (math.prod: per push and pull, ~20x np.prod's speed)


class Unpacker:
    """Copies arrays `specs` laid out at `offsets` in a buffer onto the default device: one transfer, one call."""

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], np.dtype]], offsets: Sequence[int]):
        layout = tuple((int(o), tuple(int(d) for d in s), np.dtype(d).name) for (s, d), o in zip(specs, offsets))
        self._end = max((o + int(np.prod(s, dtype=np.int64)) * jnp.dtype(d).itemsize for o, s, d in layout), default=0)
        self._unpack = _unpacker(layout)

    def __call__(self, buf) -> list[jax.Array]:
        """The arrays in `buf`, copied; `buf` may be written again once this returns."""
        out = self._unpack(jax.device_put(np.frombuffer(buf, np.uint8, count=self._end)))
        jax.block_until_ready(out)  # read out of `buf` before anyone writes it again
        return out


@functools.lru_cache(maxsize=64)
def _unpacker(layout: tuple):
    """A jitted `flat uint8 array -> [arrays]` for `layout`: ((offset, shape, dtype name), ...)."""

    def unpack(flat):
        out = []
        for offset, shape, name in layout:
            dtype = jnp.dtype(name)
            n = int(np.prod(shape, dtype=np.int64))
            if n == 0:
                out.append(jnp.zeros(shape, dtype))
                continue
            raw = flat[offset : offset + n * dtype.itemsize]
            if dtype.itemsize > 1:
                raw = raw.reshape(n, dtype.itemsize)
            out.append(jax.lax.bitcast_convert_type(raw, dtype).reshape(shape))
        return out

    return jax.jit(unpack)

