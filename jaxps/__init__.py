"""jaxps: a parameter server for JAX.

Parameters are pytrees, partitioned by tree path into shards; each shard's
update is a pure, jit-compiled optax step; workers compute `jax.grad` on their
own devices; shards and workers talk over a transport chosen at run time.

This module holds what a training loop uses. Writing a transport of your own:
`jaxps.transport`.
"""

from jaxps import filters as filters
from jaxps.client import Client as Client
from jaxps.client import PushFuture as PushFuture
from jaxps.consistency import MODES as MODES
from jaxps.errors import ServerClosedError as ServerClosedError
from jaxps.errors import ShardDiedError as ShardDiedError
from jaxps.plan import Plan as Plan
from jaxps.plan import make_plan as make_plan
from jaxps.registry import available_transports as available_transports
from jaxps.registry import register_transport as register_transport
from jaxps.saving import Checkpointing as Checkpointing
from jaxps.server import ParameterServer as ParameterServer
from jaxps.update import NotShardableError as NotShardableError
from jaxps.validate import PushError as PushError
from jaxps.value_leaves import values as values

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("TrainState", "jit"):  # import flax.training: only when asked for
        from jaxps import train_state

        return getattr(train_state, name)
    raise AttributeError(f"module 'jaxps' has no attribute {name!r}")


__all__ = [
    "Checkpointing",
    "Client",
    "MODES",
    "NotShardableError",
    "ParameterServer",
    "Plan",
    "PushError",
    "PushFuture",
    "ServerClosedError",
    "ShardDiedError",
    "TrainState",
    "available_transports",
    "filters",
    "jit",
    "make_plan",
    "register_transport",
    "values",
]
