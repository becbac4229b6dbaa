"""In-process transport: shards are objects in this process, workers are threads.

No copies: a push hands the shard the worker's arrays, a pull hands back the
shard's (immutable) arrays, and the shard's next step then does not donate
them. The choice for one machine, for tests, and for debugging.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Sequence

from jaxps.checkpoint import side_by_side
from jaxps.errors import ServerClosedError
from jaxps.shard import checkpoint_paths, read_checkpoint
from jaxps.client import closed_while_running
from jaxps.transport import Reply, Shard, ShardChannel, ShardConfig, ShardService, run_worker, worker_failed


class _FutureReply(Reply):
    lend = True  # the caller gets the shard's own arrays

    def __init__(self):
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def send(self, value: Any) -> None:
        try:
            self.future.set_result(value)
        except concurrent.futures.InvalidStateError:
            if not isinstance(self.future.exception(), ServerClosedError):  # (the server closed first: it was told so)
                raise


class InProcessChannel(ShardChannel):
    """Direct calls into a shard service of this process."""

    checks_on_device = True

    def __init__(self, service: ShardService):
        self._service = service
        self._waiting: set[concurrent.futures.Future] = set()  # requests the shard has not answered yet

    def submit(self, request, payload=None, timeout=None) -> concurrent.futures.Future:
        if self.closed:
            raise ServerClosedError("the ParameterServer is closed")
        reply = _FutureReply()
        try:
            self._service.handle(request, reply, payload)
        except Exception as e:
            reply.future.set_exception(e)
        if not reply.future.done():  # e.g. a pull waiting for a sync step: told if the server closes first
            self._waiting.add(reply.future)
            reply.future.add_done_callback(self._waiting.discard)
            if self.closed:  # closed meanwhile, maybe before it was added: told here
                self._fail(reply.future)
        return reply.future

    @staticmethod
    def _fail(future: concurrent.futures.Future) -> None:
        try:
            future.set_exception(ServerClosedError("the ParameterServer is closed"))
        except concurrent.futures.InvalidStateError:  # answered meanwhile
            pass

    def close(self) -> None:
        """As `ShardChannel.close`; requests still waiting for the shard raise `ServerClosedError`."""
        self.closed = True
        for future in list(self._waiting):
            self._fail(future)

    def __reduce__(self):
        raise TypeError(
            "an in-process client cannot be sent to another process; "
            "use transport='multiprocessing' or 'ray' for workers in other processes"
        )


def _read_checkpoints(configs: Sequence[ShardConfig]) -> dict[int, tuple[dict, float]]:
    """`{shard: read_checkpoint(...)}` of the restoring shards, read on threads of their own (files and numpy only)."""
    restoring = [c for c in configs if c.restore is not None]
    if len(restoring) < 2:
        return {}
    paths = [checkpoint_paths(c) for c in restoring]  # JAX's view of the state: on this thread
    return {c.index: read for c, read in zip(restoring, side_by_side(read_checkpoint, restoring, paths))}


STOP_WAIT_S = 5.0  # how long an interrupted `run_workers` waits for its workers to stop
CLOSED_POLL_S = 0.1  # how often a `run_workers` looks whether the server was closed meanwhile


class InProcessTransport:
    """Shards as objects in this process; workers as threads."""

    def __init__(self, device: Any = None):
        self._device = device
        self._closed = False  # a `run_workers` under way raises (its threads stop at their next pull or push)

    def start(self, configs: Sequence[ShardConfig]) -> list[InProcessChannel]:
        """The shards, built on this thread (under its JAX settings: `jax.default_device`, `jax.enable_x64`);
        a restore's checkpoint parts are read side by side first."""
        reads = _read_checkpoints(configs)
        return [InProcessChannel(ShardService(Shard(config, self._device, reads.get(config.index)))) for config in configs]

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list:
        """Runs each `fn(client, arg)` in a thread of its own; results in order, the first error raised.

        On Ctrl-C each worker stops at its next pull or push, and the driver
        raises once they have (or after `STOP_WAIT_S`: the threads are daemons,
        and a worker still computing does not hold up the exit). Waiting for
        them matters: a thread still in JAX's C++ code while the interpreter
        shuts down can abort the process ("terminate called ..."). The wait is
        on events, not `Thread.join`: a join that Ctrl-C interrupts marks a
        running thread as stopped on Python 3.11.
        """
        results: list = [None] * len(clients)
        errors: dict[int, BaseException] = {}
        finished = [threading.Event() for _ in clients]

        def run(i: int, client: Any, arg: Any) -> None:
            try:
                results[i] = run_worker(fn, client, arg)
            except BaseException as e:
                errors[i] = e
                worker_failed(client, e, any(not done.is_set() for k, done in enumerate(finished) if k != i))
            finally:
                finished[i].set()

        threads = [
            threading.Thread(target=run, args=(i, c, a), name=f"jaxps-worker-{i}", daemon=True)
            for i, (c, a) in enumerate(zip(clients, args))
        ]
        for t in threads:
            t.start()
        try:
            for done in finished:
                while not done.wait(CLOSED_POLL_S):
                    if self._closed:
                        raise ServerClosedError("the ParameterServer was closed while run_workers ran its workers")
        except BaseException as e:  # KeyboardInterrupt, or the server closed
            for c in clients:
                c.interrupt()
            deadline = time.monotonic() + STOP_WAIT_S
            for done in finished:
                done.wait(max(0.0, deadline - time.monotonic()))
            if isinstance(e, ServerClosedError):
                raise closed_while_running(dict(errors)) from None
            raise
        if errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        self._closed = True
