"""In-process transport: shards are objects in this process, workers are threads.

No copies: a push hands the shard the worker's arrays, a pull hands back the
shard's (immutable) arrays, and the shard's next step then does not donate
them. The choice for one machine, for tests, and for debugging.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

from jaxps.client import run_worker
from jaxps.shard import Shard, ShardSpec


class InProcessChannel:
    """Direct calls into a `Shard` of this process."""

    def __init__(self, shard: Shard):
        self._shard = shard

    def push(self, worker, tag, based_on, leaves) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._shard.push(worker, tag, based_on, leaves, future.set_result)
        return future

    def pull(self, worker) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._shard.pull(worker, lambda version, leaves: future.set_result((version, leaves)))
        return future

    def leave(self, worker) -> None:
        self._shard.leave(worker)

    def join(self, worker) -> int:
        return self._shard.join(worker)

    def stats(self) -> dict:
        return self._shard.stats()

    def __reduce__(self):
        raise TypeError(
            "an in-process client cannot be sent to another process; "
            "use transport='multiprocessing' or 'ray' for workers in other processes"
        )


class InProcessTransport:
    """Shards as objects in this process; workers as threads."""

    def __init__(self, device: Any = None):
        self._device = device

    def start(self, specs: Sequence[ShardSpec]) -> list[InProcessChannel]:
        return [InProcessChannel(Shard(spec, self._device)) for spec in specs]

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(clients)), thread_name_prefix="jaxps-worker") as pool:
            futures = [pool.submit(run_worker, fn, c, a) for c, a in zip(clients, args)]
            return [f.result() for f in futures]

    def close(self) -> None:
        pass
