"""Hot standby: each shard's changes, streamed in order to a standby copy that can take over with no step lost.

`ParameterServer(..., replicas=1)` starts a standby beside every shard (the
primary), as the paper replicates each key range. The primary's `Stream`
sends its standby first its whole state, then, in order, the mean gradients
of every step it applies and its clock after them (`Mirror`); the standby
applies the same steps with the same compiled update, so it holds the same
parameters and optimizer state, bit for bit.

A request that changes the primary is answered only once its standby has
that change (`Stream.after`): a push future that says "applied" is applied on
both. When the primary dies, the standby takes over (`TakeOver`) where
clients reached the primary: their requests in flight are sent again
(`jaxps.client`), those it had already applied are answered as before
(pushes carry a key), and the rest are taken as if nothing had happened.
Pulls are not held back: a client may read a step whose answer is still on
its way; the standby then has it or gets its pushes again.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Any, Callable

import numpy as np

from jaxps.service import Mirror

MIRROR_TIMEOUT = 60.0  # seconds a standby may take to carry out one `Mirror` before it counts as lost


class Stream:
    """A primary's side: one thread sends `Mirror`s to the standby behind `channel`, in order, batching what
    queued up meanwhile, and then gives the answers that waited for them."""

    def __init__(self, shard: Any, channel: Any, after: "Stream | None" = None):
        """`after`: the stream this one replaces; its thread ends before this one sends anything."""
        self._shard, self.channel = shard, channel
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = False  # set under the shard's lock; no entry is queued after it
        self.failed: str | None = None  # why the standby was lost (the supervisor replaces it)
        self._successor: Stream | None = None  # the stream that replaced this one: answers still queued wait for it
        self._thread = threading.Thread(target=self._run, args=(after,), name=f"jaxps-shard{shard.index}-standby", daemon=True)
        shard.start_log(lambda state, clock: self._queue.put((Mirror((), clock, (), state), None)))
        self._thread.start()

    def after(self, answer: Callable[[], None]) -> bool:
        """Queues the shard's changes so far, and `answer` to call once the standby has them; False (nothing
        queued) if this stream has stopped."""
        queued = []

        def put(steps: tuple, clock: Any, answered: tuple) -> None:
            if not self.stopped:
                self._queue.put((Mirror(steps, clock, answered), answer))
                queued.append(True)

        self._shard.logged(put)
        return bool(queued)

    def stop(self, successor: "Stream | None" = None) -> None:
        """No more entries (call under the shard's lock); those queued are not sent: their answers wait for
        `successor` (whose standby gets the whole state, these changes included), or go out at once."""
        self.stopped, self._successor = True, successor
        self._queue.put(None)

    def _run(self, previous: "Stream | None") -> None:
        if previous is not None:
            previous._thread.join()
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            ending = None in batch
            entries = [item for item in batch if item is not None]
            if not self.stopped and entries:
                try:
                    self.channel.call(_merged([m for m, _ in entries]), timeout=MIRROR_TIMEOUT)
                except Exception as e:  # the standby is lost: the primary goes on alone (the supervisor starts another)
                    self._fail(e)
            for _, answer in entries:
                if answer is None:
                    continue
                if self._successor is None or not self._successor.after(answer):
                    answer()
            if ending or (self.stopped and self._queue.empty()):
                if self._successor is None or self._successor.channel is not self.channel:
                    self.channel.close()
                return

    def _fail(self, error: Exception) -> None:
        with self._shard._lock:
            if self.stopped:
                return
            self.stopped, self.failed = True, f"{type(error).__name__}: {error}"
            self._shard.stop_log()
        print(f"jaxps: shard {self._shard.index} lost its standby ({type(error).__name__}: {error}); it goes on alone", file=sys.stderr, flush=True)


def _merged(entries: list[Mirror]) -> Mirror:
    """One `Mirror` doing what `entries` do, in order."""
    state = next((m.state for m in entries if m.state is not None), None)
    steps = tuple([np.asarray(x) for x in step] for m in entries for step in m.steps)  # (no copy on CPU: sent from there)
    answered = tuple(a for m in entries for a in m.answered)
    return Mirror(steps, entries[-1].clock, answered, state)
