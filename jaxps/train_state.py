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

from typing import Any, Callable

import jax
from flax import struct
from flax.training import train_state

from jaxps.client import Client
from jaxps.exchange import exchange, is_traced, record, wrap
from jaxps.server import ParameterServer


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` (a subclass) with its optimizer state on a `ParameterServer`.

    `opt_state` is None here: it lives on the server (`server`, the driver's;
    a worker's state has only its `client`). `apply_gradients(grads=...,
    batch_stats=..., **replace)` pushes the gradients and the current batch
    statistics, and returns the state with the pulled params and batch_stats
    and `step + 1`. Eagerly it does so at once; inside a step compiled with
    `jaxps.jit` it returns them `pending`, and `jaxps.jit` exchanges them with
    the server as the compiled call returns.
    """

    batch_stats: Any = None
    pending: Any = None  # inside jaxps.jit: what the step pushes, exchanged as it returns
    client: Client | None = struct.field(pytree_node=False, default=None)
    server: ParameterServer | None = struct.field(pytree_node=False, default=None)

    def apply_gradients(self, *, grads, **kwargs) -> "TrainState":
        batch_stats = kwargs.pop("batch_stats", self.batch_stats)
        tree = {"params": grads} if batch_stats is None else {"params": grads, "batch_stats": batch_stats}
        state = self.replace(step=self.step + 1, batch_stats=batch_stats, **kwargs)
        if not is_traced(tree):
            return state.replace(pending=tree).exchanged()
        if self.pending is not None:
            raise RuntimeError("jaxps.TrainState.apply_gradients was called twice in one compiled step; call it once")
        record(self.client, "jaxps.TrainState.apply_gradients")
        return state.replace(pending=tree)

    def exchanged(self) -> "TrainState":
        """Pushes `pending` and returns the state with the pulled params and batch_stats (itself if none is pending)."""
        if self.pending is None:
            return self
        pulled = exchange(self.client, self.pending)
        return self.replace(params=pulled["params"], batch_stats=pulled.get("batch_stats"), pending=None)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: Any, batch_stats: Any = None, **server_options) -> "TrainState":
        """Starts a `ParameterServer(**server_options)` for `params` (and `batch_stats`, as value leaves)."""
        tree = {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}
        values = None if batch_stats is None else ["batch_stats"]
        ps = ParameterServer(tree, tx, values=values, **server_options)
        return cls(step=0, apply_fn=apply_fn, params=params, tx=tx, opt_state=None, batch_stats=batch_stats, client=ps.client(0), server=ps)

    @classmethod
    def from_client(cls, client: Client, apply_fn: Callable, step: int = 0) -> "TrainState":
        """A worker's state: the server's current params (and batch_stats), pushing through `client`."""
        pulled = client.pull()
        return cls(step=step, apply_fn=apply_fn, params=pulled["params"], tx=None, opt_state=None,
                   batch_stats=pulled.get("batch_stats"), client=client)  # fmt: skip


def jit(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` for a step that calls `jaxps.TrainState.apply_gradients`.

    Every `TrainState` the compiled call returns with an update pending (at
    any depth of its result) is exchanged with the server before the call
    returns it, so the caller gets the pulled params, as with `jax.jit` and
    flax's TrainState.
    """
    is_pending = lambda x: isinstance(x, TrainState) and x.pending is not None  # noqa: E731

    def finish(_, out):
        exchanged = len([x for x in jax.tree.leaves(out, is_leaf=is_pending) if is_pending(x)])
        return jax.tree.map(lambda x: x.exchanged() if is_pending(x) else x, out, is_leaf=is_pending), exchanged

    return wrap(jax.jit(fun, **jit_kwargs), finish, check_returned=True)
