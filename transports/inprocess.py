"""In-process transport: shards are objects in this process, workers are threads.

No copies: a push hands the shard the worker's arrays, a pull hands back the
shard's (immutable) arrays, and the shard's next step then does not donate
them. The choice for one machine, for tests, and for debugging.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Sequence

from jaxps.errors import ServerClosedError
from jaxps.transport import Reply, Shard, ShardChannel, ShardConfig, ShardService, run_worker


class _FutureReply(Reply):
    lend = True  # the caller gets the shard's own arrays

    def __init__(self):
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def send(self, value: Any) -> None:
        self.future.set_result(value)


class InProcessChannel(ShardChannel):
    """Direct calls into a shard service of this process."""

    checks_on_device = True

    def __init__(self, service: ShardService):
        self._service = service

    def submit(self, request, payload=None, timeout=None) -> concurrent.futures.Future:
        if self.closed:
            raise ServerClosedError("the ParameterServer is closed")
        reply = _FutureReply()
        try:
            self._service.handle(request, reply, payload)
        except Exception as e:
            reply.future.set_exception(e)
        return reply.future

    def __reduce__(self):
        raise TypeError(
            "an in-process client cannot be sent to another process; "
            "use transport='multiprocessing' or 'ray' for workers in other processes"
        )


class InProcessTransport:
    """Shards as objects in this process; workers as threads."""

    def __init__(self, device: Any = None):
        self._device = device

    def start(self, configs: Sequence[ShardConfig]) -> list[InProcessChannel]:
        """The shards, built side by side (a restore reads their checkpoint parts in parallel)."""
        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(configs), 8)), thread_name_prefix="jaxps-shard-start") as pool:
            shards = list(pool.map(lambda config: Shard(config, self._device), configs))
        return [InProcessChannel(ShardService(shard)) for shard in shards]

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list:
        """Runs each `fn(client, arg)` in a thread of its own; results in order, the first error raised.

        The threads are daemons: on Ctrl-C the driver raises at once, each
        worker stops at its next pull or push, and none holds up the exit.
        """
        results: list = [None] * len(clients)
        errors: dict[int, BaseException] = {}

        def run(i: int, client: Any, arg: Any) -> None:
            try:
                results[i] = run_worker(fn, client, arg)
            except BaseException as e:
                errors[i] = e

        threads = [
            threading.Thread(target=run, args=(i, c, a), name=f"jaxps-worker-{i}", daemon=True)
            for i, (c, a) in enumerate(zip(clients, args))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # KeyboardInterrupt
            for c in clients:
                c.interrupt()
            raise
        if errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        pass
