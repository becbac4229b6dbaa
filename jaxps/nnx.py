"""Flax nnx drop-ins: `jaxps.nnx.Optimizer` for `nnx.Optimizer`, and the worker-side helpers.

    optimizer = jaxps.nnx.Optimizer(model, tx, wrt=nnx.Param)            # instead of nnx.Optimizer
    @jaxps.nnx.jit                                                         # instead of nnx.jit
    def train_step(model, optimizer, batch): ...                           # unchanged: calls
        optimizer.update(model, grads)   # pushes grads (and BatchStats), writes the server's state into model

The server holds the model's `wrt` leaves (stepped by `tx`) and its value
leaves (`values`, default `nnx.BatchStat`: pushed as values, merged per step,
see `jaxps.values`), so `ps.params()` is a complete, usable model state.
"""

from __future__ import annotations

import functools
import numbers
import operator
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxps.client import Client
from jaxps.exchange import current, deferred, exchange, is_traced, record
from jaxps.server import ParameterServer


def _pure(model, filters) -> Any:
    return nnx.as_pure(nnx.state(model, filters))


def _value_paths(model, values) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(_pure(model, values))[0]]


_NOT_ITS_MODEL = "jaxps.nnx.Optimizer.update: this Optimizer serves the model it was built with"


class Optimizer(nnx.Pytree):
    """`nnx.Optimizer` whose state lives on a `jaxps.ParameterServer`.

    `Optimizer(model, tx, wrt=nnx.Param, values=nnx.BatchStat, **server_options)`
    starts a server (`.server`) holding the model's `wrt` and `values` leaves;
    `Optimizer(model, client, ...)` is a worker's, built from its client, and
    first loads the server's state into `model`. `update(model, grads)` pushes
    `grads` with the model's current value leaves and writes the pulled state
    back into `model` in place: at once when called eagerly; inside a step
    compiled with `jaxps.nnx.jit`, as that step returns. An Optimizer serves
    the model it was built with. `step` counts this optimizer's updates
    (`server.step` the server's), and after `run_workers` is the server's.
    """

    def __init__(self, model, tx: optax.GradientTransformation | Client, *, wrt: Any = nnx.Param, values: Any = nnx.BatchStat, **server_options):
        self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
        self.wrt, self.values = wrt, values
        _LINKS[self] = _Link(model)
        if isinstance(tx, Client):
            if server_options:
                raise TypeError(f"an Optimizer built from a client takes no server options, got {sorted(server_options)}")
            self._link.client = tx
            nnx.update(model, tx.pull())
        else:
            paths = _value_paths(model, values)
            self._link.server = ParameterServer(_pure(model, (wrt, values)), tx, values=paths or None, **server_options)
            self._link.client = self._link.server.client(0)
        # inside jaxps.nnx.jit: the tree the step pushes, and how many times update ran in the step (1, or a loop's count)
        self._pending = nnx.OptState(jax.tree.map(jnp.zeros_like, _pure(model, (wrt, values))))
        self._pending_count = nnx.OptState(jnp.array(0, dtype=jnp.int32))

    @property
    def _link(self) -> "_Link":
        try:
            return _LINKS[self]
        except KeyError:
            raise RuntimeError("this jaxps.nnx.Optimizer is a copy (nnx.clone, split/merge): use the one built with its model") from None

    @property
    def server(self) -> ParameterServer | None:
        """The server this Optimizer started (None: it was built from a client)."""
        return self._link.server

    @property
    def client(self) -> Client:
        """The client it pushes through."""
        return self._link.client

    def update(self, model, grads, /) -> None:
        """Pushes `grads` (a State of `wrt` leaves) and the model's value leaves; loads the result into `model`."""
        full = _pure(model, (self.wrt, self.values))
        grads = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(_pure(grads, self.wrt))[0]}
        flat, treedef = jax.tree_util.tree_flatten_with_path(full)
        values = set(_value_paths(model, self.values))
        missing = [k for k in (jax.tree_util.keystr(p) for p, _ in flat) if k not in values and k not in grads]
        if missing:
            raise ValueError(f"jaxps.nnx.Optimizer.update: no gradient for {missing[:10]} (grads must match wrt={self.wrt!r})")
        pushed = jax.tree_util.tree_unflatten(treedef, [x if jax.tree_util.keystr(p) in values else grads[jax.tree_util.keystr(p)] for p, x in flat])
        if is_traced(pushed):
            record(self, "jaxps.nnx.Optimizer.update")  # (this trace's copy of the Optimizer, kept until the call ends)
            self._pending.set_value(pushed)
            self._pending_count[...] += 1
        else:
            if model is not self._link.model:
                raise ValueError(f"{_NOT_ITS_MODEL}, not this one")
            nnx.update(model, exchange(self._client(), pushed))
        self.step[...] += 1

    def _client(self) -> Client:
        """The client to push through: the driver's new one for worker 0 if `run_workers` replaced it."""
        self._link.client = current(self._link.client, self._link.server)
        return self._link.client

    def exchange_pending(self, model_passed: bool = True) -> bool:
        """Exchanges the update a compiled step left pending into the model this Optimizer serves; whether there was one.

        `jaxps.nnx.jit` calls it, saying whether that model was among the step's
        arguments. If the server refuses it (e.g. `jaxps.PushError`), the step
        ran `update` in a loop, or it was given another model, the error is
        raised, nothing is pushed, the model keeps its parameters and `step` is
        not counted.
        """
        count = int(self._pending_count[...])
        if count == 0:
            return False
        self._pending_count[...] = 0
        try:
            if not model_passed:
                raise ValueError(
                    f"{_NOT_ITS_MODEL}, and the step was not given that model (another one, e.g. a clone?): "
                    "pass the Optimizer's own model (nothing was pushed)"
                )
            if count > 1:
                raise RuntimeError(
                    f"jaxps.nnx.Optimizer.update ran {count} times in one compiled step (in a loop such as nnx.scan); "
                    "jaxps pushes once per compiled step: call it once, outside loops (nothing was pushed)"
                )
            nnx.update(self._link.model, exchange(self._client(), self._pending.get_value()))
        except BaseException:
            self.step[...] -= count
            raise
        return True

    def run_workers(self, fn: Callable, model, args: Sequence[Any]) -> Any:
        """`fn(model_i, optimizer_i, args[i])` on each worker (`server.run_workers`); their results, metrics merged.

        `model_i` is a copy of `model` loaded with the server's state, whose rng
        streams are worker i's: each stream's key folded with `i` on the first
        call, and continued where the worker left off on later calls.
        `optimizer_i` is worker i's Optimizer. Afterwards `model` holds the
        server's state (parameters and value leaves), and `step` the server's
        step (the updates that state holds). If every result is a metric
        (`nnx.Metric`, `nnx.MultiMetric`) or a dict of metrics and numbers,
        with the same keys, they come back merged by `merge_metrics`; else as
        a list.
        """
        if self.server is None:
            raise RuntimeError("run_workers is the driver's: this Optimizer was built from a client")
        jobs = [(fn, model, self._link.rng_states.get(i), self.wrt, self.values, arg) for i, arg in enumerate(args)]
        results = self.server.run_workers(_worker, jobs)
        self._link.rng_states.update({i: state for i, (_, state) in enumerate(results)})
        nnx.update(model, self.server.params())
        self.step[...] = jnp.asarray(self.server.step, self.step[...].dtype)  # the updates `model` now holds
        results = [r for r, _ in results]
        if results and all(isinstance(r, (nnx.Metric, dict)) and _mergeable(r, results[0]) for r in results):
            return merge_metrics(results)
        return results  # (not metrics: e.g. strings, per-step arrays, or dicts of them)


class _Link:
    """What an Optimizer holds outside its graph (`_LINKS`): the model it serves, its server and client, each
    worker's rng state between `run_workers` calls.

    Not an attribute: as one, it would be static, part of a compiled step's cache key, and each worker's new
    Optimizer, at each `run_workers` call, traced the step anew while JAX's cache kept its model copy alive.
    """

    def __init__(self, model):
        self.model = model
        self.server: ParameterServer | None = None
        self.client: Client | None = None
        self.rng_states: dict[int, Any] = {}


_LINKS: "weakref.WeakKeyDictionary[Optimizer, _Link]" = weakref.WeakKeyDictionary()


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`nnx.jit(fun, **jit_kwargs)` for a step that calls `jaxps.nnx.Optimizer.update`.

    As the compiled call returns, every such Optimizer among its arguments
    pushes what the step gave it and loads the pulled state into its model, so
    the caller sees the model updated, as with `nnx.jit` and `nnx.Optimizer`.
    Works as `@jaxps.nnx.jit` and `@jaxps.nnx.jit(static_argnums=...)`.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)

    def finish(call_args, out, made):
        nodes = [node for _, node in nnx.iter_graph(call_args)]
        optimizers = [node for node in nodes if isinstance(node, Optimizer)]
        updated = [optimizer for optimizer in optimizers if int(optimizer._pending_count[...])]  # (a copy may come along)
        exchanged = sum(optimizer.exchange_pending(any(node is optimizer._link.model for node in nodes)) for optimizer in updated)
        if exchanged != made:  # an Optimizer updated in the step but not passed to it as an argument
            raise RuntimeError(f"{getattr(fun, '__name__', 'the step')} made {made} update(s) but {exchanged} reached "
                               "an Optimizer among its arguments: pass the Optimizer to the step")  # fmt: skip
        return out

    return deferred(nnx.jit, fun, finish, **jit_kwargs)


def worker_rngs(model, worker: int, state: Any = None) -> None:
    """Makes `model`'s rng streams worker `worker`'s: each key folded with `worker`, counts from 0; or restores `state`."""
    if state is not None:
        nnx.update(model, state)
        return
    keys = nnx.state(model, nnx.RngKey)
    nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, worker), nnx.as_pure(keys)))
    counts = nnx.as_pure(nnx.state(model, nnx.RngCount))
    nnx.update(model, jax.tree.map(jnp.zeros_like, counts))


def _worker(client: Client, job) -> tuple[Any, Any]:
    """A worker of `Optimizer.run_workers`: its own model copy, rngs and Optimizer; returns (fn's result, rng state)."""
    fn, model, rng_state, wrt, values, arg = job
    model = nnx.clone(model)
    worker_rngs(model, client.worker, rng_state)
    optimizer = Optimizer(model, client, wrt=wrt, values=values)
    result = fn(model, optimizer, arg)
    return result, nnx.as_pure(nnx.state(model, nnx.RngState))


def merge_metrics(metrics: Sequence[Any]) -> Any:
    """Merges per-worker metrics into one, as if one metric had seen every worker's batches.

    `nnx.MultiMetric`, `nnx.metrics.Average` / `Accuracy` (totals and counts
    add up), `Welford` (Chan's parallel formula), dicts of them key by key;
    plain numbers in dicts are averaged over workers.
    """
    first = metrics[0]
    if isinstance(first, dict):
        return {k: merge_metrics([m[k] for m in metrics]) for k in first}
    if isinstance(first, nnx.MultiMetric):
        merged = nnx.clone(first)
        for name in first._metric_names:
            setattr(merged, name, merge_metrics([getattr(m, name) for m in metrics]))
        return merged
    if isinstance(first, nnx.metrics.Welford):
        return functools.reduce(_merge_welford, metrics[1:], nnx.clone(first))
    if isinstance(first, nnx.metrics.Average):
        merged = nnx.clone(first)
        merged.total[...] = functools.reduce(operator.add, [m.total[...] for m in metrics])
        merged.count[...] = functools.reduce(operator.add, [m.count[...] for m in metrics])
        return merged
    if isinstance(first, nnx.Metric):
        raise TypeError(f"merge_metrics: no merge known for {type(first).__name__}; merge its states by hand")
    return functools.reduce(operator.add, metrics) / len(metrics)


def _mergeable(result: Any, first: Any) -> bool:
    """Whether `result` is what `merge_metrics` merges with `first`: a metric, or a dict (with `first`'s keys) of
    metrics, such dicts and plain numbers (scalars)."""
    if isinstance(result, nnx.Metric):
        return type(result) is type(first)
    if isinstance(result, dict):
        return isinstance(first, dict) and result.keys() == first.keys() and all(_mergeable(v, first[k]) for k, v in result.items())
    return _number(result) and _number(first)


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Number) or (getattr(x, "shape", None) == () and jnp.issubdtype(getattr(x, "dtype", None), jnp.number))


def _merge_welford(a, b):
    n = a.count[...] + b.count[...]
    delta = b.mean[...] - a.mean[...]
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    a.mean[...] = a.mean[...] + delta * b.count[...] / safe
    a.m2[...] = a.m2[...] + b.m2[...] + delta**2 * a.count[...] * b.count[...] / safe
    a.count[...] = n
    return a
