"""A worker's handle on the parameter server: pull the whole tree, push gradients.

A client splits a pushed tree by the plan, sends each shard its leaves, and
merges the shards' leaves on pull. It is picklable whenever the transport's
channels are (multiprocessing, Ray), so it can travel into the worker.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from jaxps.plan import Plan
from jaxps.transport import ShardChannel, Waitable
from jaxps.validate import check_gradients, nonfinite_paths, reject_nonfinite


def gather(waits: Sequence[Waitable], timeout: float | None = None) -> list:
    """The results of `waits`, in order, all within `timeout` seconds in total."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return [w.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for w in waits]


def _stage(channel: ShardChannel, leaves: list, check: bool) -> tuple[Any, list[bool] | None]:
    """(what to push, per leaf whether it is free of NaN/Inf, or None if the channel did not check)."""
    stage = getattr(channel, "stage", None)
    return stage(leaves, check) if stage is not None else (leaves, None)


class PushFuture:
    """Completes when every shard has applied (or dropped) the push.

    `result()` is 'applied', 'dropped' (some shard had already closed the step)
    or 'skipped' (non-finite gradients with `nonfinite='skip'`).
    """

    def __init__(self, parts: Sequence[Waitable] | None, outcome: str | None = None):
        self._parts = list(parts or [])
        self._outcome = outcome

    def result(self, timeout: float | None = None) -> str:
        if self._outcome is None:
            outcomes = gather(self._parts, timeout)
            self._outcome = next((o for o in ("dropped", "skipped") if o in outcomes), "applied")
        return self._outcome

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        return all(getattr(p, "done", lambda: False)() for p in self._parts)


class Client:
    """Worker `worker`'s view of the server. Use it from one thread at a time."""

    def __init__(
        self,
        worker: int,
        plan: Plan,
        channels: Sequence[ShardChannel],
        nonfinite: str = "raise",
        versions: Sequence[int | None] | None = None,
    ):
        """`versions`: each shard's version when the worker (re)joined; a push before any pull is for that step."""
        self.worker = worker
        self.plan = plan
        self._channels = list(channels)
        self._nonfinite = nonfinite
        n = len(self._channels)
        self._pulled: list[int | None] = [None] * n  # version pulled since the last push
        self._based_on: list[int | None] = [None] * n  # version of the last pull
        self._tag: list[int | None] = [None if v is None else v - 1 for v in versions or [None] * n]  # step of the last push
        self._left = False

    def pull(self, timeout: float | None = None) -> Any:
        """The current parameters, as a tree like the initial one.

        Sees every earlier push of this client; in sync mode waits until the
        step of the last push is applied, in ssp mode while this worker is too
        far ahead of the slowest.
        """
        self._check_open()
        replies = gather([ch.pull(self.worker) for ch in self._channels], timeout)
        for s, (version, _) in enumerate(replies):
            self._pulled[s] = self._based_on[s] = version
        return self.plan.merge([leaves for _, leaves in replies])

    def push(self, grads: Any) -> PushFuture:
        """Sends gradients for the parameters last pulled; checks them first.

        Raises `jaxps.PushError` naming the paths, shapes and dtypes of a bad
        tree, before any shard sees it.
        """
        self._check_open()
        per_shard = self.plan.split(check_gradients(self.plan, grads))
        check = self._nonfinite != "allow"
        staged = [_stage(ch, leaves, check) for ch, leaves in zip(self._channels, per_shard)]
        if check and reject_nonfinite(self.plan, self._nonfinite_paths(per_shard, staged), self._nonfinite):
            staged = [(None, None)] * len(staged)  # skipped: nothing is sent
        per_shard = [payload for payload, _ in staged]
        parts = []
        for s, ch in enumerate(self._channels):
            tag = self._pulled[s] if self._pulled[s] is not None else (self._tag[s] + 1 if self._tag[s] is not None else 0)
            parts.append(ch.push(self.worker, tag, self._based_on[s], per_shard[s]))
            self._tag[s], self._pulled[s] = tag, None
        return PushFuture(parts)

    def _nonfinite_paths(self, per_shard: list, staged: list) -> list[str]:
        """Paths holding NaN/Inf: as the channels found while staging, else checked here (one device sync)."""
        bad, unchecked = [], []
        for ids, leaves, (_, finite) in zip(self.plan.shard_leaves, per_shard, staged):
            specs = [self.plan.leaves[i] for i in ids]
            if finite is None:
                unchecked += zip(specs, leaves)
            else:
                bad += [spec.path for spec, ok in zip(specs, finite) if not ok]
        return bad + nonfinite_paths([s for s, _ in unchecked], [x for _, x in unchecked])

    @property
    def left(self) -> bool:
        """Whether this worker has left through this client."""
        return self._left

    def leave(self) -> None:
        """This worker is done: sync steps and ssp pulls stop waiting for it. Idempotent."""
        if not self._left:
            self._left = True
            errors = []
            for ch in self._channels:  # every shard is told, even if one of them is gone
                try:
                    ch.leave(self.worker)
                except Exception as e:
                    errors.append(e)
            if errors:
                raise errors[0]

    def _check_open(self) -> None:
        if self._left:
            raise RuntimeError(f"worker {self.worker} has left the server; ps.client({self.worker}) gives it a new client")

    def __repr__(self) -> str:
        return f"Client(worker={self.worker}, shards={len(self._channels)})"


def run_worker(fn, client: Client, arg: Any) -> Any:
    """Runs `fn(client, arg)` and then lets the client leave, however `fn` ends."""
    try:
        return fn(client, arg)
    finally:
        client.leave()


def leave_quietly(client: Client) -> None:
    """`client.leave()` for a worker that could not leave by itself (its process died); a shard that is gone says so on the next call."""
    try:
        client.leave()
    except Exception:
        pass
