"""A server shard: the thin, thread-safe stateful shell over the pure parts.

It holds its leaves, its optax state and its `Clock`, and hands out results
through callbacks, so that every transport (threads, a process serving
pipes, an asyncio Ray actor) can wait in its own way and no request ever
blocks the shard.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxps import rows as row_ops
from jaxps.consistency import Clock, Contribution, Step, Sync, make_policy
from jaxps.plan import Plan
from jaxps.update import Steps, compile_guarded_step, compile_step, mean_gradients
from jaxps.validate import PushError, check_leaves

ANSWERS_KEPT = 1 << 16  # a standby remembers this many pushes' outcomes, to answer those sent again after a take-over
PushDone = Callable[[Any], None]  # "applied" | "dropped" | "skipped" | "rolled_back", or a reshard's `Moved`
PullReady = Callable[[int, list], Any]  # (version, leaves)
SnapshotTaken = Callable[[dict | None, dict], Any]  # (state by path, {"step", "version"}) or (None, {"error"})


@dataclasses.dataclass
class ShardConfig:
    """Everything needed to start shard `index` anywhere (picklable with cloudpickle)."""

    index: int
    plan: Plan
    leaves: list  # initial values of this shard's leaves
    tx: optax.GradientTransformation
    mode: str = "async"
    workers: int | None = None
    backup_workers: int = 0
    max_staleness: int | None = None
    # start from a checkpoint instead of `leaves` and `tx.init`: (directory, step, version, index: the step's
    # `checkpoint.read_index` or None); the shard reads its own state from disk, in its own process
    restore: tuple[str, int, int, dict | None] | None = None
    # sync with backup workers on several shards: this shard takes the workers shard 0 took for each step
    follows: bool = False
    # pushes cross through this filter (`jaxps.filters`); `filtered[i]`: whether plan leaf i does (value leaves do not)
    push_filter: Any = None
    filtered: tuple[bool, ...] | None = None


class Shard:
    """One shard's parameters, optimizer state and clock."""

    def __init__(self, config: ShardConfig, device: Any = None, read: tuple[dict, float] | None = None):
        """`read`: `read_checkpoint(config, ...)`'s result, if the caller has read this shard's checkpoint part already."""
        self.index = config.index
        self._plan = config.plan
        self._leaf_specs = config.plan.shard_specs(config.index)
        self._device = device
        self._decoder = None
        if config.push_filter is not None:
            from jaxps.coding import Decoder

            mask = [config.filtered[i] for i in config.plan.shard_leaves[config.index]]
            self._decoder = Decoder(config.push_filter, self._leaf_specs, mask)
        leaves, opt_state, version, applied = config.leaves, None, 0, 0
        if leaves is None:  # a standby: its state comes from its primary (`mirror`)
            leaves = [np.zeros(spec.shape, spec.dtype) for spec in self._leaf_specs]
        self._restored_in: float | None = None  # seconds this shard took to read its checkpoint
        if config.restore is not None:
            state, self._restored_in = read or read_checkpoint(config)
            leaves, opt_state, version, applied = _load(config, state)
        # the shard donates its buffers, so it must own them: always copy
        self._params = config.plan.view(config.index, [self._own(x, copy=True) for x in leaves])
        self._own_refs = self._refcount(self._params)  # references to a leaf held by the shard's tree alone
        # where each parameter lives (`device`, else where JAX put it): a pushed array elsewhere is moved there
        self._homes = [x.sharding for x in jax.tree.leaves(self._params)]
        if opt_state is None:
            self._opt_state = config.tx.init(self._params)
        else:
            self._opt_state = jax.tree.map(lambda x: self._own(x, copy=True), opt_state)
        self._tx = config.tx  # a rollback reads its checkpoint part with it
        self._steps = compile_step(config.tx)
        self._guarded: Steps | None = None  # the steps of pushes checked on the device, compiled on first use
        self._spare_params: Any = None  # the params before the last lent step: the next one writes into them if freed
        self._unsettled: list[tuple[jax.Array, bool]] = []  # (finite?, skip) of those pushes, until known
        ids = config.plan.shard_leaves[config.index]
        self._row_positions = [k for k, i in enumerate(ids) if config.plan.is_rows(i)]  # where its row leaves are
        if self._row_positions:
            self._lazy_donating, self._lazy_lent = row_ops.lazy_step(config.tx)
            self._take_rows = jax.jit(lambda x, ids: x.at[ids].get(mode="fill", fill_value=0))
        self._mean = jax.jit(mean_gradients)
        self._policy = make_policy(config.mode, config.workers, config.backup_workers, config.max_staleness, config.follows)
        self._clock = Clock.start(config.workers, version, applied)
        self._lock = threading.RLock()  # re-entrant: answers given under it are logged for a standby (`logged`)
        self._lent = False  # params handed to a reader: the next step must not donate them while it holds them
        self._pushes: dict[tuple[int, int], tuple[PushDone, tuple | None]] = {}  # unsettled: (done, key)
        self._pulls: list[tuple[int | None, PullReady, bool, int, Callable[[Any], None] | None]] = []
        self._waiting: list[tuple[Contribution, PushDone]] = []  # pushes beyond a checkpoint's cut, in arrival order
        self._snapshot_taken: SnapshotTaken | None = None  # a checkpoint's snapshot to take once the cut is reached
        self._freeze = False  # the snapshot is a reshard's: the shard stays at the cut (`cut`)
        self._frozen = False  # at a reshard's cut: pulls and leaves wait until `move` or `release`
        self._deferred: list[tuple[Callable[[], None], Callable[[Any], None]]] = []  # (carry out, answer)
        self._moved: Any = None  # resharded away (`move`): every push and pull is answered this `Moved`
        self._spare: dict | None = None  # a written snapshot's arrays, for the next snapshot to copy into
        self.on_step: Callable[[int, tuple[int, ...]], None] | None = None  # a leader: (version, workers) of each step it closes
        self._log: list | None = None  # hot standby: each step's mean gradients since the last `Mirror` (host copies)
        self._log_answers: list = []  # and the pushes answered meanwhile: (key, outcome)
        self._answered: collections.OrderedDict = collections.OrderedDict()  # a standby: the latest pushes' outcomes, by key
        self._took_over = False  # a standby that took over: a `Mirror` its dead primary sent last is not carried out
        self._mirrored = False  # a standby that has its primary's state

    # -- requests -------------------------------------------------------------
    def push(
        self,
        worker: int,
        for_step: int,
        based_on: int | None,
        leaves: Sequence[Any] | None,
        done: PushDone,
        oldest: int | None = None,
        rows: dict[int, np.ndarray] | None = None,
        guard: tuple[jax.Array, bool] | None = None,
        key: tuple | None = None,
    ) -> None:
        """Offers `worker`'s gradients (None: skipped; a filter's payload with `push_filter`) for step `for_step`;
        `done` fires once it is settled. `rows`: a row push's `{position: local row ids}`, whose leaves hold just those rows.

        `guard`: `(flags, skip)`, the push's per-leaf finite flags, still being computed on the device (async and
        ssp, in-process); its step is computed, and kept only if they are all set, inside one compiled call. A
        push found non-finite is counted skipped (`skip`) or refused, not applied; its worker learns it from the flags.
        """
        if leaves is not None and self._decoder is not None:
            leaves = self._decoder.decode(leaves)
        if leaves is not None:
            check_leaves(self._row_specs(rows), leaves)
            grads = self._plan.view(self.index, [self._private(x, home) for x, home in zip(leaves, self._homes)])
        else:
            grads = None
        if guard is not None:
            guard = (self._private(guard[0], self._homes[0]), guard[1])
        with self._lock:
            if self._moved is not None:
                return done(self._moved)
            self._settle_guards(force=False)
            c = Contribution(worker, for_step, grads, based_on, oldest, rows or None, guard, key)
            if self._policy.admits(self._clock, c):
                self._take(c, done)
                self._maybe_snapshot()
            else:  # beyond a checkpoint's cut: waits, in a copy (the caller may reuse its buffers)
                self._waiting.append((c._replace(grads=self._detach(grads)), done))

    def pull(
        self, worker: int | None, ready: PullReady, lend: bool = True, at_least: int = 0, moved: Callable[[Any], None] | None = None
    ) -> None:
        """Calls `ready(version, leaves)` once `worker` may read (at once for `worker=None`) at version `at_least` or later.

        `ready` runs under the shard's lock; `lend=False` promises it copies the
        leaves before returning, so the next step may donate their buffers.
        `moved(Moved)` answers instead if the shard is resharded away first.
        """
        with self._lock:
            if self._moved is not None:
                return moved(self._moved)
            self._pulls.append((worker, ready, lend, at_least, moved))
            self._serve_pulls()

    def rows_of(self, leaves: list, rows: dict[int, np.ndarray]) -> list[np.ndarray]:
        """Host copies of `leaves`, just rows `rows[position]` of those named (call under the lock, as `pull`'s `ready`)."""
        self._row_specs(rows)
        out = []
        for k, x in enumerate(leaves):
            if k in rows:
                padded = row_ops.pad_ids(rows[k], x.shape[0], row_ops.bucket(len(rows[k])))
                out.append(np.asarray(self._take_rows(x, padded))[: len(rows[k])])
            else:
                out.append(np.array(x, copy=True))
        return out

    def _row_specs(self, rows: dict[int, np.ndarray] | None) -> tuple:
        """The shard's leaf specs with row leaves cut to `rows`; raises `PushError` for ids that do not fit."""
        if not rows:
            return self._leaf_specs
        specs = list(self._leaf_specs)
        for k, ids in rows.items():
            if k not in self._row_positions:
                raise PushError(f"shard {self.index}: position {k} is not one of its row leaves {self._row_positions}")
            spec = specs[k]
            ok = ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer) and (ids.size == 0 or (ids[0] >= 0 and ids[-1] < spec.shape[0]))
            if not ok or (ids.size > 1 and not np.all(ids[1:] > ids[:-1])):
                raise PushError(f"shard {self.index}: {spec.path} ({spec.describe()}): row ids must be distinct, sorted and in [0, {spec.shape[0]})")
            specs[k] = dataclasses.replace(spec, shape=(len(ids), *spec.shape[1:]))
        return tuple(specs)

    def leave(self, worker: int, answer: Callable[[Any], None]) -> None:
        """`worker` is done: sync steps and ssp pulls stop waiting for it; then `answer(None)`.

        At a reshard's cut the leave waits: it is the new shards' to take (`answer(Moved)`), or, if the
        reshard fails, this shard's again.
        """
        with self._lock:
            if self._moved is not None:
                return answer(self._moved)
            if self._frozen:
                return self._deferred.append((lambda: self._leave(worker), answer))
            self._leave(worker)
        answer(None)

    def _leave(self, worker: int) -> None:
        clock, steps = self._policy.leave(self._clock, worker)
        self._apply(steps)
        self._clock = clock
        self._settle(steps)
        self._maybe_snapshot()

    def decide(self, version: int, workers: Sequence[int]) -> None:
        """A following shard learns which workers the leader's step `version` took."""
        with self._lock:
            clock, steps = self._policy.decide(self._clock, version, tuple(workers))
            self._apply(steps)
            self._clock = clock
            self._settle(steps)
            self._maybe_snapshot()

    def join(self, workers: Sequence[int], at: int | None = None) -> list[int]:
        """`workers` take part (again, if they had left); returns the step each one's first push is for.

        `at` (sync): the step they count from, the same on every shard; the
        driver held every shard to find it (`hold`), and the hold ends here.
        """
        with self._lock:
            firsts = []
            for worker in workers:
                self._clock, first = self._policy.join(self._clock, worker, at)
                firsts.append(first)
            if at is not None:
                self._release()
            self._serve_pulls()
            return firsts

    def block_until_ready(self) -> None:
        """Waits until every dispatched step has run (and so has read its gradients)."""
        with self._lock:
            jax.block_until_ready((self._params, self._opt_state))
            self._settle_guards(force=True)

    @property
    def push_layout(self) -> list:
        """`(shape, dtype)` of the largest push's arrays: the leaves, or a filter's payload."""
        return self._plan.layout(self.index) if self._decoder is None else self._decoder.layout

    @property
    def keeps_gradients(self) -> bool:
        """Whether pushed gradients outlive `push` (sync mode holds them until the step closes)."""
        return isinstance(self._policy, Sync)

    def stats(self) -> dict:
        with self._lock:
            self._settle_guards(force=True)
            restored = {} if self._restored_in is None else {"restored_in_s": self._restored_in}
            return {"shard": self.index, **self._clock.stats(), **restored}

    # -- checkpoints (the cut: `jaxps.consistency`) ---------------------------
    def hold(self, joining: Sequence[int] = ()) -> Any:
        """Stops where it is (pushes beyond wait); returns the mark the driver's cut is made of, or (sync,
        `joining` workers) the first step they could all join at here."""
        with self._lock:
            self._clock, mark = self._policy.hold(self._clock)
            return self._policy.first_step(self._clock, joining) if joining else mark

    def cut(self, target: Any, taken: SnapshotTaken, freeze: bool = False) -> None:
        """Goes on to the cut `target`; there, calls `taken(state, info)` with a snapshot (under the lock), then goes on.

        `freeze` (a reshard): stays at the cut instead, until `move` or `release`; `info["clock"]` is the clock
        the new shards start with.
        """
        with self._lock:
            self._freeze = freeze
            clock, steps = self._policy.cut(self._clock, target)
            self._apply(steps)
            self._clock = clock
            self._settle(steps)
            self._snapshot_taken = taken
            waiting, self._waiting = self._waiting, []
            for c, done in waiting:
                if self._policy.admits(self._clock, c):
                    self._take(c, done)
                else:
                    self._waiting.append((c, done))
            self._maybe_snapshot()

    def roll_back(self, directory: str, step: int, version: int, clock: Clock | None = None, index: dict | None = None) -> None:
        """Another shard died: this one goes back to checkpoint `step` in `directory`, going on at `version`.

        Pushes not yet settled answer "rolled_back"; waiting pulls are served
        the restored parameters. Who has left stays left. `clock` (a new shard
        of a reshard, before any client reaches it): go on with that clock instead.
        """
        config = ShardConfig(self.index, self._plan, [], self._tx, restore=(directory, step, version, index))
        leaves, opt_state, _, _ = _load(config, read_checkpoint(config)[0])
        with self._lock:
            self._params = self._plan.view(self.index, [self._own(x, copy=True) for x in leaves])
            self._opt_state = jax.tree.map(lambda x: self._own(x, copy=True), opt_state)
            self._lent, self._spare_params = False, None
            self._unsettled = []  # pushes after the checkpoint: gone with the rollback
            pushes, self._pushes = self._pushes, {}
            waiting, self._waiting = self._waiting, []
            if clock is None:
                self._clock = self._clock.restarted(version, step, rolled_back=len(pushes) + len(waiting))
            else:
                self._clock = dataclasses.replace(clock, version=version, applied=step)
            taken, self._snapshot_taken = self._snapshot_taken, None
            for done in [*(done for done, _ in pushes.values()), *(done for _, done in waiting)]:
                done("rolled_back")
            if taken is not None:
                taken(None, {"error": f"shard {self.index}: rolled back to step {step} during the checkpoint"})
            self._serve_pulls()

    def done_with(self, snapshot: dict | None) -> None:
        """A snapshot is written (or dropped): its arrays are the next snapshot's to copy into."""
        self._spare = snapshot

    def release(self) -> None:
        """Ends a hold without a snapshot (a checkpoint that failed), or a reshard's stay at its cut (it failed)."""
        with self._lock:
            self._snapshot_taken = None
            self._frozen, self._freeze = False, False
            deferred, self._deferred = self._deferred, []
            self._release()
            for carry_out, _ in deferred:
                carry_out()
        for _, answer in deferred:
            answer(None)

    def move(self, moved: Any) -> None:
        """Resharded away (`ps.reshard`), at the cut: the new shards hold this one's state. Every push, pull
        and leave that waits here, and every later one, is answered `moved` (its client sends it again, to
        the new shards); the arrays are dropped."""
        with self._lock:
            if not self._frozen:
                raise RuntimeError(f"shard {self.index} is not at a reshard's cut")
            self._moved = moved
            self._params = self._opt_state = self._spare = self._spare_params = None
            answers = [*(done for done, _ in self._pushes.values()), *(done for _, done in self._waiting), *(p[4] for p in self._pulls if p[4])]
            answers += [answer for _, answer in self._deferred]
            self._pushes, self._waiting, self._pulls, self._deferred = {}, [], [], []
            self._clock = dataclasses.replace(self._clock, pending={})  # their gradients
        for answer in answers:
            answer(moved)

    # -- hot standby (`jaxps.replication`) -------------------------------------
    def start_log(self, into: Callable[[dict, Clock], None]) -> None:
        """A primary: `into(state, clock)` with this shard's whole state (under the lock), then log every step."""
        from jaxps.checkpoint import shard_state

        with self._lock:
            self._log, self._log_answers = [], []
            into(shard_state(self._plan, self.index, self._params, self._opt_state, None, self._tx), self._sent_clock())

    def logged(self, into: Callable[[tuple, Clock, tuple], None]) -> None:
        """A primary: `into(steps, clock, answered)` with the steps logged since the last call, the clock now and the
        pushes answered meanwhile (under the lock)."""
        with self._lock:
            steps, self._log = tuple(self._log or ()), ([] if self._log is not None else None)
            answered, self._log_answers = tuple(self._log_answers), []
            into(steps, self._sent_clock(), answered)

    def stop_log(self) -> None:
        with self._lock:
            self._log, self._log_answers = None, []

    def _sent_clock(self) -> Clock:
        """The clock without its pending pushes' gradients (a standby that takes over gets those pushes again)."""
        pending = {t: {w: c._replace(grads=None, guard=None) for w, c in by.items()} for t, by in self._clock.pending.items()}
        return dataclasses.replace(self._clock, pending=pending)

    def mirror(self, steps: Sequence[list], clock: Clock, answered: Sequence[tuple], state: dict | None = None) -> None:
        """A standby: its primary's `state` (if given), then the same steps with the same mean gradients, so the
        same parameters and optimizer state bit for bit; its clock is the primary's; `answered` pushes are known."""
        from jaxps.checkpoint import restore_shard

        with self._lock:
            if self._took_over:  # (its primary never heard back: the clients send those pushes again)
                return
            if state is not None:
                leaves, opt_state = restore_shard(self._plan, self._tx, self.index, state)
                self._params = self._plan.view(self.index, [self._own(x, copy=True) for x in leaves])
                self._opt_state = jax.tree.map(lambda x: self._own(x, copy=True), opt_state)
                self._mirrored, self._spare_params = True, None
            for mean in steps:
                grads = self._plan.view(self.index, [jax.device_put(x, home) for x, home in zip(mean, self._homes)])
                self._params, self._opt_state = self._update(self._steps, False, grads)
            self._clock = clock
            for key, outcome in answered:
                self._answered[key] = outcome
            while len(self._answered) > ANSWERS_KEPT:
                self._answered.popitem(last=False)

    def answered(self, key: tuple) -> str | None:
        """How a push was answered, if this shard (a standby that took over) applied it from its primary's stream."""
        if not self._took_over:  # (no lock: a primary from the start never looks)
            return None
        with self._lock:
            return self._answered.get(key)

    def take_over(self) -> None:
        """A standby becomes the shard: pushes its primary held unsettled come again from their clients."""
        with self._lock:
            if not self._mirrored:
                raise RuntimeError(f"shard {self.index}'s standby cannot take over: it has no state from its primary yet")
            self._took_over = True
            self._clock = self._clock.moved()
            self._serve_pulls()

    # -- internals ------------------------------------------------------------
    def _take(self, c: Contribution, done: PushDone) -> None:
        clock, steps, outcome = self._policy.push(self._clock, c)
        self._apply(steps)
        self._clock = clock
        if outcome is None:
            self._pushes[(c.worker, c.for_step)] = (done, c.key)
        else:
            self._answer(done, c.key, outcome)
        self._settle(steps)

    def _answer(self, done: PushDone, key: tuple | None, outcome: str) -> None:
        """Settles a push (under the lock); a standby learns how, with the step that settled it."""
        if self._log is not None and key is not None:
            self._log_answers.append((key, outcome))
        done(outcome)

    def _maybe_snapshot(self) -> None:
        """At the cut: the snapshot (numpy copies of params and optax state), then the hold ends."""
        if self._snapshot_taken is not None and self._policy.reached(self._clock):
            from jaxps.checkpoint import shard_state

            taken, self._snapshot_taken = self._snapshot_taken, None
            self._settle_guards(force=True)
            info = {"step": self._clock.applied, "version": self._clock.version}
            try:
                state = shard_state(self._plan, self.index, self._params, self._opt_state, self._spare, self._tx)
            except Exception as e:  # answered, never raised into the push that reached the cut
                state, info = None, {"error": f"shard {self.index}: snapshot failed: {type(e).__name__}: {e}"}
            if self._freeze and state is not None:
                self._frozen, info["clock"] = True, self._clock.moved()
            else:
                self._release()
            taken(state, info)

    def _release(self) -> None:
        clock, steps = self._policy.release(self._clock)
        self._apply(steps)
        self._clock = clock
        self._settle(steps)
        waiting, self._waiting = self._waiting, []
        for c, done in waiting:
            self._take(c, done)

    def _private(self, x: Any, home: Any) -> jax.Array:
        """A pushed array as a jax array of the shard's own, placed as `home`: numpy input is copied (its buffer
        is the client's), through the host so that no program is compiled per shape (row pushes vary)."""
        if not isinstance(x, jax.Array):
            return jax.device_put(np.array(x, copy=True), home)
        return x if x.sharding == home else jax.device_put(x, home)  # a worker on another device

    def _detach(self, grads: Any) -> Any:
        """Private copies of `grads` through the host (None stays None), where the parameters are."""
        if grads is None:
            return None
        leaves, treedef = jax.tree.flatten(grads)
        return jax.tree.unflatten(treedef, [self._private(np.asarray(x), home) for x, home in zip(leaves, self._homes)])

    def _own(self, x: Any, copy: bool) -> jax.Array:
        """`x` on the shard's device, copied if asked.

        Copy numpy input: `jax.device_put` (even with `may_alias=False`) may
        alias a 64-byte-aligned numpy buffer that its owner will reuse.
        """
        x = jnp.array(x, copy=True) if copy else x
        return x if self._device is None else jax.device_put(x, self._device)

    def _apply(self, steps: list[Step]) -> None:
        for step in steps:
            grads = step.gradients
            if not grads:
                continue
            self._check_not_donated()
            lent = self._lent and self._refcount(self._params) > self._own_refs
            if self._log is not None and (step.contributions[0].guard is not None or any(c.rows for c in step.contributions)):
                raise RuntimeError(f"shard {self.index}: a row push or a push checked on the device cannot be sent to a standby")
            if any(c.rows for c in step.contributions if c.grads is not None):
                self._apply_rows([c for c in step.contributions if c.grads is not None], lent)
            elif step.contributions[0].guard is not None:
                self._apply_guarded(step, lent)
            else:
                mean = grads[0] if len(grads) == 1 else self._mean(grads, np.int32(len(grads)))
                if self._log is not None:  # an async push's arrays may be the client's buffer: copied; sync ones are kept
                    self._log.append(jax.tree.leaves(mean) if self.keeps_gradients else [np.array(x, copy=True) for x in jax.tree.leaves(mean)])
                self._params, self._opt_state = self._update(self._steps, lent, mean)
            self._lent = False

    def _update(self, steps: Steps, lent: bool, *args: Any) -> tuple:
        """Runs a compiled step on the params and optimizer state. Lent params must stay alive: the new ones go
        into the params before them if nobody holds those any more (a worker that holds each pull until its next
        push has dropped the one before), else into fresh memory (a page fault per 4 KB on CPU)."""
        spare, self._spare_params = self._spare_params, None
        if not lent:
            return steps.donating(self._params, self._opt_state, *args)
        if spare is not None and self._refcount(spare) <= self._own_refs and not any(x.is_deleted() for x in jax.tree.leaves(spare)):
            out = steps.into(spare, self._params, self._opt_state, *args)  # (a reader may have donated them: deleted)
        else:
            out = steps.lent(self._params, self._opt_state, *args)
        self._spare_params = self._params  # (once the step has run: never the params a failed step left in place)
        return out

    def _apply_guarded(self, step: Step, lent: bool) -> None:
        """A push checked on the device (async, ssp: one per step): applied only if its flags are all set."""
        (c,) = step.contributions
        if self._guarded is None:
            self._guarded = compile_guarded_step(self._tx)
        flags, skip = c.guard
        self._params, self._opt_state, ok = self._update(self._guarded, lent, c.grads, flags)
        self._unsettled.append((ok, skip))

    def _settle_guards(self, force: bool) -> None:
        """Counts the pushes checked on the device whose check is back (all of them, `force`: waits) and failed."""
        while self._unsettled and (force or self._unsettled[0][0].is_ready()):
            ok, skip = self._unsettled.pop(0)
            if not bool(ok):
                self._clock = self._clock.not_applied(skip)

    def _apply_rows(self, contributions: list[Contribution], lent: bool) -> None:
        """A step with row pushes: the mean over the union of the rows, applied lazily (`jaxps.rows`)."""
        treedef = jax.tree.structure(self._params)
        sizes = [spec.shape[0] if k in self._row_positions else 0 for k, spec in enumerate(self._leaf_specs)]
        pushed = [(jax.tree.leaves(c.grads), c.rows) for c in contributions]
        if len(pushed) == 1:
            leaves, ids = pushed[0][0], dict(pushed[0][1])
        else:
            leaves, ids = row_ops.combine(pushed, self._row_positions, sizes)
        leaves = list(leaves)
        size = row_ops.bucket(max((len(x) for x in ids.values()), default=0))  # one size for all: fewer compiled steps
        for k in ids:
            ids[k], leaves[k] = row_ops.pad_ids(ids[k], sizes[k], size), row_ops.pad_values(leaves[k], size)
        if len(pushed) > 1:  # divided as the dense step's mean is (the same compiled division: the same bits)
            leaves = self._mean([leaves], np.int32(len(pushed)))
        grads = jax.tree.unflatten(treedef, leaves)
        if not ids:  # every row leaf was pushed whole by someone: a dense step
            self._params, self._opt_state = self._update(self._steps, lent, grads)
            return
        update = self._lazy_lent if lent else self._lazy_donating
        self._spare_params = None  # (lazy steps write fresh memory: no spare kept for them)
        self._params, self._opt_state = update(self._params, self._opt_state, grads, ids)

    @staticmethod
    def _refcount(params: Any) -> int:
        """The most Python references to any leaf of `params` (a reader that dropped its pull no longer counts).

        Donating a buffer that a dispatched computation still reads is safe: the
        runtime makes the step wait for it.
        """
        return max((sys.getrefcount(x) for x in jax.tree_util.tree_leaves(params)), default=0)

    def _settle(self, steps: list[Step]) -> None:
        for step in steps:
            if self.on_step is not None:
                self.on_step(step.version, step.workers)
            outcomes = [(c, "applied" if c.grads is not None else "skipped") for c in step.contributions]
            for c, outcome in outcomes + [(c, "dropped") for c in step.dropped]:
                pending = self._pushes.pop((c.worker, c.for_step), None)
                if pending is not None:
                    self._answer(*pending, outcome)
        self._serve_pulls()

    def _check_not_donated(self) -> None:
        """Raises if a reader donated the params it was lent (an in-process pull hands out the shard's own arrays)."""
        if self._lent and any(x.is_deleted() for x in jax.tree_util.tree_leaves(self._params)):
            raise RuntimeError(
                f"shard {self.index}'s parameters were deleted: an in-process pull lends the server's own arrays, and "
                "a jitted call donated them (donate_argnums); this server cannot go on (restore it from a checkpoint). "
                "Pass a function that donates its input a copy (jax.tree.map(jnp.copy, pulled)); jaxps.jit and "
                "jaxps.nnx.jit do not donate"
            )

    def _serve_pulls(self) -> None:
        if self._frozen:  # a reshard's cut: pulls wait for the new shards, so a worker computes no more pushes
            return
        if self._pulls:
            self._check_not_donated()
        waiting = []
        for pull in self._pulls:
            worker, ready, lend, at_least, _ = pull
            if (worker is None or self._policy.pull_ready(self._clock, worker)) and self._clock.version >= at_least:
                ready(self._clock.version, jax.tree_util.tree_leaves(self._params))
                self._lent = self._lent or lend
            else:
                waiting.append(pull)
        self._pulls = waiting


def checkpoint_paths(config: ShardConfig) -> list[str]:
    """The state paths this shard reads from a checkpoint (its structure comes from JAX: call it on the thread
    whose JAX settings, e.g. `jax.enable_x64`, the shard is built under)."""
    from jaxps import checkpoint

    return list(checkpoint.expected_state(config.plan, config.tx, config.index))


def read_checkpoint(config: ShardConfig, paths: Sequence[str] | None = None) -> tuple[dict, float]:
    """This shard's part of the checkpoint in `config.restore`, path-keyed numpy arrays, and the seconds the
    reading took. Only files and numpy: safe on any thread."""
    import orbax.checkpoint  # noqa: F401  (an import of seconds: not part of the reading timed below)

    from jaxps import checkpoint

    paths = checkpoint_paths(config) if paths is None else paths
    directory, step, _, index = config.restore
    started = time.perf_counter()
    _, state = checkpoint.read(directory, step, paths, check_replicated=False, index=index)
    return state, time.perf_counter() - started


def _load(config: ShardConfig, state: dict) -> tuple[list, Any, int, int]:
    """This shard's (leaves, opt_state, version, applied steps) from its state read out of `config.restore`."""
    from jaxps import checkpoint

    _, step, version, _ = config.restore
    leaves, opt_state = checkpoint.restore_shard(config.plan, config.tx, config.index, state)
    return leaves, opt_state, version, step
