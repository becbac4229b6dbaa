"""Ray transport: each shard is an asyncio Ray actor, workers are Ray tasks.

Data paths (`data_path`). Each shard actor also serves its `ShardService` on an
endpoint of its own (`jaxps.transports.endpoint`), exactly as a
multiprocessing shard process does, and a client reaches it:

- on the shard's node, through shared memory (a `SharedMemoryChannel` over
  `/dev/shm` buffers that are written again and again, never allocated per step);
- on another node, over a TCP connection of its own to the node's address
  (the same channel with `tcp=True`: arrays stream straight from and into
  reused buffers, no pickling of array data, no object-store round trip);
- or through Ray's object store: a push is one `ray.put` of the shard's leaf
  list; a pull is answered with a copy of the shard's leaves as the call's
  return value, read zero-copy. (Not one shared object per version handed out
  by reference: a caller's `ray.get` of such a nested reference can hang for
  good, seen with two threads of one process pulling the same version.) Every
  transfer writes a new object, and fresh shared pages cost a page fault each
  (a `ray.put` of 20 MB takes ~10x a memcpy on a small VM).

`"auto"` (the default) takes shared memory on the same node and TCP across;
`"shm"` shared memory on the same node and the object store across; `"tcp"`
TCP everywhere; `"object_store"` the object store everywhere. Every endpoint
connection proves it holds the shard's secret key (made in the shard actor,
carried inside the pickled client) before anything it sends is read as a
request. Ray still places, starts and kills the shards and runs the workers.

Order. Ray runs the calls of one submitter in order only on a synchronous,
single-threaded actor; an asyncio (or threaded) actor may start a call while
an earlier one waits for its arguments ("Actor Task Execution Order",
docs.ray.io/en/latest/ray-core/actors/task-orders.html). So every call of a
channel carries (caller id, sequence number) and the actor hands each request
to its `ShardService` in that order; only the wait for the result (a sync step closing,
an ssp pull) happens outside that turn, on the actor's event loop.

Resources, by default: shard actors take `num_cpus=0` (they mostly wait; ask
for more with `num_cpus`, `num_gpus`, `resources`), worker tasks
`num_cpus=0.01` and no retries, so that all workers of a sync step can run at
once even on a small machine (a worker left pending would stall the step
forever); change them with `worker_options`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import os
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import ray
from ray.exceptions import ActorAlreadyExistsError, GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

from jaxps.client import closed_while_running, unpicklable_worker
from jaxps.errors import ServerClosedError, ShardDiedError
from jaxps.service import RESENT_AFTER_RESTART, LostWithShard, Moved, Pull, Push, Reply, Stats, TakeOver, died_during_request, lost_answer, recovery_deadline, shorter
from jaxps.transport import ShardChannel, Staged, leave_quietly, worker_failed
from jaxps.transports import shm, wire
from jaxps.transports.shm_channel import SharedMemoryChannel

DEFAULT_WORKER_OPTIONS = {"num_cpus": 0.01, "max_retries": 0}
STANDBY = "standby"  # a standby actor's `endpoint()`: not the shard (yet)
DATA_PATHS = ("auto", "shm", "tcp", "object_store")


# -- the actor ---------------------------------------------------------------------
@ray.remote
class _ShardActor:
    """One shard's `ShardService`, served on an asyncio event loop (and on a shared-memory endpoint)."""

    def __init__(self, config, data_path: str = "auto", standby: bool = False):
        from jaxps.service import ShardService  # here, once Ray has set up this process's devices
        from jaxps.shard import Shard
        from jaxps.transports.endpoint import serve

        # threads of this actor (a leader's step decisions), never its event loop, wait on Ray calls
        os.environ.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
        context = ray.get_runtime_context()
        where = {"actor_id": context.get_actor_id(), "node_id": context.get_node_id()}
        self._service = ShardService(Shard(config), where)
        self._standby = standby  # clients find it (`endpoint`) only once it takes over
        self._service.on_take_over = self._took_over
        self._next: dict[str, int] = {}  # caller -> sequence number of its next call
        self._waiting: dict[tuple[str, int], asyncio.Future] = {}
        self._endpoint = None
        if data_path != "object_store":
            tcp_host = ray.util.get_node_ip_address() if data_path in ("auto", "tcp") else None  # this node's address only
            self._endpoint = serve(self._service, config.plan.layout(config.index), node=context.get_node_id(), tcp_host=tcp_host).endpoint

    async def ready(self) -> int:
        return self._service.shard.index

    async def watch(self) -> None:
        """Never answers: the transport's handle on this actor's death (its ref then fails)."""
        await asyncio.Event().wait()

    async def endpoint(self):
        """Where clients on this node reach the shard through shared memory (None: object store only);
        `STANDBY` while it is a standby."""
        return STANDBY if self._standby else self._endpoint

    async def serving(self):
        """The endpoint, standby or not (its primary feeds it through it)."""
        return self._endpoint

    def _took_over(self) -> None:
        self._standby = False

    async def call(self, caller: str, seq: int, request, payload=None):
        """Carries out `request` (a push's gradients in `payload`) in `caller`'s order; its answer."""
        reply = _ActorReply(asyncio.get_running_loop().create_future())
        await self._in_turn(caller, seq, lambda: self._service.handle(request, reply, payload))
        return await reply.future

    async def _in_turn(self, caller: str, seq: int, call: Callable[[], Any]) -> Any:
        """Runs `call` once every earlier call of `caller` has had its turn."""
        if self._next.get(caller, 0) != seq:
            turn = asyncio.get_running_loop().create_future()
            self._waiting[(caller, seq)] = turn
            await turn
        try:
            return call()
        finally:
            self._next[caller] = seq + 1
            following = self._waiting.pop((caller, seq + 1), None)
            if following is not None:
                _resolve(following, None)


class _ActorReply(Reply):
    """Answers one object-store call: resolves the call's future (from any thread)."""

    borrowed = True  # object-store arrays go away with their ref, once the call returns

    def __init__(self, future: asyncio.Future):
        self.future = future

    def send(self, value: Any) -> None:
        _resolve(self.future, value)

    def pulled(self, version: int, leaves: list) -> None:
        # copied now (the shard's next step may donate its buffers); Ray puts the answer into its object store
        _resolve(self.future, (version, [np.array(x, copy=True) for x in leaves]))


def _resolve(future: asyncio.Future, value: Any) -> None:
    """Completes `future` from any thread (a shared-memory client's step may settle a Ray caller's push)."""
    try:
        on_loop = asyncio.get_running_loop() is future.get_loop()
    except RuntimeError:
        on_loop = False
    if on_loop:
        _set_result(future, value)
    else:
        future.get_loop().call_soon_threadsafe(_set_result, future, value)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


@ray.remote(num_cpus=0)
class _GivenUp:
    """Named once the server stops restarting shards: clients waiting for one read why."""

    def __init__(self, reason: str):
        self._reason = reason

    def reason(self) -> str:
        return self._reason


RESTART_TRIES = 3  # a restarted shard actor that dies before it serves is placed again, up to this many times in all
RESTART_PAUSE_S = 2.0  # between those tries (Ray marks a lost node dead within seconds)


@ray.remote
def _run_worker(fn, client, arg):
    from jaxps.client import unpicklable_result
    from jaxps.transport import run_worker

    result = run_worker(fn, client, arg)
    try:  # (Ray's own error, raised as it pickles the result, would not say whose or what)
        _ResultProbe(_Discard(), protocol=5, buffer_callback=lambda buffer: False).dump(result)
    except Exception as e:
        raise unpicklable_result(client, result, e) from e
    return result


class _Discard:
    def write(self, data) -> int:
        return len(data)


class _ResultProbe(ray.cloudpickle.CloudPickler):
    """Pickles a worker's result to nowhere, to see that it pickles: arrays' bytes are left out (out of band), and
    Ray's own handles are left to Ray (pickling one here would register it with Ray, as a reference to keep)."""

    def reducer_override(self, obj):
        if isinstance(obj, (ray.ObjectRef, ray.actor.ActorHandle)):
            return type(None), ()
        return super().reducer_override(obj)


# -- the client's side ---------------------------------------------------------------
def shard_died(index: int, actor, why: str) -> Exception:
    return ShardDiedError(
        f"shard {index} died: its Ray actor {actor._actor_id.hex()} is gone and its parameters "
        f"and optimizer state with it ({why})"
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unwrap_task_error(e: BaseException) -> BaseException:
    """The exception a Ray task raised, as itself (Ray wraps it, with colour codes, in a RayTaskError)."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, BaseException):
        remote = str(e)  # the task's traceback, in colour
        cause.__cause__ = wire.RemoteTraceback(f"\n\nin a Ray worker task:\n{wire.strip_ansi(remote)}")
        cause.__suppress_context__ = True
        return cause
    return e


class RayFuture:
    """`.result(timeout)` of one actor call; a dead actor raises `jaxps.ShardDiedError`."""

    def __init__(self, ref: ray.ObjectRef, channel: "RayChannel", convert: Callable[[Any], Any] | None = None):
        self._ref = ref
        self._channel = channel
        self._convert = convert

    def result(self, timeout: float | None = None) -> Any:
        try:
            value = ray.get(self._ref, timeout=timeout)
        except GetTimeoutError:
            raise TimeoutError(f"shard {self._channel.index} did not answer within {timeout} s") from None
        except RayActorError as e:
            raise self._channel.gone(_first_line(e)) from e
        except RayTaskError as e:
            raise unwrap_task_error(e)
        return self._convert(value) if self._convert else value

    def done(self) -> bool:
        ready, _ = ray.wait([self._ref], timeout=0)
        return bool(ready)


def _to_jax(value):
    import jax

    if isinstance(value, Moved):  # resharded away
        return value
    version, leaves = value
    if leaves is None:  # the client holds this version's leaves already
        return version, None
    # zero-copy where aligned: the object is immutable and the jax array keeps it alive
    return version, jax.device_put(list(leaves))


_UNDECIDED = object()

# The Ray session a transport started with `ray.init` (its GCS address), and how many
# transports use it: it is shut down with the last of them, not under the others' feet.
_own_session: dict[str, Any] = {"gcs": None, "users": 0}
_own_session_lock = threading.Lock()


def _gcs_address() -> str | None:
    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


class RayChannel(ShardChannel):
    """A client's line to one shard actor; picklable into Ray tasks and actors.

    Every unpickled copy is a new caller whose calls the actor runs in order.
    In each process it decides once how to reach the actor: through shared
    memory on the actor's node (if the actor serves it), else through Ray.
    """

    def __init__(
        self, actor, index: int, endpoint: wire.Endpoint | None = None, recovery: "Recovery | None" = None, data_path: str = "auto"
    ):
        self.actor = actor
        self.index = index
        self.endpoint = endpoint
        self.recovery = recovery
        self.data_path = data_path
        self._new_caller()

    def _new_caller(self) -> None:
        self._caller = uuid.uuid4().hex
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._local: Any = _UNDECIDED

    def __getstate__(self):
        return {"actor": self.actor, "index": self.index, "endpoint": self.endpoint, "recovery": self.recovery, "data_path": self.data_path}

    def __setstate__(self, state):
        self.actor, self.index, self.endpoint = state["actor"], state["index"], state["endpoint"]
        self.recovery, self.data_path = state.get("recovery"), state.get("data_path", "auto")
        self._new_caller()

    def rebind(self, actor, endpoint: wire.Endpoint | None) -> None:
        """Talks to `actor` (a restarted shard) from now on."""
        with self._lock:
            local, self._local = self._local, _UNDECIDED
            self.actor, self.endpoint = actor, endpoint
            self._caller, self._seq = uuid.uuid4().hex, itertools.count()
        if local is not None and local is not _UNDECIDED:
            local.close()

    def _find_restarted(self, dead_actor, timeout: float | None = None) -> None:
        """Waits until the shard's actor is another than `dead_actor` (restarted under its name), and rebinds to it;
        for at most `timeout` seconds if given (the supervisor's own requests must not wait for the recovery it runs)."""
        deadline, not_back = recovery_deadline(self.index, self.recovery.timeout, timeout)
        while True:
            if self.closed:
                raise self.gone("closed")
            if self.actor._actor_id != dead_actor._actor_id:
                return  # another thread found it first
            try:
                given_up = ray.get_actor(self.recovery.given_up)
            except ValueError:
                given_up = None
            if given_up is not None:
                raise ShardDiedError(ray.get(given_up.reason.remote()))
            for name in self.recovery.names:  # the restarted shard, or the standby that took over
                try:
                    actor = ray.get_actor(name)
                    if actor._actor_id != dead_actor._actor_id:
                        endpoint = ray.get(actor.endpoint.remote(), timeout=min(60.0, max(0.1, deadline - time.monotonic())))
                        if not (isinstance(endpoint, str) and endpoint == STANDBY):
                            self.rebind(actor, endpoint)
                            return
                except (ValueError, RayActorError, GetTimeoutError):
                    pass  # not named yet, or not serving yet
            if time.monotonic() >= deadline:
                raise not_back
            time.sleep(0.1)

    def gone(self, why: str) -> Exception:
        if self.closed:
            return ServerClosedError("the ParameterServer is closed")
        if self.recovery is not None:
            return died_during_request(self.index, self.recovery.standby)
        return shard_died(self.index, self.actor, why)

    @property
    def route(self) -> str:
        """How this process reaches the shard: "shm", "tcp" or "object_store" (decided on first use)."""
        local = self._route()
        return "object_store" if local is None else "tcp" if local.tcp else "shm"

    def _route(self) -> SharedMemoryChannel | None:
        with self._lock:
            if self._local is _UNDECIDED:
                self._local = self._endpoint_channel()
            return self._local

    def _endpoint_channel(self) -> SharedMemoryChannel | None:
        """A channel to the actor's endpoint as `data_path` says: shared memory on its node, TCP across; None: Ray's object store."""
        e = self.endpoint
        if e is None or not ray.is_initialized():
            return None
        same_node = ray.get_runtime_context().get_node_id() == e.node
        if same_node and self.data_path in ("auto", "shm"):
            return SharedMemoryChannel(self.index, e, functools.partial(self.gone, "its shared-memory connection closed"))
        if e.tcp is not None and self.data_path in ("auto", "tcp"):
            return SharedMemoryChannel(self.index, e, functools.partial(self.gone, "its TCP connection closed"), tcp=True)
        return None

    def stage(self, leaves, check: bool) -> Staged:
        actor = self.actor
        try:
            local = self._route()
            if local is not None:
                return local.stage(leaves, check)
        except ShardDiedError:
            if self.recovery is None or self.closed:
                raise
            self._find_restarted(actor)
            if self.recovery.standby:  # the pushes lost with it go first
                raise LostWithShard() from None
            return self.stage(leaves, check)
        return Staged(ray.put([np.asarray(x) for x in leaves]), None)  # every leaf converted before any shard sees one

    def submit(self, request, payload=None, timeout=None):
        if self.closed:
            raise self.gone("closed")
        actor = self.actor
        try:
            future = self._submit(request, payload, timeout)
        except ShardDiedError:
            if self.recovery is None or self.closed:
                raise
            future = _Failed(sys.exc_info()[1])
        return future if self.recovery is None else _Recovering(self, actor, request, future, timeout)

    def _submit(self, request, payload, timeout):
        local = self._route()
        if local is not None:
            return local.submit(request, payload, timeout)
        with self._lock:  # sequence numbers in submission order
            ref = self.actor.call.remote(self._caller, next(self._seq), request, payload)
        return RayFuture(ref, self, _to_jax if isinstance(request, Pull) else None)

    def close(self) -> None:
        """Closes this channel and this process's shared-memory connections (if any)."""
        super().close()
        with self._lock:
            local, self._local = self._local, None
        if local is not None and local is not _UNDECIDED:
            local.close()

    def __repr__(self) -> str:
        return f"RayChannel(shard={self.index})"


class Recovery(NamedTuple):
    """A restarted shard is found by actor `name`; clients wait up to `timeout` s, unless actor `given_up` exists."""

    timeout: float
    name: str
    given_up: str
    standby: bool = False  # a standby takes over (`replicas=1`): clients send what was in flight again (`lost_answer`)

    @property
    def names(self) -> tuple[str, ...]:
        """The names a shard's actor has: a restarted one takes the dead one's; a standby has the other."""
        return (self.name, f"{self.name}-b") if self.standby else (self.name,)


class _Failed:
    """A request that could not be sent: its error, as a future."""

    def __init__(self, error: BaseException):
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def done(self) -> bool:
        return True




class _Recovering:
    """A request's future that outlives its shard: if the shard dies, a push answers "rolled_back" and
    a pull (or a join, leave, stats, decision) goes to the restarted shard."""

    def __init__(self, channel: "RayChannel", actor, request, future, reach: float | None = None):
        self._channel, self._actor, self._request, self._future = channel, actor, request, future
        self._reach = reach  # the submit's time to reach the shard, which bounds finding its successor too

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._future.result(timeout)
        except (ShardDiedError, ServerClosedError):  # (closed: the route to the dead actor, once the channel rebound)
            if self._channel.closed or not isinstance(self._request, (Push, *RESENT_AFTER_RESTART)):
                raise
        answer = lost_answer(self._request, self._channel.recovery.standby)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if answer is not None:  # rolled back with the shard, or to be sent again by the client, to the standby
            if self._channel.recovery.standby:  # (a push's, whatever its timeout: its client sends them again in order)
                self._channel._find_restarted(self._actor, None if isinstance(self._request, Push) else left)
            return answer
        self._channel._find_restarted(self._actor, shorter(left, self._reach))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._channel.submit(self._request, timeout=shorter(left, self._reach)).result(left)

    def done(self) -> bool:
        return self._future.done()


def _sweep(endpoint: wire.Endpoint | None) -> None:
    """Unlinks a dead shard actor's shared-memory segments on this machine: those of a connection it was
    still setting up when it died (it unlinks each once its client has mapped it). Their names hold its
    endpoint's prefix and its pid, so nothing else matches."""
    address = None if endpoint is None else endpoint.address
    if isinstance(address, str) and address.startswith("\0"):  # (Linux: an abstract socket named by the prefix)
        shm.sweep(f"{address[1:]}p{endpoint.pid}c", tracked=False)


def _cancel(refs: list, timeout: float = 5.0) -> None:
    """Cancels running tasks and collects their ends (Ray logs a failed task's error nobody fetched); quietly, as
    the session may be shutting down meanwhile."""
    try:
        for ref in refs:
            ray.cancel(ref, force=True)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    except Exception:
        return
    for ref in done:
        try:
            ray.get(ref)
        except Exception:
            pass


def _await_death(actors: list, timeout: float) -> None:
    """Waits until the killed `actors` answer no more calls (`ray.kill` only asks)."""
    deadline = time.monotonic() + timeout
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # RayActorError once it is dead (or a timeout: give up)
                break
            time.sleep(0.05)


# -- the transport -----------------------------------------------------------------
class RayTransport:
    """Shards as asyncio Ray actors, workers as Ray tasks.

    Args:
      address: passed to `ray.init`: a cluster to join ("auto",
        "ray://host:10001"), "local" for a private local Ray, or None for
        Ray's rule (join a cluster running on this machine, else start a local
        one). An already-initialized Ray session is always reused.
      num_cpus, num_gpus, resources: what each shard actor asks for (default
        0 CPUs, 0 GPUs); custom resources control placement.
      init_options: more keyword arguments for `ray.init` (e.g. `num_cpus`
        of a local Ray; the dashboard is off unless asked for).
      worker_options: Ray task options for `run_workers` (default
        `num_cpus=0.01, max_retries=0`), e.g. `{"resources": {"TPU": 4}}`.
      actor_options: more Ray actor options for the shard actors (e.g.
        `{"runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}}`).
      start_timeout: seconds to wait for the shard actors to be placed and built.
      data_path: how clients reach a shard actor: "auto" (default: shared
        memory on its node, TCP from other nodes), "shm" (shared memory on its
        node, the object store from others), "tcp" (TCP from everywhere) or
        "object_store" (every array through Ray's object store).
      shared_memory: False is `data_path="object_store"` (kept for old code).

    `close()` kills the shard actors. If a transport's `start` called `ray.init`,
    the last transport using that session shuts Ray down (for a joined cluster
    that disconnects this driver; the cluster stays up); a session the user
    started is left running.
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float = 0,
        resources: dict | None = None,
        init_options: dict | None = None,
        worker_options: dict | None = None,
        start_timeout: float = 120.0,
        shared_memory: bool = True,
        actor_options: dict | None = None,
        data_path: str = "auto",
    ):
        if data_path not in DATA_PATHS:
            raise ValueError(f"unknown data_path={data_path!r}; valid: {', '.join(DATA_PATHS)}")
        clash = sorted({"num_cpus", "num_gpus", "resources"} & set(actor_options or {}))
        if clash:
            raise ValueError(f"actor_options {clash}: give them as transport options of their own (num_cpus=, num_gpus=, resources=)")
        self._address = address
        self._actor_options = {**(actor_options or {}), "num_cpus": num_cpus or 0, "num_gpus": num_gpus or 0, "resources": dict(resources or {})}
        self._init_options = dict(init_options or {})
        self._worker_options = {**DEFAULT_WORKER_OPTIONS, **(worker_options or {})}
        self._start_timeout = start_timeout
        if not shared_memory and data_path not in ("auto", "object_store"):
            raise ValueError(f"shared_memory=False means data_path='object_store'; it contradicts data_path={data_path!r}: give one of them")
        self._data_path = data_path if shared_memory else "object_store"
        self._actors: list = []
        self._channels: list[RayChannel] = []
        self._session: str | None = None  # the GCS address of a transport-started session this one counts in
        self._actors_gcs: str | None = None  # the session the actors live in
        self._recovery: Recovery | None = None
        self._watches: list = []  # per shard: a call that fails once its actor is dead
        self._given_up = None
        self._closed = False
        self._names: dict[int, str] = {}  # per shard: its actor's name, where it changed (a standby took over)
        self._standbys: dict[int, tuple] = {}  # per shard: (actor, watch, channel) of its standby

    @property
    def actors(self) -> list:
        """The shard actors' handles, by shard index."""
        return list(self._actors)

    def start(self, configs: Sequence[Any]) -> list[RayChannel]:
        with _own_session_lock:
            if not ray.is_initialized():
                with warnings.catch_warnings():  # Ray starts its processes by fork + exec: not JAX's fork deadlock
                    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                    ray.init(address=self._address, **{"include_dashboard": False, **self._init_options})
                _own_session.update(gcs=_gcs_address(), users=0)
            if _own_session["gcs"] is not None and _own_session["gcs"] == _gcs_address():
                _own_session["users"] += 1
                self._session = _own_session["gcs"]
        self._check_feasible()
        self._actors = [self._new_actor(config) for config in configs]
        self._actors_gcs = _gcs_address()
        refs = [a.endpoint.remote() for a in self._actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self._start_timeout)
        if pending:
            raise TimeoutError(
                f"{len(pending)} of {len(refs)} shard actors not started after {self._start_timeout} s; "
                f"each asks for {self._need()}, the cluster has {ray.available_resources()} available"
            )
        endpoints = ray.get(refs)  # raises what a shard's constructor raised
        self._channels = [
            RayChannel(a, c.index, e, self._recovery_of(c.index), self._data_path) for a, c, e in zip(self._actors, configs, endpoints)
        ]
        self._watches = [a.watch.remote() for a in self._actors]
        return list(self._channels)

    def _new_actor(self, config):
        name = {} if self._recovery is None else {"name": self._names.get(config.index, self._recovery_of(config.index).name)}
        return _ShardActor.options(max_restarts=0, **name, **self._actor_options).remote(config, self._data_path)

    def _recovery_of(self, index: int) -> Recovery | None:
        return None if self._recovery is None else self._recovery._replace(name=f"{self._recovery.name}-shard{index}")

    # -- fail-over (`ParameterServer(on_shard_failure="restart")`) ------------------------
    def expect_restarts(self, timeout: float, standby: bool = False) -> None:
        """Before `start`: shard actors are named, and clients wait up to `timeout` s for a dead one to be restarted
        (or, `standby`, taken over by its standby)."""
        name = f"jaxps-{uuid.uuid4().hex[:16]}"
        self._recovery = Recovery(timeout, name, f"{name}-given-up", standby)

    # -- hot standby (`ParameterServer(replicas=1)`) ---------------------------------------
    def start_standby(self, config) -> RayChannel:
        """A standby actor for shard `config.index`, on another node than its primary where one has the resources
        it asks for; returns the channel its primary feeds it through."""
        i = config.index
        names = self._recovery_of(i).names
        name = names[1] if self._names.get(i, names[0]) == names[0] else names[0]
        options = {**self._other_node(self._channels[i].call(Stats(), timeout=60)["where"]["node_id"]), **self._actor_options}
        actor = _ShardActor.options(max_restarts=0, name=name, **options).remote(
            dataclasses.replace(config, leaves=None, restore=None), self._data_path, True
        )
        try:
            endpoint = ray.get(actor.serving.remote(), timeout=self._start_timeout)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        channel = RayChannel(actor, i, endpoint, None, self._data_path)
        self._standbys[i] = (actor, actor.watch.remote(), channel, name)
        return channel

    def _other_node(self, node_id: str) -> dict:
        """Ray options placing an actor on a live node other than `node_id` that has what a shard asks for (if any)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        need = self._need()
        for node in ray.nodes():
            have = node.get("Resources", {})
            if node.get("Alive") and node["NodeID"] != node_id and all(have.get(k, 0) >= v for k, v in need.items()):
                return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)}
        return {}

    @property
    def standbys(self) -> dict[int, RayChannel]:
        """A channel to each shard's standby, by shard index."""
        return {i: channel for i, (_, _, channel, _) in list(self._standbys.items())}

    def dead_standbys(self) -> list[int]:
        """The shards whose standby actor is gone (they go on without one)."""
        watches = {ref: i for i, (_, ref, _, _) in list(self._standbys.items())}
        ended, _ = ray.wait(list(watches), num_returns=len(watches), timeout=0) if watches else ([], [])
        return sorted(watches[ref] for ref in ended)

    def drop_standby(self, i: int) -> None:
        """Stops (if it still runs) and forgets shard `i`'s standby."""
        actor, _, channel, _ = self._standbys.pop(i)
        channel.close()
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def promote(self, i: int) -> None:
        """Shard `i`'s primary died: its standby takes over; clients find it by its name (`Recovery.names`)."""
        actor, watch, channel, name = self._standbys[i]
        self._bury(i)
        channel.call(TakeOver(), timeout=60)
        del self._standbys[i]
        channel.close()
        endpoint = ray.get(actor.endpoint.remote(), timeout=60)
        self._actors[i], self._watches[i], self._names[i] = actor, watch, name
        self._channels[i].rebind(actor, endpoint)

    def dead(self) -> list[int]:
        """The shards whose actor is gone (killed, crashed, its node lost)."""
        if not self._watches:
            return []
        ended, _ = ray.wait(list(self._watches), num_returns=len(self._watches), timeout=0)
        return sorted(self._watches.index(ref) for ref in ended)

    def restart(self, config) -> None:
        """A new actor for shard `config.index` (from `config.restore`), wherever its resources fit, under the dead one's name."""
        i = config.index
        self._bury(i)
        for attempt in range(RESTART_TRIES):
            actor = self._new_named_actor(config)
            try:
                endpoint = ray.get(actor.endpoint.remote(), timeout=self._start_timeout)
                break
            except (RayActorError, GetTimeoutError) as e:  # e.g. placed on the node just lost, not yet marked dead
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
                if attempt == RESTART_TRIES - 1 or not isinstance(e, RayActorError) or getattr(e, "actor_init_failed", False):
                    raise  # (its shard could not start: trying again would fail alike)
                time.sleep(RESTART_PAUSE_S)
        self._actors[i], self._watches[i] = actor, actor.watch.remote()
        self._channels[i].rebind(actor, endpoint)

    def _new_named_actor(self, config):
        """`_new_actor`, once Ray has freed the dead actor's name (a moment after it stops answering; 10 s at most)."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                return self._new_actor(config)
            except ActorAlreadyExistsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _bury(self, i: int) -> None:
        """Makes sure shard `i`'s (dead) actor is gone for good, and leaves none of its shared memory behind."""
        try:
            ray.kill(self._actors[i], no_restart=True)
        except Exception:  # already gone
            pass
        _await_death([self._actors[i]], timeout=10.0)
        _sweep(self._channels[i].endpoint)

    def give_up(self, reason: str) -> None:
        """Dead shards stay dead: clients waiting for one raise `ShardDiedError(reason)`."""
        if self._recovery is not None and self._given_up is None:
            self._given_up = _GivenUp.options(name=self._recovery.given_up).remote(reason)
            ray.get(self._given_up.reason.remote())

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any], worker_options: dict | None = None) -> list:
        """Runs `run_worker(fn, client_i, arg_i)` as one Ray task each; results in order.

        Resources that no node of the cluster has are refused at once (Ray would leave the task pending forever).
        """
        options = {**self._worker_options, **(worker_options or {})}
        _check_feasible(_need(options), "each worker task")
        task = _run_worker.options(**options)
        refs = []
        try:
            for c, a in zip(clients, args):
                try:
                    refs.append(task.remote(fn, c, a))
                except TypeError as e:  # Ray's message names neither the worker nor what does not pickle
                    raise unpicklable_worker(c, fn, a, e, ray.cloudpickle.dumps, "its Ray task") from e
        except BaseException:  # (e.g. an argument Ray cannot pickle): none runs, all leave
            for ref in refs:
                ray.cancel(ref, force=True)
            for c in clients:
                leave_quietly(c)
            raise
        index, running, outcomes = {ref: i for i, ref in enumerate(refs)}, list(refs), {}
        try:  # let every worker finish, as threads would
            while running:
                # in short waits: a signal (Ctrl-C) is raised only between them
                try:
                    done, running = ray.wait(running, num_returns=1, timeout=0.2)
                except Exception:
                    if not self._closed:
                        raise
                    done = []  # (the session this transport started is being shut down)
                if self._closed and running and not done:  # (a task waiting for a shard's recovery would wait it out)
                    _cancel(running)
                    raise closed_while_running({i: error for i, (_, error) in outcomes.items() if error is not None})
                for ref in done:
                    try:
                        outcomes[index[ref]] = (ray.get(ref), None)
                    except Exception as e:
                        error = unwrap_task_error(e)
                        if isinstance(e, WorkerCrashedError):  # as multiprocessing says of a worker process that died
                            error = RuntimeError(f"worker {index[ref]}'s Ray task died ({_first_line(e)})")
                            error.__cause__ = e
                        outcomes[index[ref]] = (None, error)
                        leave_quietly(clients[index[ref]])  # a task whose process died could not leave by itself
                        worker_failed(clients[index[ref]], outcomes[index[ref]][1], bool(running))
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        for _, error in (outcomes[i] for i in range(len(refs))):
            if error is not None:
                raise error  # the first in worker order, as ray.get(refs) would
        return [outcomes[i][0] for i in range(len(refs))]

    def close(self) -> None:
        """Kills the shard actors; shuts Ray down if a transport started it and this was its last user. Idempotent."""
        self._closed = True  # (a `run_workers` under way cancels its tasks)
        actors, self._actors = self._actors, []
        channels, self._channels = self._channels, []
        self._watches = []
        standbys, self._standbys = self._standbys, {}
        for actor, _, channel, _ in standbys.values():
            actors.append(actor)
            channels.append(channel)
        if self._given_up is not None:
            actors.append(self._given_up)
            self._given_up = None
        for channel in channels:
            channel.close()
        if actors and _gcs_address() == self._actors_gcs:  # (their session may have been shut down since)
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
            _await_death(actors, timeout=10.0)
            for channel in channels:
                _sweep(channel.endpoint)
        session, self._session = self._session, None
        with _own_session_lock:
            if session is not None and session == _own_session["gcs"]:
                _own_session["users"] -= 1
                if _own_session["users"] == 0:
                    _own_session["gcs"] = None
                    if _gcs_address() == session:
                        ray.shutdown()

    def _need(self) -> dict:
        return _need(self._actor_options)

    def _check_feasible(self) -> None:
        _check_feasible(self._need(), "each shard actor")


def _need(options: dict) -> dict:
    """The resources Ray options ask for, by Ray's names."""
    need = {"CPU": options.get("num_cpus") or 0, "GPU": options.get("num_gpus") or 0, **(options.get("resources") or {})}
    return {k: v for k, v in need.items() if v}


def _check_feasible(need: dict, who: str) -> None:
    """Refuses at once resources that no node of the cluster has (Ray would wait forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        have = [{k: v for k, v in r.items() if not k.startswith("node:") and "memory" not in k} for r in nodes]
        raise ValueError(f"no node of the Ray cluster has the resources {who} asks for {need}; its nodes have {have}")
