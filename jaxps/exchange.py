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
    """Marks a compiled call of `jaxps.jit` in progress on this thread; yields the updates recorded (when it is traced)."""
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


def wrap(compiled: Callable, finish: Callable[[Any, Any], tuple[Any, int]], *, check_returned: bool = False) -> Callable:
    """`compiled` with updates deferred in it, then `finish(args, out) -> (result, updates exchanged)` on the host.

    With `check_returned`, a call that returns fewer updates than its trace
    recorded (a step that drops the state holding one) is an error, not a
    silently lost push. Traces are told apart by the arguments' tree structure.
    """
    recorded: dict[Any, int] = {}  # updates each trace of the step records

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with deferring() as traced:
            out = compiled(*args, **kwargs)
        result, exchanged = finish((args, kwargs), out)
        if check_returned:
            key = jax.tree_util.tree_structure((args, kwargs))
            if traced:
                recorded[key] = len(traced)
            if exchanged < recorded.get(key, 0):
                raise RuntimeError(
                    f"{getattr(compiled, '__name__', 'the step')} made {recorded[key]} update(s) but returned "
                    f"{exchanged}: return the new jaxps.TrainState from the step (nothing was pushed)"
                )
        return result

    return call
