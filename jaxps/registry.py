"""Choosing a transport by name at run time.

Built-in transports live in `jaxps.transports` and are imported lazily; a third
party plugs one in by `"package.module:Class"`, by `register_transport`, or by
an entry point in the `jaxps.transports` group.
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Any

ENTRY_POINT_GROUP = "jaxps.transports"

_REGISTRY: dict[str, Any] = {
    "inprocess": "jaxps.transports.inprocess:InProcessTransport",
    "multiprocessing": "jaxps.transports.multiprocess:MultiprocessingTransport",
    "ray": "jaxps.transports.ray_transport:RayTransport",
}
_ALIASES = {"inproc": "inprocess", "mp": "multiprocessing"}
_INSTALL_HINTS = {"ray": "pip install 'jaxps[ray]'  (or: pip install 'ray>=2.9')"}


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


def make_transport(transport: Any, options: dict | None = None) -> Any:
    """A transport instance from a name (built with `options`) or an instance."""
    from jaxps.transport import Transport

    if isinstance(transport, str):
        return resolve_transport(transport)(**(options or {}))
    if options:
        raise ValueError("transport_options apply only when transport is given by name")
    if not isinstance(transport, Transport):
        raise TypeError(f"{transport!r} is not a transport: it needs start, run_workers and close")
    return transport
