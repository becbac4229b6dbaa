"""Fail-over: a shard that dies is restarted from the latest checkpoint, and every other shard rolls back to it.

`ParameterServer(..., checkpoint=jaxps.Checkpointing(...), on_shard_failure="restart")`
starts a `Supervisor` on the driver. It watches the transport's shards and,
when one dies, on the checkpoint thread (so no save runs meanwhile):

1. `RollBack(directory, step, version)` to every live shard: each reads its
   own part of the latest checkpoint, answers its unsettled pushes
   "rolled_back", and serves its waiting pulls the restored parameters;
2. `transport.restart(config)` for each dead one: a new process at the dead
   one's endpoint, reading its part of the same checkpoint. Clients' channels
   wait for it (their pushes in flight answer "rolled_back", pulls are sent
   again); workers that had left are told to it again.

All shards go on at `version`, the first version of a new *epoch*: every
version any client has seen is older, so a push computed before the rollback
is rolled back on every shard alike (`jaxps.consistency.Clock.rolled_back`).
A shard that dies `max_restarts` times within `window` seconds is not restarted
again: the transport's clients then raise `ShardDiedError` saying so.

With hot standbys (`replicas=1`, `jaxps.replication`) a dead shard's standby
takes over instead, with no step lost and no rollback, and a new standby
starts behind it; a dead standby is replaced. Only a shard that dies with no
live standby goes back to the checkpoint (without `checkpoint`: the run ends).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Any, Callable, Sequence

from jaxps import checkpoint
from jaxps.client import gather
from jaxps.errors import ShardDiedError
from jaxps.service import Lead, Leave, Replicate, RollBack, Stats
from jaxps.shard import ShardConfig

STANDBY_RETRY = 10.0  # seconds before a standby that could not start is tried again
STANDBY_REACH = 60.0  # seconds the supervisor waits for a shard's primary to answer before feeding it a new standby
# seconds the supervisor waits to reach (connect to) a shard: one that died meanwhile is not waited for, as its
# recovery would be this thread's own work
REACH = 10.0
EPOCH = 1 << 32  # versions of one epoch; a rollback starts the next
FAILURE_MODES = ("raise", "restart")


def next_epoch(version: int) -> int:
    """The first version of the epoch after `version`'s."""
    return (version // EPOCH + 1) * EPOCH


@dataclasses.dataclass
class Recoveries:
    """What fail-over has done, for `ps.stats()`."""

    restarts: int = 0
    takeovers: int = 0  # by a standby (`replicas=1`), with no step lost
    steps_lost: int = 0
    rolled_back_to: list = dataclasses.field(default_factory=list)  # the checkpoint step of each rollback
    last_recovery_s: float | None = None
    deaths: list = dataclasses.field(default_factory=list)  # monotonic times of shard deaths

    @property
    def last_rollback(self) -> int | None:
        """The checkpoint step of the last rollback (the checkpointing schedule counts from there)."""
        return self.rolled_back_to[-1] if self.rolled_back_to else None

    def stats(self) -> dict:
        return {
            "restarts": self.restarts,
            "takeovers": self.takeovers,
            "steps_lost": self.steps_lost,
            "rolled_back_to": list(self.rolled_back_to),
            "last_recovery_s": self.last_recovery_s,
        }


class Supervisor:
    """Watches the shards of one server and brings dead ones back (see the module's docstring)."""

    def __init__(
        self,
        transport: Any,
        channels: Sequence[Any],
        configs: Sequence[ShardConfig],
        directory: str | None,
        run_exclusively: Callable[[Callable[[], Any]], Any],
        version: int,
        leads: bool,
        replicas: int = 0,
        max_restarts: int = 3,
        window: float = 60.0,
        poll: float = 0.1,
        log: Callable[[str], None] | None = None,
        own_steps: Callable[[], set[int]] | None = None,
    ):
        """`own_steps()`: the steps in `directory` this server saved or started from (default: all of them); a
        recovery goes back to the latest of those still complete."""
        self._transport, self._channels = transport, list(channels)
        self._configs = [dataclasses.replace(c, leaves=[]) for c in configs]  # a restarted shard reads the checkpoint
        self._directory = directory
        self._own_steps = own_steps
        self._exclusively = run_exclusively  # runs a function on the checkpoint thread, returns its result
        self._version = version  # the epoch's first version (the server's start)
        self._leads = leads
        self._replicas = replicas
        self._retry: dict[int, float] = {}  # shards without a standby: when to try starting one again
        self._max_restarts, self._window, self._poll = max_restarts, window, poll
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.recoveries = Recoveries()
        self.failure: ShardDiedError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxps-failover", daemon=True)
        self._thread.start()

    def moved_to(self, transport: Any, channels: Sequence[Any], configs: Sequence[ShardConfig], leads: bool) -> None:
        """The server was resharded (on the checkpoint thread: no recovery runs meanwhile): watch the new shards."""
        self._configs = [dataclasses.replace(c, leaves=[]) for c in configs]
        self._channels, self._leads, self._transport = list(channels), leads, transport

    def close(self) -> None:
        """Stops watching (before the shards are stopped, so that their ends are not taken for deaths)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _watch(self) -> None:
        ticks = 0
        while not self._stop.wait(self._poll):
            transport, ticks = self._transport, ticks + 1
            dead = transport.dead()
            lost, missing = (self._standbys_to_replace(transport, dead, ticks) if self._replicas else ([], []))
            if not dead and not lost and not missing:
                continue
            now = time.monotonic()  # (a standby's death costs no step: it is not counted)
            self.recoveries.deaths = [t for t in self.recoveries.deaths if now - t < self._window] + [now] * len(dead)
            if len(self.recoveries.deaths) >= self._max_restarts:
                reason = (
                    f"shard {dead[0]} died: {len(self.recoveries.deaths)} shard deaths within {self._window:.0f} s, "
                    f"so it is not restarted again (fail-over gives up at {self._max_restarts})"
                )
                self._give_up(reason)
                return
            try:
                self._exclusively(lambda: self._fail_over(dead, lost, missing, transport))
            except Exception as e:  # noqa: BLE001
                self._give_up(f"shard {dead[0] if dead else '?'} died and could not be restarted: {type(e).__name__}: {e}")
                return

    def _standbys_to_replace(self, transport: Any, dead: list[int], ticks: int) -> tuple[list[int], list[int]]:
        """Standbys that died or that their primary lost (a `Mirror` failed: looked for once a second), and shards
        whose standby could not start and are due to try again."""
        lost = transport.dead_standbys()
        standbys = transport.standbys
        if ticks % 10 == 0 and not dead:
            asked = []
            for i in standbys:
                if i in lost:
                    continue
                try:
                    asked.append((i, self._channels[i].submit(Stats(), timeout=1)))
                except Exception:  # noqa: BLE001  (a primary dying: seen as dead at the next look)
                    pass
            for i, answer in asked:
                try:
                    if "standby_lost" in answer.result(2):
                        lost.append(i)
                except Exception:  # noqa: BLE001  (likewise)
                    pass
        now = time.monotonic()
        missing = [i for i, due in list(self._retry.items()) if i not in standbys and i not in dead and now >= due]
        return lost, missing

    def _fail_over(self, dead: list[int], lost: list[int], missing: list[int], transport: Any) -> None:
        """Dead primaries: their standbys take over (the rest roll back to the checkpoint); lost standbys are replaced."""
        if transport is not self._transport:
            return  # resharded meanwhile: the new shards are watched from now on
        standbys = transport.standbys if self._replicas else {}
        for i in set(lost) & set(standbys):
            transport.drop_standby(i)  # (stopped, if it still runs)
        rest = []
        for i in dead:
            if i not in standbys or i in lost:
                rest.append(i)
                continue
            started = time.monotonic()
            try:
                transport.promote(i)
            except Exception as e:  # noqa: BLE001  (it died too, or has no state yet)
                self._log(f"jaxps: shard {i} died and its standby could not take over ({type(e).__name__}: {e})")
                transport.drop_standby(i)
                rest.append(i)
                continue
            took = time.monotonic() - started
            self.recoveries.takeovers += 1
            self.recoveries.last_recovery_s = took
            self._log(f"jaxps: shard {i} died; its standby took over in {took:.2f} s, no step lost")
        if rest:
            if self._directory is None:
                raise RuntimeError(
                    f"shard {', '.join(map(str, rest))} died with no standby to take over, and no checkpoint to go back to "
                    f"(on_shard_failure='restart' with checkpoint= restarts it from the latest one)"
                )
            self._recover(rest, transport)  # (the live primaries' standbys start over from their rolled-back state)
        for i in sorted(set(dead) | set(lost) | set(missing)) if self._replicas else ():
            if i not in transport.standbys:  # (the server's first ones may have started meanwhile)
                self.start_standby(i)

    def start_standby(self, i: int, quiet: bool = False) -> None:
        """A new standby for shard `i`, fed by its primary from now on, starting with its whole state; if it
        cannot start, the shard goes on without one and it is tried again in `STANDBY_RETRY` s."""
        started = time.monotonic()
        try:
            channel = self._transport.start_standby(self._configs[i])
            # A `Replicate` lost with a primary is not sent again (only this thread could recover that primary), so
            # first a `Stats`, which is: this thread's connection to a primary that a standby has taken over since
            # is made anew, to the new primary, instead of the `Replicate` going to the dead one. Not to a primary
            # known dead: the wait for its recovery would be this thread's wait for itself.
            if i in self._transport.dead():
                raise ShardDiedError(f"shard {i}'s primary died while its new standby started")
            self._channels[i].submit(Stats(), timeout=REACH).result(STANDBY_REACH)
            self._channels[i].call(Replicate(channel), timeout=600)
        except Exception as e:  # noqa: BLE001
            self._retry[i] = time.monotonic() + STANDBY_RETRY
            if i in self._transport.standbys:
                self._transport.drop_standby(i)
            self._log(f"jaxps: shard {i}: a new standby could not start ({type(e).__name__}: {e}); trying again in {STANDBY_RETRY:.0f} s")
            return
        self._retry.pop(i, None)
        if not quiet:
            self._log(f"jaxps: shard {i} has a new standby ({time.monotonic() - started:.1f} s)")

    def _give_up(self, reason: str) -> None:
        self.failure = ShardDiedError(reason)
        self._log(f"jaxps: {reason}")
        self._transport.give_up(reason)

    def _recover(self, dead: list[int], transport: Any) -> None:
        started = time.monotonic()
        complete = checkpoint.steps(self._directory)
        own = complete if self._own_steps is None else [s for s in complete if s in self._own_steps()]
        if not own:
            raise RuntimeError(f"no checkpoint of this server in {self._directory} to restart from (complete steps there: {complete})")
        step = own[-1]
        live = [i for i in range(len(self._channels)) if i not in dead]
        before = gather([self._channels[i].submit(Stats(), timeout=REACH) for i in live], timeout=60)
        version = self._version = next_epoch(self._version)
        self._log(f"jaxps: shard {', '.join(map(str, dead))} died; rolling every shard back to step {step} of {self._directory}")
        index = checkpoint.read_index(self._directory, checkpoint.read_metadata(self._directory, step))  # once, for all shards
        gather([self._channels[i].submit(RollBack(self._directory, step, version, index=index)) for i in live], timeout=600)
        left = sorted({w for s in before for w in s["workers_left"]})
        for i in dead:
            self._transport.restart(dataclasses.replace(self._configs[i], restore=(self._directory, step, version, index)))
            for w in left:  # they are gone for good (or rejoin through the driver)
                self._channels[i].call(Leave(w), timeout=60)
        if self._leads and 0 in dead:
            self._channels[0].call(Lead(tuple(self._channels[1:])), timeout=60)
        lost = max((s["steps"] for s in before), default=step) - step
        took = time.monotonic() - started
        self.recoveries.restarts += len(dead)
        self.recoveries.steps_lost += max(0, lost)
        self.recoveries.last_recovery_s = took
        self.recoveries.rolled_back_to.append(step)
        told = f"{lost} steps lost" if before else "every shard had died: the steps applied beyond it are not known"
        self._log(f"jaxps: shard {', '.join(map(str, dead))} restarted; every shard is at step {step} ({told}) after {took:.1f} s")
