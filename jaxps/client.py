"""A worker's handle on the parameter server: pull the whole tree, push gradients.

A client splits a pushed tree by the plan, sends each shard its leaves, and
merges the shards' leaves on pull. It is picklable whenever the transport's
channels are (multiprocessing, Ray), so it can travel into the worker.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import inspect
import sys
import time
import uuid
import weakref
from typing import Any, Sequence

import jax
import numpy as np

from jaxps import rows as row_ops
from jaxps.coding import Encoder
from jaxps.errors import ServerClosedError
from jaxps.plan import Plan
from jaxps.service import SEND_AGAIN, Leave, LostWithShard, Moved, Pull, Push, Route
from jaxps.validate import (
    PushError,
    cast,
    check_gradients,
    check_leaves,
    check_structure,
    finite_flags,
    float_positions,
    nonfinite_error,
    nonfinite_paths,
    reject_nonfinite,
)


def _to_device(x: Any) -> jax.Array:
    """A pulled array as a jax array, with no program compiled per shape (rows vary from pull to pull)."""
    return x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))


# a push waits for the device checks of this worker's unasked pushes but the newest UNASKED_WAITING (and
# raises a refused one's error): the host may run that many pushes ahead of the checks
UNASKED_WAITING = 1
MOVED_TIMEOUT = 60.0  # seconds a resharded-away shard takes to answer what it holds (it answers at once)


def moved_in(answers: Sequence[Any]) -> Moved | None:
    """The `Moved` among shards' answers (the server was resharded), if there is one."""
    return next((a for a in answers if isinstance(a, Moved)), None)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (a `time.monotonic()` value; None: no limit)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def gather(waits: Sequence[Any], timeout: float | None = None, what: str = "the request") -> list:
    """The results of `waits`, in order, all within `timeout` seconds in total (else a `TimeoutError` naming `what`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return [w.result(remaining(deadline)) for w in waits]
    except (TimeoutError, concurrent.futures.TimeoutError) as e:  # (one class from Python 3.11 on)
        if timeout is None:  # (a wait of its own ran out, e.g. for a shard being recovered: it says which)
            raise
        raise TimeoutError(f"{what} got no answer within {timeout:.3g} s" + (f": {e}" if str(e) else "")) from None


@dataclasses.dataclass
class Guard:
    """A push's NaN/Inf check, still running on the device: whether each leaf at `paths` is finite."""

    flags: jax.Array
    paths: list[str]
    skip: bool  # nonfinite="skip": a non-finite push is skipped, not refused
    plan: Plan

    def error(self) -> PushError | None:
        """The error refusing the push, if a leaf holds NaN or Inf (waits for the check)."""
        bad = [path for path, ok in zip(self.paths, np.asarray(self.flags)) if not ok]
        return nonfinite_error(self.plan, bad) if bad else None


@dataclasses.dataclass
class Sent:
    """What a push sent, kept until every shard has answered it, to send it again if the server was resharded
    meanwhile (`Client.follow`) or a shard's standby took over (`Client.send_again`)."""

    leaves: list | None  # the checked gradients, in plan order (None: a skipped push)
    for_step: int
    oldest: int | None
    guard: tuple | None  # (flags, skip) of a push checked on the device
    requests: list  # the `Push` each shard was sent


def answer_of(part: Any) -> Any:
    """A shard's answer to a push, if it is in (None if not, or if it is an error: the push's `result()` raises it)."""
    try:
        return part.result(0) if part.done() else None
    except Exception:
        return None


class PushFuture:
    """Completes when every shard has applied (or dropped) the push.

    `result()` is 'applied', 'dropped' (some shard had already closed the step),
    'skipped' (non-finite gradients with `nonfinite='skip'`) or 'rolled_back'
    (a shard died and every shard went back to a checkpoint before this push
    was applied, or it was computed on parameters from before that). A push
    checked on the device (`guard`) raises `jaxps.PushError` here if it held
    NaN or Inf (with `nonfinite='raise'`). A push that reaches a server
    resharded meanwhile is sent again, to the new shards, and answered by them.
    """

    def __init__(self, parts: Sequence[Any], guard: Guard | None = None, client: "Client | None" = None, sent: Sent | None = None):
        self._parts = list(parts)
        self._guard = guard
        self._client, self.sent = client, sent
        self._outcome: str | None = None
        self._error: PushError | None = None
        self.observed = False  # whether `result()` has been asked

    def moved(self, timeout: float | None = None) -> Moved | None:
        """The `Moved` among the shards' answers, if one was (waits for them all)."""
        return moved_in(gather(self._parts, timeout))

    def result(self, timeout: float | None = None) -> str:
        self.observed = True
        if self._outcome is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            outcomes = gather(self._parts, timeout, "the push")
            while (moved := moved_in(outcomes)) is not None or SEND_AGAIN in outcomes:
                parts = list(self._parts)
                if moved is not None:  # resharded: sent again along the route
                    self._client.follow(moved.route)
                else:  # a shard died with it and its standby took over: sent again to that one
                    self._client.send_again()
                if self._parts == parts:
                    raise RuntimeError(f"a push answered {outcomes} was not sent again")  # a bug if ever seen
                outcomes = gather(self._parts, remaining(deadline))
            self.sent = None  # answered: it will not be sent again
            outcome = next((o for o in ("rolled_back", "dropped", "skipped") if o in outcomes), "applied")
            if outcome == "applied" and self._guard is not None:
                self._error = self._guard.error()
                if self._error is not None and self._guard.skip:
                    outcome, self._error = "skipped", None
            self._outcome = outcome
        if self._error is not None:
            raise self._error
        return self._outcome

    def done(self) -> bool:
        return self._outcome is not None or all(p.done() for p in self._parts)

    def checked(self) -> bool:
        """Whether `result()` would not wait: done, and its device check (if any) is back."""
        return self.done() and (self._guard is None or self._guard.flags.is_ready())


@dataclasses.dataclass
class ShardLink:
    """A client's line to one shard and what it has seen of that shard's clock."""

    channel: Any  # a jaxps.transport.ShardChannel
    pulled: int | None = None  # the version pulled since the last push (None: no pull since)
    based_on: int | None = None  # the version of the last pull
    last_step: int | None = None  # the step the last push was for
    # (version, weak references to the leaves) of the last pull: while the caller still holds those
    # leaves, a pull that finds the shard at that version moves nothing and gives them again
    held: tuple[int, list] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "held": None}  # weak references stay in their process

    def holding(self) -> tuple[int | None, list | None]:
        """The version whose leaves the caller still holds, and those leaves (None, None: not all of them, or one
        was deleted: donated to a jitted call)."""
        if self.held is None:
            return None, None
        leaves = [ref() for ref in self.held[1]]
        gone = any(x is None or (isinstance(x, jax.Array) and x.is_deleted()) for x in leaves)
        return (None, None) if gone else (self.held[0], leaves)

    def took(self, version: int, leaves: list | None, held: list | None) -> list:
        """Notes a pull's answer (`leaves` None: those `held`); returns the leaves."""
        leaves = held if leaves is None else leaves
        self.pulled = self.based_on = version
        self.held = (version, [weakref.ref(x) for x in leaves])
        return leaves

    def next_step(self) -> int:
        """The step a push now is for: the version last pulled, else the one after the last push's."""
        if self.pulled is not None:
            return self.pulled
        return 0 if self.last_step is None else self.last_step + 1


class _Moved(Exception):
    """A shard answered `Moved`: the pull starts again along the route."""

    def __init__(self, route: Route):
        self.route = route


class _SendAgain(Exception):
    """A shard died with the pull, and its standby took over: the client's lost pushes go first, then the pull again."""


def _check_moved(answers: Sequence[Any]) -> None:
    moved = moved_in(answers)
    if moved is not None:
        raise _Moved(moved.route)
    if any(isinstance(a, str) and a == SEND_AGAIN for a in answers):
        raise _SendAgain()


class Client:
    """Worker `worker`'s view of the server. Use it from one thread at a time."""

    def __init__(
        self,
        worker: int,
        plan: Plan,
        channels: Sequence[Any],
        nonfinite: str = "raise",
        versions: Sequence[int | None] | None = None,
        sync: bool = False,
        encoder: Encoder | None = None,
        generation: int = 0,
        resend: bool = False,
        standby: bool = False,
    ):
        """`versions`: each shard's version when the worker (re)joined; a push before any pull is for that step.

        `sync`: the server is in sync mode, where every shard counts the same
        steps: a pull gets one version from every shard, a push is for one step.
        `encoder`: the server's push filter, with this worker's filter state.
        `generation`: of the server's plan (`ParameterServer.reshard`); `resend`: the
        server can be resharded, so each push is kept until answered, to be sent again.
        `standby`: the server keeps standbys (`replicas=1`): pushes lost with a shard are sent again before
        anything else.
        """
        self.worker = worker
        self.plan = plan
        self._nonfinite = nonfinite
        self._sync = sync
        self._encoder = encoder
        versions = versions or [None] * len(channels)
        self._links = [ShardLink(ch, last_step=None if v is None else v - 1) for ch, v in zip(channels, versions)]
        self._left = False
        self.replaced = False  # the server gave this worker a newer client (`run_workers`, `ps.client`): this one is done
        self.sent_away = False  # pickled (to another process): that copy, not this one, may leave
        self._interrupted = False
        self._floats = float_positions(plan.leaves)  # the leaves a NaN/Inf check looks at
        # pushes checked on the device whose result nobody has asked yet, oldest first (see `push`)
        self._unasked: collections.deque[PushFuture] = collections.deque()
        self._generation = generation  # of the plan this client talks to (`follow`)
        self._resend = resend
        self._standby = standby
        self._unanswered: collections.deque[PushFuture] = collections.deque()  # pushes not yet answered by every shard
        self._key, self._pushes = uuid.uuid4().hex, 0  # each push's key: (this client, its number)

    @property
    def channels(self) -> list:
        """The channels to the shards, by shard index."""
        return [link.channel for link in self._links]

    def pull(self, timeout: float | None = None, rows: dict | None = None) -> Any:
        """The current parameters, as a tree like the initial one.

        Sees every earlier push of this client; in sync mode waits until the
        step of the last push is applied (and gets one version from every
        shard), in ssp mode while this worker is too far ahead of the slowest.
        `timeout` bounds the whole call.

        `rows={path: ids}`: each named row leaf comes as `table[ids]` (one row
        per id, in order, repeats allowed); only the shards holding those rows
        (or other leaves) are asked, each for its distinct rows.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._forget_answered()
        while True:
            try:
                return self._pull_all(deadline) if rows is None else self._pull_rows(rows, deadline)
            except _Moved as moved:  # resharded: again, from the new shards
                self.follow(moved.route)
            except _SendAgain:  # a standby took over: the pushes it lost, then the pull again
                self.send_again()

    def _pull_all(self, deadline: float | None) -> Any:
        held = [link.holding() for link in self._links]  # held strongly until the answers are in
        replies = self._fetch({s: {"have": v} for s, (v, _) in enumerate(held)}, deadline)
        per_shard = [link.took(version, leaves, h) for link, (version, leaves), (_, h) in zip(self._links, replies.values(), held)]
        return self.plan.merge(per_shard)

    def _fetch(self, asks: dict[int, dict], deadline: float | None) -> dict[int, tuple[int, Any]]:
        """`Pull(self.worker, **asks[s])` of each shard `s`; in sync mode, one version from all of them."""
        waits = [self._links[s].channel.submit(Pull(self.worker, **ask), timeout=remaining(deadline)) for s, ask in asks.items()]
        what = f"worker {self.worker}'s pull" + (" (in sync mode it waits for the step of the worker's last push)" if self._sync else "")
        replies = dict(zip(asks, gather(waits, remaining(deadline), what)))
        _check_moved(replies.values())
        while self._sync:
            # a shard is still closing a step the others have closed (backup workers): its next version, please;
            # it may answer a later one still (the others went on meanwhile), so ask until all agree
            newest = max(version for version, _ in replies.values())
            behind = [s for s, (version, _) in replies.items() if version < newest]
            if not behind:
                break
            again = [
                self._links[s].channel.submit(Pull(self.worker, newest, **asks[s]), timeout=remaining(deadline)) for s in behind
            ]
            replies.update(zip(behind, gather(again, remaining(deadline), what)))
            _check_moved(replies.values())
        return replies

    def _pull_rows(self, rows: dict, deadline: float | None) -> Any:
        plan = self.plan
        wanted = row_ops.check_ids(plan, rows, ValueError)
        asks: dict[int, dict[int, np.ndarray]] = {s: {} for s in range(len(self._links))}
        grouped = {}
        for i, ids in wanted.items():
            distinct, inverse = np.unique(ids, return_inverse=True)
            grouped[i] = (inverse, row_ops.by_shard(plan, i, distinct))
            for s in range(plan.num_shards):
                if i in plan.shard_leaves[s]:
                    asks[s][plan.shard_leaves[s].index(i)] = np.zeros(0, np.int32)
            for s, local, _ in grouped[i][1]:
                asks[s][plan.shard_leaves[s].index(i)] = local
        # a shard is asked if it holds rows asked for, or leaves pulled whole
        needed = {
            s: {"rows": tuple(ask.items())}
            for s, ask in asks.items()
            if any(len(ids) for ids in ask.values()) or len(ask) < len(plan.shard_leaves[s])
        }
        if not needed and self._sync:  # no rows at all: one shard still says when the step is done, as any sync pull waits
            needed = {0: {"rows": tuple(asks[0].items())}}
        replies = self._fetch(needed, deadline)
        flat: list[Any] = [None] * len(plan.leaves)
        parts: dict[int, list] = {}
        for s, (version, leaves) in replies.items():
            self._links[s].pulled = self._links[s].based_on = version
            for i, x in zip(plan.shard_leaves[s], leaves):
                if plan.is_rows(i):
                    parts.setdefault(i, []).append(np.asarray(x))
                else:
                    flat[i] = _to_device(x)
        for i, pieces in parts.items():
            joined = np.concatenate(pieces)
            flat[i] = _to_device(joined[grouped[i][0]] if i in grouped else joined)
        for i in grouped:
            if flat[i] is None:  # no ids at all
                spec = plan.leaves[i]
                flat[i] = _to_device(np.zeros((0, *spec.shape[1:]), spec.dtype))
        return jax.tree_util.tree_unflatten(plan.treedef, flat)

    def push(self, grads: Any, rows: dict | None = None) -> PushFuture:
        """Sends gradients for the parameters last pulled; checks them first.

        All or nothing: every leaf is converted and checked (and staged) before
        any shard sees any of it; a bad tree raises `jaxps.PushError` naming
        the paths, shapes and dtypes at fault, and no shard changes (nor does
        the push filter's state).

        NaN and Inf are checked here too, except in one case: on the in-process
        transport in async and ssp mode, gradients that are jax arrays are
        checked on the device, inside the shards' step (nothing waits for
        `jax.grad` to finish): a non-finite push changes nothing on any shard,
        and its future's `result()` raises the `PushError` (or says "skipped").
        If nobody asks, a later push of this worker raises it, before sending
        anything: the first once the check is back, at the latest the second
        push after it (or its `leave`, as `run_workers` ends, once it has left).

        `rows={path: ids}`: each named row leaf's gradient is one row per id
        (rows of a repeated id add up); only those rows, and their optimizer
        state, change (a lazy update).
        """
        self._check_open()
        self._raise_unasked("this push was not sent", waiting=UNASKED_WAITING)
        while True:
            self._forget_answered()  # (with standbys: the pushes lost with a shard are sent again first)
            try:
                return self._push(grads, rows)
            except LostWithShard:  # found while staging this one: those first, then this one again
                continue

    def _push(self, grads: Any, rows: dict | None) -> PushFuture:
        if rows is not None:
            return self._push_rows(grads, rows)
        leaves = check_gradients(self.plan, grads)
        check = self._nonfinite != "allow"
        if self._encoder is None:
            per_shard = self.plan.split(leaves)
            guard = self._device_check(leaves) if check else None
            staged = [link.channel.stage(part, check and guard is None) for link, part in zip(self._links, per_shard)]
            if guard is not None:  # checked in the shards' step: reported through the future
                future = self._send(staged, False, guard=guard, leaves=leaves)
                self._unasked.append(future)
                return future
            skipped = check and reject_nonfinite(self.plan, self._nonfinite_paths(per_shard, staged), self._nonfinite)
            return self._send(staged, skipped, leaves=None if skipped else leaves)
        # filtered: NaN/Inf are looked for in the gradients, before they are encoded
        skipped = check and reject_nonfinite(self.plan, nonfinite_paths(self.plan.leaves, leaves), self._nonfinite)
        if skipped:
            return self._send([None] * len(self._links), True)
        per_shard, state, spoiled = self._encoder.encode(leaves)
        if check and spoiled:  # finite gradients the filter made NaN or Inf: refused (or skipped) as those are
            shown = [f"{s.path} ({s.describe()})" for s in (self.plan.leaves[i] for i in spoiled)]
            if self._nonfinite == "raise":
                raise PushError(
                    f"push rejected, nothing was changed: the push filter made NaN or Inf of finite gradients in "
                    f"{shown[:10]} (a cast overflows: float16 holds at most 65504; scale the gradients down, or use "
                    "bfloat16); pass nonfinite='skip' to ParameterServer to skip such pushes instead, or "
                    "nonfinite='allow' for a filter whose payload may hold them"
                )
            return self._send([None] * len(self._links), True)
        staged = [link.channel.stage(part, False) for link, part in zip(self._links, per_shard)]
        future = self._send(staged, False)
        self._encoder.state = state
        return future

    def _push_rows(self, grads: Any, rows: dict) -> PushFuture:
        plan = self.plan
        wanted = row_ops.check_ids(plan, rows, PushError)
        leaves = check_structure(plan, grads)
        specs = list(plan.leaves)
        for i, ids in wanted.items():
            row_ops.check_values(specs[i], ids, leaves[i], PushError)
            specs[i] = dataclasses.replace(specs[i], shape=(len(ids), *specs[i].shape[1:]))
        check_leaves(specs, leaves)
        leaves = cast(specs, leaves)
        skipped = self._nonfinite != "allow" and reject_nonfinite(plan, nonfinite_paths(specs, leaves), self._nonfinite)
        if skipped:
            return self._send([None] * len(self._links), True)
        staged, row_ids = [], []
        summed = {i: row_ops.sum_by_row(ids, leaves[i]) for i, ids in wanted.items()}
        # per row leaf and shard: (local ids, where in the distinct ids); a shard none of whose rows were pushed gets none
        parts = {i: {s: (local, at) for s, local, at in row_ops.by_shard(plan, i, distinct)} for i, (distinct, _) in summed.items()}
        for s, link in enumerate(self._links):
            arrays, ids_here = [], []
            for k, i in enumerate(plan.shard_leaves[s]):
                if i not in summed:
                    arrays.append(plan.split_leaf(leaves[i], i, s))
                    continue
                local, at = parts[i].get(s, (np.zeros(0, np.int32), slice(0, 0)))
                ids_here.append((k, local))
                arrays.append(summed[i][1][at])
            staged.append(link.channel.stage(arrays, False))
            row_ids.append(tuple(ids_here) or None)
        return self._send(staged, False, row_ids)

    @property
    def filter_state(self) -> list | None:
        """This worker's push filter state, per leaf (None: no filter, or no push yet).

        It starts afresh with each client (a worker that leaves and comes back
        starts with none); to carry it over, set it on the new client:
        `new.filter_state = old.filter_state`.
        """
        return None if self._encoder is None else self._encoder.state

    @filter_state.setter
    def filter_state(self, state: list | None) -> None:
        if self._encoder is None:
            raise ValueError("this server has no push_filter")
        self._encoder.state = state

    def _device_check(self, leaves: list) -> Guard | None:
        """The NaN/Inf check of a push, on the device, where the shards can take it (see `push`); else None."""
        if self._sync or not all(link.channel.checks_on_device for link in self._links):
            return None  # a sync step means several workers' pushes; other transports check while copying
        floats = self._floats
        if not floats or not all(isinstance(leaves[i], jax.Array) for i in floats):
            return None  # host arrays are checked at once: there is nothing to wait for
        flags = finite_flags([leaves[i] for i in floats])
        return Guard(flags, [self.plan.leaves[i].path for i in floats], self._nonfinite == "skip", self.plan)

    def _raise_unasked(self, now: str, waiting: int = 0) -> None:
        """Raises the `PushError` of the oldest push checked on the device that was refused and nobody asked about.

        Looks at those whose check is back, and waits for the others' beyond the newest `waiting`.
        """
        while self._unasked:
            oldest = self._unasked[0]
            if not oldest.observed and len(self._unasked) <= waiting and not oldest.checked():
                return
            self._unasked.popleft()
            if oldest.observed:
                continue
            try:
                oldest.result()
            except PushError as e:
                raise PushError(f"an earlier push of this worker was refused (nobody asked its future); {now}: {e}") from None
            except Exception:
                pass  # other errors are its future's to tell

    def _send(
        self, staged: list, skipped: bool, rows: list | None = None, guard: Guard | None = None, leaves: list | None = None
    ) -> PushFuture:
        """Submits a push staged on every shard (or skipped) for the next step (`rows[s]`: a row push's ids on shard s;
        `guard`: its NaN/Inf check, still on the device; `leaves`: its gradients, kept to send again after a reshard)."""
        parts = []
        same_step = max(link.next_step() for link in self._links) if self._sync else None
        based = [link.based_on for link in self._links]
        oldest = None if None in based else min(based)
        checked = None if guard is None else (guard.flags, guard.skip)
        steps, requests = [], []
        key, self._pushes = (self._key, self._pushes), self._pushes + 1
        for s, (link, stage) in enumerate(zip(self._links, staged)):
            step = link.next_step() if same_step is None else same_step
            request = Push(self.worker, step, link.based_on, skipped, oldest, None if rows is None else rows[s], checked, key)
            parts.append(link.channel.submit(request, None if skipped else stage.payload))
            link.last_step, link.pulled = step, None
            steps.append(step)
            requests.append(request)
        if not self._resend or rows is not None or self._encoder is not None:
            return PushFuture(parts, guard)
        future = PushFuture(parts, guard, self, Sent(leaves, max(steps), oldest, checked, requests))
        self._unanswered.append(future)
        return future

    def _forget_answered(self) -> None:
        """Drops the gradients kept of the oldest pushes, once every shard has answered them; follows a reshard
        that one of them was answered with; sends those lost with a shard again."""
        if self._standby:
            self.send_again()
        while self._unanswered:
            oldest = self._unanswered[0]
            if not all(p.done() for p in oldest._parts):
                return
            try:
                moved = oldest.moved()
            except Exception:  # its own `result()` tells it
                moved = None
            if moved is not None:
                self.follow(moved.route)  # sends it (and any later one answered so) again
            elif self._standby and any(answer_of(p) == SEND_AGAIN for p in oldest._parts):
                self.send_again()
            else:
                self._unanswered.popleft().sent = None

    def send_again(self) -> None:
        """Sends each part of this client's pushes that a dying shard answered `SEND_AGAIN` to the shard's
        standby, now serving in its place: the same request, oldest push first (one the standby had applied
        already is answered as before)."""
        while True:
            try:
                for future in self._unanswered:
                    for s, part in enumerate(future._parts):
                        if answer_of(part) != SEND_AGAIN:
                            continue
                        sent, channel = future.sent, self._links[s].channel
                        payload = None if sent.leaves is None else channel.stage(self.plan.split(sent.leaves)[s], False).payload
                        future._parts[s] = channel.submit(sent.requests[s], payload)
                return
            except LostWithShard:  # another shard died meanwhile: from the oldest again
                continue

    def follow(self, route: Route) -> None:
        """The server was resharded (`ParameterServer.reshard`): from now on this client talks to `route`'s
        shards, and its pushes that the old shards answered `Moved` are sent to them again, in order.

        The old shards stopped at one cut: each push is applied by all of them or answered `Moved` by all.
        """
        if route.generation <= self._generation:
            return
        again = []
        for future in self._unanswered:
            try:
                if future.moved(MOVED_TIMEOUT) is not None:
                    again.append(future)
            except Exception:  # its own `result()` tells it
                pass
        if any(f.sent is None for f in again):
            raise RuntimeError("a row push or a filtered push was answered 'moved': reshard does not support them")
        pulled = {link.pulled for link in self._links}
        based = [link.based_on for link in self._links]
        lasts = [link.last_step for link in self._links if link.last_step is not None]
        self.plan, self._generation = route.plan, route.generation
        self._links = [
            ShardLink(
                channel,
                pulled=pulled.pop() if len(pulled) == 1 else None,
                based_on=None if None in based else min(based),
                last_step=max(lasts) if lasts else None,
            )
            for channel in route.channels
        ]
        self._unanswered = collections.deque()
        for future in again:
            future._parts = self._send_again(future.sent)
            self._unanswered.append(future)

    def _send_again(self, sent: Sent) -> list:
        """A push answered `Moved`, sent to the new shards: for the same step, based on the same version."""
        skipped = sent.leaves is None
        per_shard = [None] * len(self._links) if skipped else self.plan.split(sent.leaves)
        parts, requests = [], []
        for link, leaves in zip(self._links, per_shard):
            payload = None if skipped else link.channel.stage(leaves, False).payload
            request = Push(self.worker, sent.for_step, sent.oldest, skipped, sent.oldest, None, sent.guard, sent.requests[0].key)
            parts.append(link.channel.submit(request, payload))
            link.last_step, link.pulled = sent.for_step, None
            requests.append(request)
        sent.requests = requests
        return parts

    def _nonfinite_paths(self, per_shard: list, staged: list) -> list[str]:
        """Paths holding NaN/Inf: as the channels found while staging, else checked here (one device sync)."""
        bad, unchecked = [], []
        for shard, (leaves, stage) in enumerate(zip(per_shard, staged)):
            specs = self.plan.shard_specs(shard)
            if stage.finite is None:
                unchecked += zip(specs, leaves)
            else:
                bad += [spec.path for spec, ok in zip(specs, stage.finite) if not ok]
        return bad + nonfinite_paths([s for s, _ in unchecked], [x for _, x in unchecked])

    @property
    def left(self) -> bool:
        """Whether this worker has left through this client."""
        return self._left

    def __getstate__(self) -> dict:
        self.sent_away = True  # a copy of it may leave on its own, in its process: ask the shards
        # this copy's pushes are its own, and keyed as its own
        return {**self.__dict__, "_unanswered": collections.deque(), "_key": uuid.uuid4().hex, "_pushes": 0}

    def leave(self) -> None:
        """This worker is done: sync steps and ssp pulls stop waiting for it. Idempotent."""
        if self._left:
            return
        self._left = True
        if self.replaced:  # the shards count the newer client: telling them would make it leave
            return
        while True:
            if self._standby:  # its pushes lost with a shard count before it leaves
                self.send_again()
            errors, answers = [], []
            for link in self._links:  # every shard is told, even if one of them is gone
                try:
                    if not link.channel.closed:
                        answers.append(link.channel.call(Leave(self.worker)))
                except Exception as e:
                    errors.append(e)
            try:
                _check_moved(answers)
                break
            except _Moved as moved:  # resharded: its unanswered pushes go to the new shards first
                self.follow(moved.route)
            except _SendAgain:  # a standby took over: the pushes it lost go first, at the top (leaving twice changes nothing)
                continue
        if errors:
            raise errors[0]
        self._raise_unasked("the worker has left")

    @property
    def server_closed(self) -> bool:
        """Whether the server this client talks to is closed (as this process knows: the driver's clients)."""
        return any(link.channel.closed for link in self._links)

    def interrupt(self) -> None:
        """Makes this client's next call raise `ServerClosedError`: its driver was interrupted (Ctrl-C)."""
        self._interrupted = True

    def _check_open(self) -> None:
        if self._interrupted:
            raise ServerClosedError(f"the driver was interrupted: worker {self.worker} stops here")
        if self.server_closed:
            raise ServerClosedError(f"the ParameterServer is closed: worker {self.worker}'s client can no longer be used")
        if self.replaced:
            raise RuntimeError(
                f"worker {self.worker}'s client was replaced: run_workers or ps.client({self.worker}) has given worker "
                f"{self.worker} a new client since, and the shards count that one; ps.client({self.worker}) gives it"
            )
        if self._left:
            raise RuntimeError(f"worker {self.worker} has left the server; ps.client({self.worker}) gives it a new client")

    def __repr__(self) -> str:
        return f"Client(worker={self.worker}, shards={len(self._links)})"


def run_worker(fn, client: Client, arg: Any) -> Any:
    """Runs `fn(client, arg)` and then lets the client leave, however `fn` ends."""
    try:
        result = fn(client, arg)
    finally:
        client.leave()
    if inspect.isgenerator(result):  # (Ray would take a task's generator for a stream of results: the same rule everywhere)
        raise TypeError(f"worker {client.worker}'s function returned a generator; return its items as a list instead")
    return result


def unpicklable_worker(client: Client, fn: Any, arg: Any, error: Exception, dumps, where: str) -> TypeError:
    """The error for a worker that cannot be sent to `where` (its process, its Ray task): names what does not pickle."""
    def pickles(obj: Any) -> bool:
        try:
            dumps(obj)
            return True
        except Exception:
            return False

    what = "its function" if not pickles(fn) else "its argument" if not pickles(arg) else "its client"
    return TypeError(
        f"worker {client.worker} cannot be sent to {where}: {what} cannot be pickled ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Workers need a function defined in a module or a script "
        "(under `if __name__ == '__main__':`) and arguments that pickle (no locks, open files, threads or generators)"
    )


def unpicklable_result(client: Client, result: Any, error: Exception) -> TypeError:
    """The error for a worker's result that cannot be pickled back to the driver."""
    return TypeError(
        f"worker {client.worker}'s result ({type(result).__name__}) cannot be pickled back to the driver ({error}): "
        "return plain data (numbers, arrays, lists, dicts)"
    )


def closed_while_running(errors: dict[int, BaseException]) -> BaseException:
    """What `run_workers` raises when the server is closed while its workers run: the error of the first worker that
    failed on its own (`errors`: by worker), if one did, else `ServerClosedError`."""
    own = [errors[i] for i in sorted(errors) if not isinstance(errors[i], ServerClosedError)]
    return own[0] if own else ServerClosedError("the ParameterServer was closed while run_workers ran its workers")


def worker_failed(client: Client, error: BaseException, others_running: bool) -> None:
    """Says on stderr that `client`'s worker failed while others go on (`run_workers` raises its error once they are
    done: a worker's failure does not stop the others, as a worker's death does not)."""
    # a closed or interrupted server is no worker's failure (its shards stopped: a worker process may see them gone)
    if others_running and not isinstance(error, ServerClosedError) and not client.server_closed:
        try:
            text = str(error).splitlines()[0] if str(error) else ""
            print(f"jaxps: worker {client.worker} failed ({type(error).__name__}: {text}); it has left and the other workers "
                  "go on; run_workers raises its error when they are done", file=sys.stderr, flush=True)  # fmt: skip
        except Exception:  # (a closed stderr, an error that cannot be printed: the run goes on regardless)
            pass


def leave_quietly(client: Client) -> None:
    """`client.leave()` for a worker that could not leave by itself (its process died); a shard that is gone says so on the next call."""
    try:
        client.leave()
    except Exception:
        pass
