"""The transport interface, and the registry that picks one by name at run time.

A transport starts the shards somewhere (this process, spawned processes, Ray
actors), returns one picklable `ShardChannel` per shard for clients to talk
through, runs worker functions on its own execution units, and cleans up.

Built-in transports live in the top-level `transports` package and are
imported lazily; a third party plugs one in by `"package.module:Class"`, by
`register_transport`, or by an entry point in the `jaxps.transports` group.
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from jaxps.shard import ShardSpec

ENTRY_POINT_GROUP = "jaxps.transports"

_REGISTRY: dict[str, Any] = {
    "inprocess": "transports.inprocess:InProcessTransport",
    "multiprocessing": "transports.multiprocess:MultiprocessingTransport",
    "ray": "transports.ray_transport:RayTransport",
}
_ALIASES = {"inproc": "inprocess", "mp": "multiprocessing"}
_INSTALL_HINTS = {"ray": "pip install 'jaxps[ray]'  (or: pip install 'ray>=2.9')"}


STAGED = "staged"  # `push(..., STAGED)`: the leaves are those of the channel's last `stage`


class ShardDiedError(RuntimeError):
    """A shard's process or actor is gone; its state is lost."""


@runtime_checkable
class Waitable(Protocol):
    """A `concurrent.futures.Future`-like handle."""

    def result(self, timeout: float | None = None) -> Any: ...


@runtime_checkable
class ShardChannel(Protocol):
    """A client's picklable line to one shard; every call returns at once."""

    def push(self, worker: int, tag: int, based_on: int | None, leaves: Sequence[Any] | None) -> Waitable:
        """Gradients for step `tag` (None: skipped); `.result()` is 'applied', 'dropped' or 'skipped'."""

    def pull(self, worker: int | None) -> Waitable:
        """`.result()` is `(version, leaves)` as jax arrays, once `worker` may read."""

    def leave(self, worker: int) -> None: ...

    def stats(self) -> dict: ...

    # Optional: `join(worker) -> version` lets a worker take part (again, if it left) from the
    # shard's current version; `run_workers` calls it for every worker before starting them.
    # Without it, a worker that left cannot come back.
    # Optional: `stage(leaves, check) -> (payload, finite)` moves the leaves ahead of the push
    # (e.g. copies them into shared memory) and returns what to pass to `push` instead (`STAGED`,
    # or the leaves); with `check`, also per leaf whether it is free of NaN/Inf, as seen while
    # copying (None: not checked, the client checks). A push found bad is then not sent.


@runtime_checkable
class Transport(Protocol):
    """Starts shards, runs workers, cleans up."""

    def start(self, specs: Sequence[ShardSpec]) -> list[ShardChannel]: ...

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list: ...

    def close(self) -> None: ...


def register_transport(name: str, target: Any) -> None:
    """Registers a transport class (or a lazy `"module:Class"` string) under `name`."""
    _REGISTRY[name] = target


def available_transports() -> list[str]:
    names = set(_REGISTRY) | set(_ALIASES)
    try:
        names |= {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # pragma: no cover - broken metadata must not hide built-ins
        pass
    return sorted(names)


def _load(target: str, name: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = _INSTALL_HINTS.get(name)
        raise ImportError(
            f"transport {name!r} could not be imported ({e})" + (f"; install it with: {hint}" if hint else "")
        ) from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"transport {name!r}: module {module_name!r} has no attribute {attr!r}") from None


def resolve_transport(name: str) -> Any:
    """The transport class registered under `name`, an alias, or `"module:Class"`."""
    if not isinstance(name, str):
        raise TypeError(f"transport must be a name or a Transport object, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        target = _REGISTRY[key]
        return _load(target, key) if isinstance(target, str) else target
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        return _load(name, name)
    valid = available_transports()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown transport {name!r}; valid transports: {', '.join(valid)}.{hint}")


def make_transport(transport: Any, options: dict | None = None) -> Transport:
    """A transport instance from a name (built with `options`) or an instance."""
    if isinstance(transport, str):
        return resolve_transport(transport)(**(options or {}))
    if options:
        raise ValueError("transport_options apply only when transport is given by name")
    if not isinstance(transport, Transport):
        raise TypeError(f"{transport!r} is not a transport: it needs start, run_workers and close")
    return transport
