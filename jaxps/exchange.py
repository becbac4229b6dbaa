"""Push-then-pull for the Flax drop-ins, and `jaxps.jit`, which runs it right after a compiled step.

A compiled step cannot wait for the server from inside: a host callback that
waits on other compiled work in the same process (an in-process shard's
update, the step's other workers) can leave the device no thread to run it.
So inside `jax.jit` the drop-ins only record what they push as outputs of the
step; the wrapper returned by `jaxps.jit` (or `jaxps.nnx.jit`) exchanges it
with the server as soon as the compiled call returns: the same push and pull
per step, with real arrays.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import jax
import numpy as np

from jaxps.client import Client

_local = threading.local()  # per thread: the compiled calls in progress (worker threads run their own)


def exchange(client: Client, tree: Any) -> Any:
    """Pushes `tree` (gradients, and values at value leaves), waits for it, and returns the pull that follows.

    The pull sees this push (in sync mode, the step's other workers' too).
    Raises `jaxps.PushError` naming the paths if `tree` does not fit the server's tree.
    """
    client.push(jax.tree.map(np.asarray, tree)).result()
    return client.pull()


def is_traced(tree: Any) -> bool:
    """Whether `tree` holds tracers (it is inside `jax.jit` or another transformation)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@contextlib.contextmanager
def deferring():
    """Marks a compiled call of `jaxps.jit` in progress on this thread; yields the set of updates recorded in it."""
    stack = _local.__dict__.setdefault("calls", [])
    stack.append(set())
    try:
        yield stack[-1]
    finally:
        stack.pop()


def record(key: Any, what: str) -> None:
    """Records, at trace time, one deferred update by `key` (an optimizer); raises unless it can be run after the call.

    It can if the step is compiled by `jaxps.jit` / `jaxps.nnx.jit` and this
    is `key`'s first update in the step.
    """
    calls = getattr(_local, "calls", None)
    if not calls:
        raise RuntimeError(
            f"{what} was called inside jax.jit / nnx.jit (or another JAX transformation), where it cannot reach the "
            "parameter server. Compile the step with jaxps.jit (linen, instead of jax.jit) or jaxps.nnx.jit (instead "
            "of nnx.jit): the push and pull then run right after the compiled step returns."
        )
    if key in calls[-1]:
        raise RuntimeError(f"{what} was called twice in one compiled step; jaxps pushes once per step: call it once")
    calls[-1].add(key)


def wrap(compiled: Callable, finish: Callable[[Any, Any], Any]) -> Callable:
    """`compiled` with updates deferred in it, then `finish(args, out)` on the host, returning the call's result."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with deferring():
            out = compiled(*args, **kwargs)
        return finish((args, kwargs), out)

    return call
