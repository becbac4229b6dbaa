"""The API for writing a transport: what jaxps asks of one, and the parts it gives you.

A transport starts the shards somewhere (this process, spawned processes, Ray
actors), returns one `ShardChannel` per shard for clients to talk through,
runs worker functions on its own execution units, and cleans up:

    class MyTransport:
        def start(self, configs: Sequence[ShardConfig]) -> list[ShardChannel]: ...
        def run_workers(self, fn, clients, args) -> list: ...   # run_worker(fn, client, arg) each
        def close(self) -> None: ...

Wherever a shard lives, build it as `ShardService(Shard(config))` and hand
every request that arrives to `service.handle(request, reply, arrays)`; the
service does what the request asks (`REQUESTS`: `Push`, `Pull`, `Leave`,
`Join`, `Stats`, ...) and answers through your `Reply`. A channel only moves
requests, arrays and answers: subclass `ShardChannel` and implement `submit`;
`stage` (copy a push's arrays ahead of sending it, checking them on the way)
and `close` have defaults. Channels must also work inside a shard's own
process: the leading shard of a sync server with backup workers sends the
others its steps' decisions through them (`Lead`, `Decide`). An answer may be
a `jaxps.service.Moved` (the server was resharded: `ps.reshard`), for a pull
too: hand it to the client as it is.

A transport that can restart shards (`on_shard_failure="restart"`) also has
`expect_restarts(timeout)` (called before `start`: its channels then wait for
a dead shard instead of failing), `dead() -> [shard index]`,
`restart(config)` (a new shard from `config.restore`, reached through the
same channel) and `give_up(reason)` (waiting clients raise `ShardDiedError`);
see `jaxps.failover` and the multiprocessing transport. One that keeps hot
standbys (`replicas=1`, `jaxps.replication`) also has `start_standby(config)
-> channel` (a standby of shard `config.index`, its state to come from its
primary through that channel), `standbys` (shard index -> channel),
`dead_standbys()`, `drop_standby(i)`, and `promote(i)` (the standby takes
over: clients' channels reach it from then on); its `expect_restarts` takes
`standby=True`, and its channels then answer a client's push, pull or leave
lost with a dead shard `SEND_AGAIN` (`jaxps.service.lost_answer`).
`jaxps.transports.inprocess` is the smallest complete example.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence, runtime_checkable

from jaxps.client import leave_quietly, run_worker, worker_failed
from jaxps.errors import ServerClosedError, ShardDiedError
from jaxps.service import REQUESTS, Join, Leave, Pull, Push, Reply, ShardService, Stats, own_copy
from jaxps.shard import Shard, ShardConfig

__all__ = [
    "REQUESTS",
    "Join",
    "Leave",
    "Pull",
    "Push",
    "Reply",
    "ServerClosedError",
    "Shard",
    "ShardChannel",
    "ShardConfig",
    "ShardDiedError",
    "ShardService",
    "Staged",
    "Stats",
    "Transport",
    "Waitable",
    "leave_quietly",
    "own_copy",
    "run_worker",
    "worker_failed",
]


@runtime_checkable
class Waitable(Protocol):
    """A `concurrent.futures.Future`-like handle on one request's answer."""

    def result(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...


class Staged(NamedTuple):
    """A push's arrays, moved ahead of the push by `ShardChannel.stage`.

    `payload` is what `submit` sends with the push; `finite` says per leaf
    whether it is free of NaN/Inf as seen while staging (None: not checked,
    the client checks).
    """

    payload: Any
    finite: Sequence[bool] | None = None


class ShardChannel:
    """A client's line to one shard. Subclass it and implement `submit`.

    Channels travel with their clients: make them picklable for transports
    whose workers run in other processes (or refuse pickling with a clear
    error, as the in-process one does).
    """

    closed = False
    # whether a push's finite flags, still being computed on the device, can go to the shard as they are
    # (the shard then checks the push inside its step: `Shard.push`'s `guard`); only within one process
    checks_on_device = False

    def submit(self, request: Any, payload: Any = None, timeout: float | None = None) -> Waitable:
        """Sends `request` (a push with `payload`, what `stage` returned); returns at once.

        `timeout` bounds the time to reach the shard (e.g. to connect; with fail-over, to reach a dead shard's
        successor, also when the request is sent again after its shard died under it), not the answer.
        """
        raise NotImplementedError

    def stage(self, leaves: Sequence[Any], check: bool) -> Staged:
        """Moves a push's leaves ahead of `submit`, checking them for NaN/Inf on the way if `check`.

        Default: nothing moves and nothing is checked. A push is staged on
        every shard before it is submitted to any, so staging must not change
        the shard.
        """
        return Staged(list(leaves), None)

    def call(self, request: Any, timeout: float | None = None) -> Any:
        """`submit(request)` and wait for the answer."""
        return self.submit(request, timeout=timeout).result(timeout)

    def close(self) -> None:
        """This channel is done for: every later call raises `ServerClosedError`."""
        self.closed = True


@runtime_checkable
class Transport(Protocol):
    """Starts shards, runs workers, cleans up."""

    def start(self, configs: Sequence[ShardConfig]) -> list[ShardChannel]: ...

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list: ...

    def close(self) -> None: ...
