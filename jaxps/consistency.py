"""Consistency models as pure state machines over a shard's `Clock`.

Li et al.'s flexible consistency: `Async` applies each push on arrival,
`Sync` (bulk synchronous, with optional backup workers) applies step t once
with the mean of the workers' gradients for t, and `SSP` (bounded delay)
applies on arrival but holds back a worker's pull while it is more than
`max_staleness` pushes ahead of the slowest worker.

Every function takes a `Clock` and returns a new one; the stateful shell
(`jaxps.shard.Shard`) does the arithmetic on arrays and the waiting.

Checkpoints cut every shard at the same set of pushes. `hold` stops a shard
where it is and answers its *mark*: per-worker push counts (async, ssp) or
its version (sync). The driver takes `cut_of(marks)` (the largest: pushes a
shard has seen are on their way to the others, since a client sends each
push to every shard, in its order); `cut` lets each shard go exactly that
far, `reached` says when it is there (snapshot time), `release` lets it go on.
While held, async/ssp pushes beyond the cut wait in the shell (`admits` is
False); sync takes pushes as always but closes no step at or beyond the cut.

Backup workers agree across shards: with `backup_workers=k` and several
shards, shard 0 *leads*. It closes step t with the first N-k gradients it
receives and tells every other shard which workers those were (`Step.workers`,
sent by the shard service as a `Decide`); a *following* shard closes step t
with exactly those workers' gradients once they are in (`decide`), and drops
the others. So a step uses the same workers on every shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

MODES = ("async", "sync", "ssp")


class Contribution(NamedTuple):
    """One worker's push for step `for_step`: its gradients (None: skipped) and the version they were computed on.

    `oldest`: the oldest version the worker's last pull got from any shard (async, ssp: a push computed on
    parameters from before a rollback is rolled back on every shard alike).
    """

    worker: int
    for_step: int
    grads: Any
    based_on: int | None
    oldest: int | None = None
    rows: Any = None  # a row push: {position among the shard's leaves: local row ids}
    guard: Any = None  # checked on the device: (per-leaf finite flags, skip) (`Guard`); applied only if all are finite
    key: Any = None  # the push's (client, number): a standby learns how it was answered (`jaxps.replication`)


class Step(NamedTuple):
    """Gradients to apply now, as one optimizer step (their mean), at `version`; `dropped`: pushes for it left out."""

    version: int
    contributions: tuple[Contribution, ...]
    dropped: tuple[Contribution, ...] = ()

    @property
    def gradients(self) -> list[Any]:
        return [c.grads for c in self.contributions if c.grads is not None]

    @property
    def workers(self) -> tuple[int, ...]:
        """The workers whose pushes the step takes (skipped ones included), in order."""
        return tuple(c.worker for c in self.contributions)


@dataclasses.dataclass(frozen=True)
class Clock:
    """A shard's version clock and per-worker push counts."""

    workers: int
    version: int = 0  # steps closed
    pushes: tuple[int, ...] = ()  # pushes received, per worker
    last_step: tuple[int | None, ...] = ()  # step of each worker's last push
    left: frozenset[int] = frozenset()  # workers that have finished
    joined_at: tuple[int, ...] = ()  # each worker's push count when it last (re)joined
    pending: Mapping[int, Mapping[int, Contribution]] = dataclasses.field(default_factory=dict)
    decided: Mapping[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # a follower: the leader's workers per step
    applied: int = 0  # optimizer updates applied
    pushes_applied: int = 0
    pushes_dropped: int = 0
    pushes_skipped: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    staleness_count: int = 0
    hold: Any = None  # during a checkpoint: how far this shard may go (async/ssp: pushes per worker; sync: a version)
    restarted_at: int = 0  # the version this shard (re)started from a checkpoint at: older pushes are rolled back
    pushes_rolled_back: int = 0
    pushes_refused: int = 0  # found non-finite on the device after they were taken, and so not applied

    @classmethod
    def start(cls, workers: int | None, version: int = 0, applied: int = 0) -> "Clock":
        """A fresh clock; a restored shard starts at `version` with the checkpoint's `applied` steps."""
        n = workers or 0
        return cls(workers=n, pushes=(0,) * n, last_step=(None,) * n, version=version, applied=applied, restarted_at=version)

    def rolled_back(self, c: Contribution, sync: bool) -> bool:
        """Whether `c` was computed before this shard's last rollback (sync: for an earlier step)."""
        if sync:
            return c.for_step < self.restarted_at
        return c.oldest is not None and c.oldest < self.restarted_at

    def restarted(self, version: int, applied: int, rolled_back: int = 0) -> "Clock":
        """This clock rolled back to a checkpoint of `applied` steps, going on at `version`, with `rolled_back`
        unsettled pushes answered so; who has left stays left. Push counts start again from 0, and so does each
        worker's count at its last join (as on a restarted shard: else ssp would count progress from joins
        the counts no longer hold, and shards would disagree on who is ahead)."""
        fresh = Clock.start(self.workers, version, applied)
        return dataclasses.replace(fresh, left=self.left, pushes_rolled_back=self.pushes_rolled_back + rolled_back)

    def moved(self) -> "Clock":
        """This clock as the shards of a new plan start with it (`ps.reshard`): the same workers, counts and
        epoch, without the pushes not yet applied (their clients send them again, to the new shards)."""
        pushes, last = list(self.pushes), list(self.last_step)
        for for_step in sorted(self.pending, reverse=True):  # a worker's earliest pending step last: it counts from there
            for worker in self.pending[for_step]:
                pushes[worker] -= 1
                last[worker] = for_step - 1 if for_step > 0 else None
        return dataclasses.replace(self, pushes=tuple(pushes), last_step=tuple(last), pending={}, decided={}, hold=None)

    def not_applied(self, skipped: bool) -> "Clock":
        """This clock once a push it counted as applied turns out non-finite (checked on the device): its step
        changed nothing, so it is not counted as one; it is counted as skipped (`nonfinite="skip"`) or refused."""
        skips, refusals = (1, 0) if skipped else (0, 1)
        return dataclasses.replace(
            self,
            applied=self.applied - 1,
            pushes_applied=self.pushes_applied - 1,
            pushes_skipped=self.pushes_skipped + skips,
            pushes_refused=self.pushes_refused + refusals,
        )

    def stats(self) -> dict:
        return {
            "version": self.version,
            "steps": self.applied,
            "pushes_applied": self.pushes_applied,
            "pushes_dropped": self.pushes_dropped,
            "pushes_skipped": self.pushes_skipped,
            "pushes_rolled_back": self.pushes_rolled_back,
            "pushes_refused": self.pushes_refused,
            "workers_left": sorted(self.left),
            "staleness_mean": self.staleness_sum / self.staleness_count if self.staleness_count else 0.0,
            "staleness_max": self.staleness_max,
            "staleness_count": self.staleness_count,
            "worker_pushes": list(self.pushes),
        }


def _join(clock: Clock, worker: int) -> Clock:
    """`worker`, having left, takes part again (a new `run_workers`); ssp counts its pushes from here."""
    joined = list(clock.joined_at) + [0] * max(0, len(clock.pushes) - len(clock.joined_at))
    if worker < len(joined):
        joined[worker] = clock.pushes[worker]
    return dataclasses.replace(clock, left=clock.left - {worker}, joined_at=tuple(joined))


def _count(counts: tuple[int, ...], worker: int) -> int:
    return counts[worker] if worker < len(counts) else 0


def cut_of(marks: list) -> Any:
    """The cut every shard goes to: the largest version (sync), or each worker's largest push count (async, ssp)."""
    if all(isinstance(m, int) for m in marks):
        return max(marks)
    return tuple(max(_count(m, w) for m in marks) for w in range(max(len(m) for m in marks)))


def _received(clock: Clock, c: Contribution) -> Clock:
    worker, for_step = c.worker, c.for_step
    grow = max(0, worker + 1 - len(clock.pushes))  # async servers take any number of workers
    pushes = list(clock.pushes) + [0] * grow
    pushes[worker] += 1
    last = list(clock.last_step) + [None] * grow
    last[worker] = for_step
    return dataclasses.replace(clock, pushes=tuple(pushes), last_step=tuple(last))


def _rolled_back(clock: Clock) -> Clock:
    return dataclasses.replace(clock, pushes_rolled_back=clock.pushes_rolled_back + 1)


def _closed(clock: Clock, step: Step) -> Clock:
    """The clock after `step` is applied (or, with no gradients, passed over)."""
    known = [  # (a pull may read a step its standby gets only after a take-over: never less than 0)
        max(0, step.version - c.based_on)
        for c in step.contributions
        if c.grads is not None and c.based_on is not None and c.based_on >= clock.restarted_at
    ]
    applied = bool(step.gradients)
    return dataclasses.replace(
        clock,
        version=clock.version + 1,
        applied=clock.applied + applied,
        pushes_applied=clock.pushes_applied + len(step.gradients),
        pushes_dropped=clock.pushes_dropped + len(step.dropped),
        pushes_skipped=clock.pushes_skipped + len(step.contributions) - len(step.gradients),
        staleness_sum=clock.staleness_sum + sum(known),
        staleness_max=max([clock.staleness_max, *known]),
        staleness_count=clock.staleness_count + len(known),
    )


@dataclasses.dataclass(frozen=True)
class Async:
    """Each push is applied on arrival."""

    def push(self, clock: Clock, c: Contribution) -> tuple[Clock, list[Step], str | None]:
        """The new clock, the steps to apply now, and the push's outcome if no step settles it."""
        if clock.rolled_back(c, sync=False):
            return _rolled_back(clock), [], "rolled_back"
        clock = _received(clock, c)
        if c.grads is None:  # skipped by the client (non-finite gradients)
            return dataclasses.replace(clock, pushes_skipped=clock.pushes_skipped + 1), [], "skipped"
        step = Step(clock.version, (c,))
        return _closed(clock, step), [step], None

    def pull_ready(self, clock: Clock, worker: int) -> bool:
        return True

    def leave(self, clock: Clock, worker: int) -> tuple[Clock, list[Step]]:
        return dataclasses.replace(clock, left=clock.left | {worker}), []

    def join(self, clock: Clock, worker: int, at: int | None = None) -> tuple[Clock, int]:
        """`worker` takes part (again) now; the clock, and the step its first push is for (this version)."""
        return _join(clock, worker), clock.version

    # -- checkpoints: a cut by per-worker push counts -------------------------
    def hold(self, clock: Clock) -> tuple[Clock, tuple[int, ...]]:
        """Stops taking pushes; the mark is each worker's push count."""
        return dataclasses.replace(clock, hold=clock.pushes), clock.pushes

    def admits(self, clock: Clock, c: Contribution) -> bool:
        """Whether `c` may be taken now (else it waits in the shell until `cut` or `release`)."""
        return clock.hold is None or _count(clock.pushes, c.worker) < _count(clock.hold, c.worker)

    def cut(self, clock: Clock, target: tuple[int, ...]) -> tuple[Clock, list[Step]]:
        """Goes on to `target`: the waiting pushes it admits are taken by the shell, in order."""
        return dataclasses.replace(clock, hold=tuple(target)), []

    def reached(self, clock: Clock) -> bool:
        return clock.hold is not None and all(_count(clock.pushes, w) >= n for w, n in enumerate(clock.hold))

    def release(self, clock: Clock) -> tuple[Clock, list[Step]]:
        """Takes pushes again (the shell then takes the waiting ones, in order)."""
        return dataclasses.replace(clock, hold=None), []


@dataclasses.dataclass(frozen=True)
class SSP(Async):
    """Applied on arrival; a pull waits while its worker is over `max_staleness` pushes ahead."""

    max_staleness: int = 0

    def pull_ready(self, clock: Clock, worker: int) -> bool:
        progress = [n - (clock.joined_at[w] if w < len(clock.joined_at) else 0) for w, n in enumerate(clock.pushes)]
        active = [n for w, n in enumerate(progress) if w not in clock.left]
        return not active or progress[worker] - min(active) <= self.max_staleness


@dataclasses.dataclass(frozen=True)
class Sync:
    """Step t is applied once, with the mean of the first `workers - backup` gradients for t.

    `follows`: this shard takes, for each step, the workers the leading shard
    took (`decide`), not the first ones to arrive here.
    """

    backup: int = 0
    follows: bool = False

    def quorum(self, clock: Clock, for_step: int) -> int:
        """Gradients step `for_step` waits for: `workers - backup`, or fewer once workers leave.

        A worker that left after pushing for `for_step` still counts: its gradient is in. One whose last push
        (or join: `join`) is for a later step does not: a worker's pushes go in step order.
        """
        arrived = clock.pending.get(for_step, {})

        def counts(w: int) -> bool:
            last = clock.last_step[w]
            return w in arrived or (w not in clock.left and (last is None or last < for_step))

        return max(1, min(clock.workers - self.backup, sum(map(counts, range(clock.workers)))))

    def push(self, clock: Clock, c: Contribution) -> tuple[Clock, list[Step], str | None]:
        if clock.rolled_back(c, sync=True):
            return _rolled_back(clock), [], "rolled_back"
        if c.for_step < clock.version:  # its step is already applied: a straggler
            clock = _received(clock, c)
            return dataclasses.replace(clock, pushes_dropped=clock.pushes_dropped + 1), [], "dropped"
        if c.worker in clock.pending.get(c.for_step, {}):
            raise ValueError(f"worker {c.worker} pushed twice for step {c.for_step}")
        pending = dict(clock.pending)
        pending[c.for_step] = {**pending.get(c.for_step, {}), c.worker: c}
        clock = dataclasses.replace(_received(clock, c), pending=pending)
        return (*self._close_ready(clock), None)

    def decide(self, clock: Clock, version: int, workers: tuple[int, ...]) -> tuple[Clock, list[Step]]:
        """A follower learns that the leader's step `version` took `workers`; closes the steps now ready."""
        if not self.follows:
            raise ValueError("only a following shard takes the leader's decisions")
        if version < clock.version:
            return clock, []  # already closed (a decision sent twice)
        return self._close_ready(dataclasses.replace(clock, decided={**clock.decided, version: tuple(workers)}))

    def _ready(self, clock: Clock) -> bool:
        """Whether step `clock.version` can close now."""
        if clock.hold is not None and clock.version >= clock.hold:
            return False
        arrived = clock.pending.get(clock.version, {})
        if self.follows:  # the leader's workers, each in or gone (one that died mid-push never arrives)
            chosen = clock.decided.get(clock.version)
            return chosen is not None and all(w in arrived or w in clock.left for w in chosen)
        return bool(arrived) and len(arrived) >= self.quorum(clock, clock.version)

    def _close_ready(self, clock: Clock) -> tuple[Clock, list[Step]]:
        steps = []
        while self._ready(clock):
            pending, decided = dict(clock.pending), dict(clock.decided)
            arrived = pending.pop(clock.version, {})
            chosen = decided.pop(clock.version, None)
            taken = sorted(arrived) if chosen is None else sorted(w for w in arrived if w in chosen)
            dropped = tuple(arrived[w] for w in sorted(arrived) if w not in taken)
            step = Step(clock.version, tuple(arrived[w] for w in taken), dropped)
            clock = _closed(dataclasses.replace(clock, pending=pending, decided=decided), step)
            steps.append(step)
        return clock, steps

    def pull_ready(self, clock: Clock, worker: int) -> bool:
        last = clock.last_step[worker]
        return last is None or clock.version > last

    def leave(self, clock: Clock, worker: int) -> tuple[Clock, list[Step]]:
        return self._close_ready(dataclasses.replace(clock, left=clock.left | {worker}))

    def first_step(self, clock: Clock, workers: Sequence[int]) -> int:
        """The first step `workers` could all join at here: this version, or the step after the last push of one."""
        lasts = [clock.last_step[w] for w in workers if clock.last_step[w] is not None]
        return max([clock.version, *(last + 1 for last in lasts)])

    def join(self, clock: Clock, worker: int, at: int | None = None) -> tuple[Clock, int]:
        """`worker` takes part (again) from step `at` (None: `first_step` here); the clock, and that step.

        Steps before it do not wait for the worker (as if its last push were for
        the step before), and its pulls wait for it. The driver gives every shard
        the same `at` (the largest `first_step` of all), so every shard counts the
        worker from one step.
        """
        first = self.first_step(clock, [worker]) if at is None else at
        steps = list(clock.last_step)
        steps[worker] = None if first == 0 else first - 1
        return dataclasses.replace(_join(clock, worker), last_step=tuple(steps)), first

    # -- checkpoints: a cut at a step boundary --------------------------------
    def hold(self, clock: Clock) -> tuple[Clock, int]:
        """Closes no further step; the mark is the version (steps closed)."""
        return dataclasses.replace(clock, hold=clock.version), clock.version

    def admits(self, clock: Clock, c: Contribution) -> bool:
        return True  # pushes wait in `pending` as always; only closing steps is held

    def cut(self, clock: Clock, target: int) -> tuple[Clock, list[Step]]:
        """Closes the steps before version `target` that are ready, none beyond."""
        return self._close_ready(dataclasses.replace(clock, hold=target))

    def reached(self, clock: Clock) -> bool:
        return clock.hold is not None and clock.version >= clock.hold

    def release(self, clock: Clock) -> tuple[Clock, list[Step]]:
        """Closes steps again, the ready ones at once."""
        return self._close_ready(dataclasses.replace(clock, hold=None))


def make_policy(mode: str, workers: int | None, backup_workers: int, max_staleness: int | None, follows: bool = False):
    """The policy for `mode`, with its arguments checked; `follows`: a sync shard that takes the leader's decisions."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode in ("sync", "ssp") and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"mode={mode!r} needs workers=N (a positive int), got workers={workers!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if backup_workers and mode != "sync":
        raise ValueError(f"backup_workers applies to mode='sync' only, not mode={mode!r}")
    if mode == "sync" and not (isinstance(backup_workers, int) and 0 <= backup_workers < workers):
        raise ValueError(f"backup_workers must be an int in [0, workers={workers}), got {backup_workers!r}")
    if max_staleness is not None and mode != "ssp":
        raise ValueError(f"max_staleness applies to mode='ssp' only, not mode={mode!r}")
    if mode == "ssp" and not (isinstance(max_staleness, int) and max_staleness >= 0):
        raise ValueError(f"mode='ssp' needs max_staleness=s (an int >= 0), got {max_staleness!r}")
    if mode == "sync":
        return Sync(backup=backup_workers, follows=follows)
    if mode == "ssp":
        return SSP(max_staleness=max_staleness)
    return Async()
