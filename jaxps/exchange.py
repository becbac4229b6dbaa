"""Push-then-pull for the Flax drop-ins, and `jaxps.jit`, which runs it right after a compiled step.

A compiled step cannot wait for the server from inside: a host callback that
waits on other compiled work in the same process (an in-process shard's
update, the step's other workers) can leave the device no thread to run it.
So inside `jax.jit` the drop-ins only record what they push as outputs of the
step; the function returned by `jaxps.jit` (or `jaxps.nnx.jit`) exchanges it
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


def current(client: Client, server: Any) -> Client:
    """`client`, or the driver's new client for its worker if `server` (the drop-in's, on the driver) replaced it
    (e.g. `run_workers` ran that worker meanwhile)."""
    return server.client(client.worker) if client.replaced and server is not None else client


def is_traced(tree: Any) -> bool:
    """Whether `tree` holds tracers (it is inside `jax.jit` or another transformation)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@contextlib.contextmanager
def deferring():
    """Marks a compiled call of `jaxps.jit` in progress on this thread; collects the updates its trace records."""
    stack = _local.__dict__.setdefault("calls", [])
    stack.append(set())
    try:
        yield
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
        raise RuntimeError(
            f"{what} was called twice in one compiled step (or inside a loop such as lax.fori_loop or nnx.scan); "
            "jaxps pushes once per compiled step: call it once, outside loops"
        )
    calls[-1].add(key)


def _recorded() -> np.int32:
    """How many updates the trace in progress on this thread recorded (at trace time: a constant of the trace).
    A function of this module, not inlined in `deferred`'s closures: cloudpickle pickles it by reference, so a
    compiled step (and a worker function using one) can be sent to another process without `_local`."""
    calls = getattr(_local, "calls", None)
    return np.int32(len(calls[-1]) if calls else 0)


def deferred(jit: Callable, fun: Callable, finish: Callable[[Any, Any, int], Any], **jit_kwargs) -> Callable:
    """`jit(fun, **jit_kwargs)` with updates deferred in it, then `finish(args, out, made)` on the host.

    `made` is the number of updates the step's trace recorded, an output of
    the compiled step itself, so `finish` can check that every one of them
    comes out of the call, once, whatever trace (shapes, static arguments) ran.

    Donation (`donate_argnums`, `donate_argnames`) is not passed on: the
    params a step gets were pulled, in-process the server's own arrays, and
    its new params come from the server, so there is nothing to donate them to.
    """
    jit_kwargs = {k: v for k, v in jit_kwargs.items() if k not in ("donate_argnums", "donate_argnames")}

    @functools.wraps(fun)
    def counted(*args, **kwargs):
        return fun(*args, **kwargs), _recorded()

    compiled = jit(counted, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        with deferring():
            out, made = compiled(*args, **kwargs)
        return finish((args, kwargs), out, int(made))

    return call
