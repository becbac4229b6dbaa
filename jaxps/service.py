"""The shard service: what a shard does with each request, whatever carried it.

A request is a small typed value (`Push`, `Pull`, `Leave`, `Join`, `Stats`,
a checkpoint's `Hold`, `Snapshot`, `WritePart`, fail-over's `RollBack`, a
reshard's `Move`, backup workers' `Lead`, `Decide`, and hot standby's
`Replicate`, `Mirror`, `TakeOver`);
arrays travel beside it (a push's gradients) and answers go back through a
`Reply` that the transport supplies. A transport decodes a request from its
wire, calls `ShardService.handle`, and ships what the reply is given: that is
all a transport does. Adding an operation is one request type and one entry
in `ShardService._ops`.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from jaxps.errors import ShardDiedError
from jaxps.shard import Shard


class Push(NamedTuple):
    """Worker `worker`'s gradients (beside the request) for step `for_step`.

    `based_on` is the version they were computed on (None: never pulled);
    `skipped` marks a push of non-finite gradients dropped by the client
    (`nonfinite="skip"`): it counts as the worker's arrival, with no gradients.
    """

    worker: int
    for_step: int
    based_on: int | None
    skipped: bool = False
    oldest: int | None = None  # the oldest version of the worker's last pull, over all shards
    rows: tuple | None = None  # a row push: ((position among the shard's leaves, local row ids), ...)
    guard: Any = None  # in-process only: (finite flags on the device, skip) of a push checked there (`Shard.push`)
    key: tuple | None = None  # (client id, push number): a push sent again to a standby that took over is applied once


class Pull(NamedTuple):
    """The shard's leaves, once `worker` may read (at once for `worker=None`) at version `at_least` or later.

    Answers `(version, leaves)`, or `(version, None)` if that is version
    `have`, whose leaves the client holds already: no array crosses. With
    `rows` (`((position, local row ids), ...)`), those leaves are answered as
    just those rows, every leaf copied into the answer itself.
    """

    worker: int | None
    at_least: int = 0
    have: int | None = None
    rows: tuple | None = None


class Leave(NamedTuple):
    """`worker` is done: sync steps and ssp pulls stop waiting for it; answers None."""

    worker: int


class Join(NamedTuple):
    """`workers` take part (again) from the current version, or (sync) from step `at`, ending a `Hold`;
    answers the step each one's first push is for."""

    workers: tuple[int, ...]
    at: int | None = None


class Stats(NamedTuple):
    """The shard's clock and counters; answers a dict."""


class Hold(NamedTuple):
    """A checkpoint begins: the shard stops where it is; answers its mark (`jaxps.consistency`).

    With `joining` (sync): workers are about to join; answers the first step they could all join at here.
    """

    joining: tuple[int, ...] = ()


class Snapshot(NamedTuple):
    """Go on to the cut `target` and snapshot there (kept on the shard for `WritePart`), then go on.

    Answers `{"step", "version"}` once the snapshot is taken (`{"error"}` if it
    failed). `target=None` ends the hold without a snapshot (or a reshard's stay
    at its cut). `freeze` (a reshard): stay at the cut until `Move`; the answer
    adds the `"clock"` the new shards start with.
    """

    target: Any
    freeze: bool = False


class WritePart(NamedTuple):
    """Write the snapshot as part `shard index` of `step` in `directory`, off the shard's lock, in the shard's process.

    Answers None once the part is durable, or the error's text. `directory=None` drops the snapshot.
    """

    directory: str | None
    step: int


class RollBack(NamedTuple):
    """Another shard died: go back to checkpoint `step` in `directory` and go on at version `version`; answers None.

    Pushes not yet settled answer "rolled_back", and so does every later push
    computed before it (`jaxps.consistency.Clock.rolled_back`).
    """

    directory: str
    step: int
    version: int
    clock: Any = None  # a reshard's new shard: the clock to go on with (`Clock.moved`), not a rolled-back one
    index: Any = None  # the step's `checkpoint.read_index`, read once by the driver for every shard (or None)


class Route(NamedTuple):
    """Where a resharded server's shards are now: the `generation`-th plan and a channel to each of its shards."""

    generation: int
    plan: Any
    channels: tuple


class Moved(NamedTuple):
    """The answer of a shard resharded away to every push, pull and leave: send it again along `route`."""

    route: Route


class Move(NamedTuple):
    """A reshard: the shard, frozen at the cut (`Snapshot(target, freeze=True)`), hands over to `route`'s shards;
    from now on every request but `Stats` is answered `Moved(route)`. Answers None."""

    route: Route


class Lead(NamedTuple):
    """Sync with backup workers: tell `followers` (channels to the other shards) which workers each step takes.

    Sent once, to shard 0, when the server starts; answers None. From then on
    the shard sends a `Decide` to every follower for each step it closes, from
    a thread of its own, in step order.
    """

    followers: tuple


class Decide(NamedTuple):
    """A following shard's step `version` takes the pushes of `workers` (the leader's), and drops the others'; answers None."""

    version: int
    workers: tuple[int, ...]


SEND_AGAIN = "send_again"  # a push's answer from a channel whose shard died with it, where a standby takes over


class LostWithShard(Exception):
    """Raised by a channel's `stage` that finds its shard taken over by a standby: the client sends its lost
    pushes again first (`Client.send_again`), then this one."""


class Replicate(NamedTuple):
    """Hot standby: stream every change of this shard to `channel`'s standby (`Mirror`), starting with its whole
    state; answers None. Sent again (a new standby, or after a rollback) it starts over there."""

    channel: Any


class Mirror(NamedTuple):
    """A primary's changes, in order, to its standby: `state` (the first: the primary's whole state, path-keyed),
    then the mean gradients of each step it applied (host arrays, per step), the clock after them, and the
    pushes answered meanwhile as `(key, outcome)`; answers None once carried out."""

    steps: tuple
    clock: Any
    answered: tuple
    state: dict | None = None


class TakeOver(NamedTuple):
    """The primary died: this standby becomes the shard, where the primary was reached; answers None."""


REQUESTS = (Push, Pull, Leave, Join, Stats, Hold, Snapshot, WritePart, RollBack, Move, Lead, Decide, Replicate, Mirror, TakeOver)

# Fail-over: what a channel sends again to a restarted shard when the dead one took a request with it.
# A push is never sent again (it answers "rolled_back"); a checkpoint's or fail-over's own requests fail
# (the driver starts them over): a `Replicate` waiting for a recovery would wait for the supervisor that sent it.
RESENT_AFTER_RESTART = (Pull, Join, Leave, Stats, Decide)


def lost_answer(request: Any, standby: bool) -> Any:
    """A request's answer when its shard died with it, where shards are restarted (None: sent again to the new one).

    From a checkpoint, a push is "rolled_back". Where a standby takes over, a client's push, pull and leave
    answer `SEND_AGAIN`: the client sends its lost pushes again first, in order, then the rest
    (`Client.send_again`), so that no step waits for a push that died with the shard.
    """
    if isinstance(request, Push):
        return SEND_AGAIN if standby else "rolled_back"
    if standby and isinstance(request, (Pull, Leave)):
        return SEND_AGAIN
    return None


def shorter(a: float | None, b: float | None) -> float | None:
    """The shorter of two timeouts (None: no limit)."""
    return b if a is None else a if b is None else min(a, b)


def recovery_deadline(index: int, recovery_timeout: float, timeout: float | None) -> tuple[float, Exception]:
    """Until when a channel waits for shard `index` to be recovered, and what it raises then: the caller's own
    `timeout`, if shorter, ends the wait with `TimeoutError` (the supervisor's requests must not wait out the
    recovery it runs), the recovery's with `ShardDiedError`."""
    if timeout is not None and timeout < recovery_timeout:
        return time.monotonic() + timeout, TimeoutError(f"shard {index} died and was not back within {timeout:.3g} s (it is being recovered)")
    return time.monotonic() + recovery_timeout, ShardDiedError(f"shard {index} died and was not back within {recovery_timeout:g} s")


def died_during_request(index: int, standby: bool) -> ShardDiedError:
    """What a request to shard `index` raises when the shard died while it was under way (it is being recovered)."""
    if standby:  # a standby may be gone too, or not yet hold its primary's state
        how = "taken over by its standby (without a live one: restarted from the latest checkpoint, if there is one)"
    else:
        how = "restarted from the latest checkpoint"
    return ShardDiedError(f"shard {index} died during this request; it is being {how}")


class Reply:
    """Where one request's answer goes; each transport (and data path) has its own.

    `borrowed`: a push's arrays are views of a buffer the client writes again
    once `taken()` (or `send`) is called, so the shard must copy what it keeps.
    `lend`: a pull's leaves may be handed out as they are (in-process); if
    False, `pulled` must copy them before it returns (the shard's next step
    may donate their buffers).
    """

    borrowed = False
    lend = False

    def send(self, value: Any) -> None:
        """The request's answer (for a push: "applied", "dropped" or "skipped")."""
        raise NotImplementedError

    def pulled(self, version: int, leaves: list) -> None:
        """A pull's answer; called under the shard's lock, so the leaves are one consistent version."""
        self.send((version, leaves))

    def taken(self) -> None:
        """A push's borrowed arrays are no longer read (its outcome comes later, by `send`)."""


def own_copy(x: Any) -> jax.Array:
    """A jax array holding a private, 64-byte aligned copy of `x` (JAX on CPU adopts it without a second copy)."""
    x = np.asarray(x)
    raw = np.empty(x.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    np.copyto(out, x)
    return jax.device_put(out)


class ShardService:
    """Carries out requests on one `Shard`; thread-safe (the shard is).

    `where`: how to find the shard, for `Stats` (its process id; a transport adds its own ids, e.g. Ray's actor and node).
    """

    def __init__(self, shard: Shard, where: dict | None = None):
        self.shard = shard
        self.where = {"pid": os.getpid(), "host": socket.gethostname(), "platform": jax.default_backend(), **(where or {})}
        self._ops = {
            Push: self._push,
            Pull: self._pull,
            Leave: self._leave,
            Join: self._join,
            Stats: self._stats,
            Hold: self._hold,
            Snapshot: self._snapshot,
            WritePart: self._write_part,
            RollBack: self._roll_back,
            Move: self._move,
            Lead: self._lead,
            Decide: self._decide,
            Replicate: self._replicate,
            Mirror: self._mirror,
            TakeOver: self._take_over,
        }
        self._bytes = {"bytes_pushed": 0, "bytes_pulled": 0}  # array bytes that crossed to and from clients
        self._bytes_lock = threading.Lock()
        self._saved: dict | None = None  # the last snapshot, until written
        self._decisions: queue.SimpleQueue | None = None  # a leader's steps, on their way to the followers
        self._moved: Moved | None = None  # resharded away: what every request but `Stats` is answered
        self._stream: Any = None  # hot standby: the `jaxps.replication.Stream` to this shard's standby
        self.on_take_over: Callable[[], None] | None = None  # a standby's transport: serve where the primary was

    def handle(self, request: Any, reply: Reply, arrays: Sequence[Any] | None = None) -> None:
        """Carries out `request` (with a push's gradient `arrays`); the answer goes to `reply`, now or later."""
        op = self._ops.get(type(request))
        if op is None:
            raise TypeError(f"shard {self.shard.index}: unknown request {request!r}; known: {[r.__name__ for r in REQUESTS]}")
        if self._moved is not None and op is not self._stats:
            return reply.send(self._moved)
        if self._stream is not None and not isinstance(request, UNMIRRORED):  # answered once the standby has the change
            reply = _AfterStandby(self, reply)
        op(request, reply, arrays)

    def after_standby(self, answer: Callable[[], None]) -> None:
        """Calls `answer` once the standby has every change made so far (at once without one)."""
        with self.shard._lock:
            stream = self._stream
            if stream is not None and stream.after(answer):
                return
        answer()

    def _push(self, request: Push, reply: Reply, arrays: Sequence[Any] | None) -> None:
        # Keep or borrow: a shard that keeps gradients past the call (sync mode) copies
        # borrowed arrays; otherwise the step reads them in place, and the client hears
        # back (so may reuse its buffer) only once the step has run.
        if not request.skipped and arrays is None:
            raise ValueError(f"shard {self.shard.index}: a push without gradients")
        if request.key is not None:  # sent again after a take-over: this standby may have applied it already
            outcome = self.shard.answered(request.key)  # (at once, without the lock, on a shard that never took over)
            if outcome is not None:
                return reply.send(outcome)
        if request.skipped:
            grads = None
        elif reply.borrowed:
            keep = self.shard.keeps_gradients
            grads = [own_copy(x) for x in arrays] if keep else jax.device_put(list(arrays))  # one call for all leaves
        else:
            grads = list(arrays)
        lock, early = threading.Lock(), []  # outcomes settled before the step has run

        def done(outcome: str) -> None:
            with lock:
                if early is not None:
                    early.append(outcome)
                    return
            reply.send(outcome)

        rows = None if request.rows is None else dict(request.rows)
        self.shard.push(request.worker, request.for_step, request.based_on, grads, done, request.oldest, rows, request.guard, request.key)
        if grads is not None:
            self._count("bytes_pushed", arrays)
        del grads, arrays
        if reply.borrowed and not self.shard.keeps_gradients:
            self.shard.block_until_ready()
        with lock:
            settled, early = early, None
        if settled:
            reply.send(settled[0])
        else:
            reply.taken()

    def _pull(self, request: Pull, reply: Reply, arrays: Any) -> None:
        def ready(version: int, leaves: list) -> None:
            if request.rows is not None:  # copied here, under the shard's lock: the next step may donate
                leaves = self.shard.rows_of(leaves, dict(request.rows))
                self._count("bytes_pulled", leaves)
                return reply.send((version, leaves))
            if version == request.have:  # the client holds these leaves already
                return reply.send((version, None))
            self._count("bytes_pulled", leaves)
            reply.pulled(version, leaves)

        lend = reply.lend and request.rows is None
        self.shard.pull(request.worker, ready, lend=lend, at_least=request.at_least, moved=reply.send)

    def _count(self, what: str, arrays: Sequence[Any]) -> None:
        n = sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays)  # not jax's slower .nbytes, nor np.shape
        with self._bytes_lock:
            self._bytes[what] += n

    def _leave(self, request: Leave, reply: Reply, arrays: Any) -> None:
        self.shard.leave(request.worker, reply.send)

    def _join(self, request: Join, reply: Reply, arrays: Any) -> None:
        reply.send(self.shard.join(request.workers, request.at))

    def _stats(self, request: Stats, reply: Reply, arrays: Any) -> None:
        with self._bytes_lock:
            counted = dict(self._bytes)
        lost = {} if self._stream is None or not self._stream.failed else {"standby_lost": self._stream.failed}
        reply.send({**self.shard.stats(), **counted, **lost, "where": dict(self.where)})

    def _hold(self, request: Hold, reply: Reply, arrays: Any) -> None:
        reply.send(self.shard.hold(request.joining))

    def _snapshot(self, request: Snapshot, reply: Reply, arrays: Any) -> None:
        if request.target is None:
            self.shard.release()
            return reply.send(None)

        def taken(state: dict | None, info: dict) -> None:
            self._saved = state
            reply.send(info)

        self.shard.cut(request.target, taken, request.freeze)

    def _write_part(self, request: WritePart, reply: Reply, arrays: Any) -> None:
        state, self._saved = self._saved, None
        if request.directory is None:
            self.shard.done_with(state)
            return reply.send(None)
        if state is None:
            return reply.send(f"shard {self.shard.index} holds no snapshot to write")

        def write() -> None:  # a thread of the shard's process: the shard goes on meanwhile
            from jaxps.checkpoint import write_part

            try:  # only on CPU time training leaves idle (Linux: per thread; also the I/O threads it starts)
                os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
            except (AttributeError, OSError):
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                except (AttributeError, OSError):
                    pass
            try:
                write_part(request.directory, request.step, self.shard.index, state)
            except Exception:
                return reply.send(f"shard {self.shard.index} could not write its part:\n{traceback.format_exc()}")
            self.shard.done_with(state)
            reply.send(None)

        threading.Thread(target=write, name=f"jaxps-shard{self.shard.index}-checkpoint", daemon=True).start()

    def _roll_back(self, request: RollBack, reply: Reply, arrays: Any) -> None:
        self._saved = None
        with self.shard._lock:  # a standby starts over from the rolled-back state
            self.shard.roll_back(request.directory, request.step, request.version, request.clock, request.index)
            if self._stream is not None and not self._stream.failed:
                self._restream(self._stream.channel)
        reply.send(None)

    def _move(self, request: Move, reply: Reply, arrays: Any) -> None:
        self._saved = None
        moved = Moved(request.route)
        self.shard.move(moved)
        self._moved = moved
        reply.send(None)

    def _replicate(self, request: Replicate, reply: Reply, arrays: Any) -> None:
        with self.shard._lock:  # from this change on, every one goes to the new standby
            self._restream(request.channel)
        self.after_standby(lambda: reply.send(None))  # once the standby has the whole state

    def _restream(self, channel: Any) -> None:
        """Feeds the standby behind `channel` (None: none) from now on, starting with the whole state (under the lock)."""
        from jaxps.replication import Stream

        previous = self._stream
        self._stream = None if channel is None else Stream(self.shard, channel, after=previous)
        if previous is not None:
            previous.stop(successor=self._stream)

    def _mirror(self, request: Mirror, reply: Reply, arrays: Any) -> None:
        self.shard.mirror(request.steps, request.clock, request.answered, request.state)
        reply.send(None)

    def _take_over(self, request: TakeOver, reply: Reply, arrays: Any) -> None:
        self.shard.take_over()
        if self.on_take_over is not None:
            self.on_take_over()
        reply.send(None)

    def _lead(self, request: Lead, reply: Reply, arrays: Any) -> None:
        if self._decisions is not None:
            raise RuntimeError(f"shard {self.shard.index} already leads")
        self._decisions = queue.SimpleQueue()
        threading.Thread(
            target=_send_decisions,
            args=(self.shard.index, self._decisions, list(request.followers)),
            name=f"jaxps-shard{self.shard.index}-decisions",
            daemon=True,
        ).start()
        self.shard.on_step = lambda version, workers: self._decisions.put(Decide(version, workers))
        reply.send(None)

    def _decide(self, request: Decide, reply: Reply, arrays: Any) -> None:
        self.shard.decide(request.version, request.workers)
        reply.send(None)


# requests answered at once even while a standby is fed: they change nothing it must have
UNMIRRORED = (Pull, Stats, WritePart, Replicate, Mirror, TakeOver)


class _AfterStandby(Reply):
    """A reply of a shard with a standby: each answer waits until the standby has every change made before it."""

    def __init__(self, service: ShardService, reply: Reply):
        self._service, self._reply = service, reply
        self.borrowed, self.lend = reply.borrowed, reply.lend

    def send(self, value: Any) -> None:
        self._service.after_standby(lambda: self._reply.send(value))

    def taken(self) -> None:
        self._reply.taken()

    def pulled(self, version: int, leaves: list) -> None:
        self._reply.pulled(version, leaves)


def _send_decisions(index: int, decisions: queue.SimpleQueue, followers: list) -> None:
    """A leader's thread: sends each step's `Decide` to every follower, in order, until the followers are closed or gone."""
    while True:
        try:
            decision = decisions.get(timeout=1.0)
        except queue.Empty:
            if any(f.closed for f in followers):  # the server was closed (in-process: no process ends with it)
                return
            continue
        try:
            for answer in [f.submit(decision) for f in followers]:
                answer.result()
        except Exception as e:  # a follower is gone: its clients hear it from their own channels
            if not any(f.closed for f in followers):
                print(f"jaxps: shard {index} stops sending step decisions: {type(e).__name__}: {e}", file=sys.stderr)
            return
