"""`jaxps.TrainState`: flax's linen `TrainState` whose optimizer runs on a parameter server.

    state = jaxps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"], mode="sync", workers=2)
    train_step = jaxps.jit(train_step)       # instead of jax.jit
    state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)   # in the step, unchanged

The server holds `{"params": ..., "batch_stats": ...}`: params stepped by
`tx`, batch_stats merged as value leaves (see `jaxps.values`), so
`state.server.params()` is a complete set of linen variables.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import struct
from flax.training import train_state

from jaxps.client import Client
from jaxps.exchange import current, deferred, exchange, is_traced, record
from jaxps.server import ParameterServer


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` (a subclass) with its optimizer state on a `ParameterServer`.

    `opt_state` is None here: it lives on the server (`server`, the driver's;
    a worker's state has only its `client`). `apply_gradients(grads=...,
    **replace)` pushes the gradients with the state's batch statistics, and
    returns the state with the pulled params and batch_stats and `step + 1`.
    Eagerly it does so at once (pass the new `batch_stats=` to it); inside a
    step compiled with `jaxps.jit` it returns the gradients `pending`, and
    `jaxps.jit` pushes them, with the batch_stats of the state the step
    returns, as the compiled call returns.
    """

    batch_stats: Any = None
    pending: Any = None  # inside jaxps.jit: what the step pushes, exchanged as it returns
    client: Client | None = struct.field(pytree_node=False, default=None)
    server: ParameterServer | None = struct.field(pytree_node=False, default=None)

    def apply_gradients(self, *, grads, **kwargs) -> "TrainState":
        state = self.replace(step=self.step + 1, **kwargs)
        if not is_traced(grads):
            return state.replace(pending=grads).exchanged()
        if self.pending is not None:
            raise RuntimeError("jaxps.TrainState.apply_gradients was called twice in one compiled step; call it once")
        record(self.client, "jaxps.TrainState.apply_gradients")
        return state.replace(pending=grads)

    def exchanged(self) -> "TrainState":
        """Pushes the `pending` gradients with the state's batch_stats; the state with the pulled params and batch_stats.

        The batch_stats pushed are this state's: inside `jaxps.jit`, those of
        the state the step returns, so `apply_gradients(grads=g)` followed by
        `.replace(batch_stats=...)` (flax's BatchNorm guide) pushes the new ones.
        """
        if self.pending is None:
            return self
        client = current(self.client, self.server)
        pulled = exchange(client, _variables(self.pending, self.batch_stats))
        return self.replace(params=pulled["params"], batch_stats=pulled.get("batch_stats"), pending=None, client=client)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: Any, batch_stats: Any = None, **server_options) -> "TrainState":
        """Starts a `ParameterServer(**server_options)` for `params` (and `batch_stats`, as value leaves)."""
        values = None if batch_stats is None else ["batch_stats"]
        ps = ParameterServer(_variables(params, batch_stats), tx, values=values, **server_options)
        return cls(step=0, apply_fn=apply_fn, params=params, tx=tx, opt_state=None, batch_stats=batch_stats, client=ps.client(0), server=ps)

    @classmethod
    def from_client(cls, client: Client, apply_fn: Callable, step: int = 0) -> "TrainState":
        """A worker's state: the server's current params (and batch_stats), pushing through `client`."""
        pulled = client.pull()
        return cls(step=step, apply_fn=apply_fn, params=pulled["params"], tx=None, opt_state=None,
                   batch_stats=pulled.get("batch_stats"), client=client)  # fmt: skip


def _variables(params: Any, batch_stats: Any) -> dict:
    """The server's tree: `{"params": ...}`, with `"batch_stats"` when there are any."""
    return {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` for a step that calls `jaxps.TrainState.apply_gradients`.

    Every `TrainState` the compiled call returns with an update pending (at
    any depth of its result) is exchanged with the server before the call
    returns it, so the caller gets the pulled params, as with `jax.jit` and
    flax's TrainState. Works as `@jaxps.jit` and `@jaxps.jit(static_argnums=...)`.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    is_pending = lambda x: isinstance(x, TrainState) and x.pending is not None  # noqa: E731

    def finish(_, out, made):
        returned = len([x for x in jax.tree.leaves(out, is_leaf=is_pending) if is_pending(x)])
        if returned != made:
            raise RuntimeError(
                f"{getattr(fun, '__name__', 'the step')} made {made} update(s) and returned {returned} state(s) holding "
                "one: return each new jaxps.TrainState from the step, once (nothing was pushed)"
            )
        return jax.tree.map(lambda x: x.exchanged() if is_pending(x) else x, out, is_leaf=is_pending)

    return deferred(jax.jit, fun, finish, **jit_kwargs)
