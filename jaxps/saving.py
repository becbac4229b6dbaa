"""The driver's side of checkpoints: `ps.save`, and `Checkpointing` in the background.

A save of a running server, in four rounds of shard requests (`jaxps.service`):

1. `Hold` every shard: each stops where it is and answers its mark.
2. `Snapshot(cut_of(marks))`: each goes on to the common cut (the pushes that
   some shard has already taken are on their way to the others), copies its
   parameters and optax state to host memory there, and goes on training;
   answers its step.
3. `checkpoint.prepare` the step's directory, then `WritePart` on every shard:
   each writes its own part from its own process (bytes never pass through the
   driver), off its lock.
4. `checkpoint.commit`: metadata last, then retention.

Saves are serialised: one thread runs them, in order.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import numbers
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxps import checkpoint
from jaxps.client import gather
from jaxps.consistency import cut_of
from jaxps.plan import Plan
from jaxps.service import Hold, Snapshot, WritePart


def release(channels: Sequence[Any]) -> None:
    """Ends a hold on every shard that may still hold (one that answered `Hold` before something failed)."""
    for ch in channels:
        try:
            ch.call(Snapshot(None), timeout=10)
        except Exception:
            pass


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Save into `directory` every `every` steps, in the background, keeping the `keep` latest (None: all).

    `poll` is how often (seconds) the driver looks at the step count.
    """

    directory: str | os.PathLike
    every: int
    keep: int | None = None
    poll: float = 0.1

    def __post_init__(self):
        # a relative path is the caller's: made absolute now, since the shards and the fail-over get it as it is
        object.__setattr__(self, "directory", str(checkpoint.location(self.directory)))
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(f"Checkpointing(every=...) must be a positive int, got {self.every!r}")
        object.__setattr__(self, "every", int(self.every))
        if isinstance(self.poll, bool) or not isinstance(self.poll, numbers.Real) or not 0 < self.poll <= threading.TIMEOUT_MAX:
            raise ValueError(f"Checkpointing(poll=...) must be a positive number of seconds, got {self.poll!r}")
        checkpoint.check_keep(self.keep, "Checkpointing(keep=...)")
        object.__setattr__(self, "keep", None if self.keep is None else int(self.keep))


class Saver:
    """Runs a server's saves, one at a time, on a thread of its own; optionally every N steps."""

    def __init__(self, plan: Plan, channels: Sequence[Any], mode: str, start_step: int = 0):
        self._plan, self._channels, self._mode = plan, list(channels), mode
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxps-checkpoint")
        # (directory, step, version, id) of the checkpoint this server last wrote or started from: its state then
        self._last: tuple[Path, int, int, str] | None = None
        self._own: dict[Path, set[int]] = {}  # per directory: the steps this server saved there or started from
        self._warned: set[Path] = set()  # directories holding later steps of another line, said once
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._start_step = start_step
        self.restart_from: Callable[[], int | None] = lambda: None  # fail-over: the step every shard last rolled back to
        # taken while the shards are held for a cut, by a save (until its snapshots) and by a sync join
        self.holding = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the saver's thread, between saves; its result."""
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs `fn` on the saver's thread, between saves; a future of its result."""
        return self._executor.submit(fn)

    def save(self, directory: str | os.PathLike, keep: int | None = None) -> concurrent.futures.Future:
        """A future of the step saved into `directory` (a bad `keep` is refused here, before any work)."""
        checkpoint.check_keep(keep)
        return self._executor.submit(self._save, checkpoint.location(directory), keep)

    def started_from(self, directory: str | os.PathLike, step: int, version: int, written: str | None) -> None:
        """This server was restored from `step` (at `version`) in `directory`, the checkpoint of id `written`
        (its metadata's): the first step of its line there, and its state until its next step."""
        root = checkpoint.location(directory)
        self._own.setdefault(root, set()).add(step)
        self._last = None if written is None else (root, step, version, written)

    def holds(self, root: Path, step: int, version: int) -> bool:
        """Whether the complete `step` in `root` is this server's state at `step` and `version`: the very
        checkpoint it wrote or started from, and no step since (a fail-over's rollback starts a new version).
        Not to be written again, which would first remove it: a process killed then would leave none."""
        # (and not replaced by another server since: the same id)
        return self._last is not None and self._last[:3] == (root, step, version) and _id_of(root, step) == self._last[3]

    def drop(self, channels: Sequence[Any], step: int) -> None:
        """The shards behind `channels` drop their snapshots of `step`, unwritten."""
        gather([ch.submit(WritePart(None, step)) for ch in channels])

    def own_steps(self, directory: str | os.PathLike) -> set[int]:
        """The steps in `directory` this server saved or started from (where a fail-over may go back to: not the
        newer steps of a line it left by restoring an older step, nor another run's)."""
        return set(self._own.get(checkpoint.location(directory), ()))

    def every(self, config: Checkpointing, step_now) -> None:
        """Saves per `config` whenever `step_now()` has gone `config.every` steps beyond the last save."""

        def watch() -> None:
            last, rolled_back = self._start_step, None
            while not self._stop.wait(config.poll):
                if self.restart_from() != rolled_back:  # every shard went back to a checkpoint: count from there
                    rolled_back = last = self.restart_from()
                try:
                    step = step_now()
                except Exception:
                    return  # the server is closed or a shard is gone
                if step >= last + config.every:
                    try:
                        last = self.save(config.directory, config.keep).result()
                    except Exception as e:
                        warnings.warn(f"jaxps: a checkpoint into {config.directory} failed: {e}", RuntimeWarning)
                        last = step

        self._watcher = threading.Thread(target=watch, name="jaxps-checkpointing", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stops saving every N steps; waits for a save in flight."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self._executor.shutdown(wait=True)

    def moved_to(self, plan: Plan, channels: Sequence[Any]) -> None:
        """The server was resharded: later saves are the new shards'."""
        self._plan, self._channels = plan, list(channels)

    def _save(self, root: Path, keep: int | None) -> int:
        with self.holding:
            infos = snapshots(self._channels)
        step, version = infos[0]["step"], infos[0]["version"]
        if self.holds(root, step, version):
            self.drop(self._channels, step)
            checkpoint.retain(root, step, keep)
            return step
        self.write(root, step, version, keep)
        return step

    def write(self, root: Path, step: int, version: int, keep: int | None) -> None:
        """Writes the shards' snapshots of `step` (at `version`) into `root` as one checkpoint, of this server's own."""
        # a complete `step` there is another run's (this server restored an older step): the newest wins
        checkpoint.prepare(root, step, self._plan, replace=True)
        failures = [f for f in gather([ch.submit(WritePart(str(root), step)) for ch in self._channels]) if f]
        if failures:
            raise checkpoint.CheckpointError(f"step {step} in {root} was not saved:\n" + "\n".join(failures))
        written = uuid.uuid4().hex  # which checkpoint of `step` this is (another server may write one later)
        checkpoint.commit(root, step, self._plan, mode=self._mode, keep=keep, extra={"version": version, "id": written})
        self._own.setdefault(root, set()).add(step)
        self._last = (root, step, version, written)
        newer = [s for s in checkpoint.steps(root) if s > step]
        if newer and root not in self._warned:  # (once per directory: every later save would say it again)
            self._warned.add(root)
            warnings.warn(
                f"jaxps: step {step} saved in {root}, which holds later steps {newer[:5]} of another line of training "
                f"(saved before an older step was restored, or by another run): ParameterServer.restore({str(root)!r}) "
                f"without step= restores step {newer[-1]}, not {step}; fail-over goes back to this server's own steps",
                RuntimeWarning,
            )


def id_of(metadata: dict) -> str | None:
    """The id a checkpoint's metadata gives it (None: one written without)."""
    return metadata.get("extra", {}).get("id")


def _id_of(root: Path, step: int) -> str | None:
    """The id of the checkpoint of `step` in `root` (None: none there, or one written without)."""
    try:
        return id_of(checkpoint.read_metadata(root, step))
    except Exception:  # noqa: BLE001  (removed meanwhile, or unreadable: not known to be this server's)
        return None


def snapshots(channels: Sequence[Any], freeze: bool = False) -> list[dict]:
    """Every shard's snapshot at their common cut (call with the saver's `holding`); their answers, one
    `{"step", "version"}` (`freeze`: a reshard's, with the `"clock"`, and the shards stay at the cut)."""
    try:
        marks = gather([ch.submit(Hold()) for ch in channels])
        infos = gather([ch.submit(Snapshot(cut_of(marks), freeze)) for ch in channels])
    except BaseException:
        release(channels)
        raise
    errors = [i["error"] for i in infos if "error" in i]
    if errors:
        release(channels)  # a reshard's shards that reached the cut stay there
        raise checkpoint.CheckpointError("; ".join(errors))
    step, version = infos[0]["step"], infos[0]["version"]
    if any((i["step"], i["version"]) != (step, version) for i in infos):
        release(channels)
        raise checkpoint.CheckpointError(f"the shards' snapshots are not one cut: {infos}")  # a bug if ever seen
    return infos
