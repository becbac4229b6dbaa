"""The client's side of a shard's shared-memory endpoint: one channel class for every transport that has one.

`SharedMemoryChannel(index, endpoint, died)` connects lazily, once per thread.
The one thing transports do differently, how they tell that a shard has died,
is the `died` hook: a picklable callable returning the exception to raise.

A pull names a pull buffer that no earlier pull's arrays still use; the shard
copies the parameters into it, and the client lends it out without copying:
the pulled leaves are read-only numpy views over the buffer, put on the device
with `jax.device_put`, which on CPU adopts them (and keeps them alive) instead
of copying. The buffer is free again once every array over it is gone, so a
loop that drops its last pull before the next one alternates between one or
two buffers, whose pages stay mapped. If the user keeps pulls alive, the pool
grows; at `POOL` buffers the last free one is never lent: pulls landing there
are copied out. The shard writes only into the buffer a pull names, and the
client never names one that is lent out.

With `tcp=True` the channel reaches a shard on another machine over TCP
(`wire.Endpoint.tcp`): the same connection and requests, the same pull-buffer
pool and lending, but the buffers are this process's own memory and the
arrays stream over the socket (`wire.send_arrays` / `recv_arrays`).

A request's answer is read by the thread that waits for it (no reader
threads): answers may come out of order (a sync push is settled later), so
each connection keeps a table of its outstanding requests.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import time
import weakref
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxps.errors import ServerClosedError, ShardDiedError
from jaxps.service import RESENT_AFTER_RESTART, LostWithShard, Pull, Push, died_during_request, lost_answer, recovery_deadline, shorter
from jaxps.transport import ShardChannel, Staged, own_copy
from jaxps.transports import packed, shm, wire
from jaxps.transports.endpoint import POOL
from jaxps.validate import copy_checked, host_finite

try:  # JAX drops the numpy array under a dead jax array at its next call or GC; this does it now
    from jax._src.lib import _jax

    collect_garbage = _jax.collect_garbage
except (ImportError, AttributeError):  # another jaxlib: a freed pull buffer is seen a little later
    collect_garbage = lambda: None

_SLICE = 0.05  # seconds a waiting thread holds a connection's lock at a time


class _Lost(Exception):
    """A request's connection died while the shard is being restarted: send it again."""




class _Pending:
    """`.result()` of one request; whoever waits reads the connection."""

    def __init__(self, conn: "_Conn", request: Any = None):
        self._conn = conn
        self._request = request
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._reach: float | None = None  # the submit's time to reach the shard, which bounds sending it again too

    def _set(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error, self._done = value, error, True

    def done(self) -> bool:
        if not self._done:
            try:
                self._conn.wait(lambda: self._done, 0)
            except Exception:
                return True
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._conn.wait(lambda: self._done, timeout):
            raise TimeoutError(f"shard {self._conn.channel.index} did not answer within {timeout} s")
        if isinstance(self._error, _Lost):  # to the restarted shard
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._conn.channel.submit(self._request, timeout=shorter(left, self._reach)).result(left)
        if self._error is not None:
            raise self._error
        return self._value


class _Conn:
    """One thread's connection to a shard's endpoint, with its push buffer and pull buffers."""

    def __init__(self, channel: "SharedMemoryChannel", timeout: float | None):
        self.channel = channel
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._pending: weakref.WeakValueDictionary[int, _Pending] = weakref.WeakValueDictionary()
        self._push_busy: int | None = None  # push whose gradients the shard has not taken yet
        # whether the push buffer holds the next push's arrays: False (no), None (laid out as the leaves), or their layout
        self._staged: bool | tuple | None = False
        self._live_pull: int | None = None  # the one pull whose leaves may be read (others are abandoned)
        self._live_buf = (0, False)  # its pull buffer, and whether its views are lent out
        self._dead = False
        self.broken = False  # interrupted mid-message: the channel opens a new connection
        deadline = time.monotonic() + (wire.CONNECT_TIMEOUT if timeout is None else timeout)
        self._streamed = channel.tcp
        try:
            self._c = wire.connect(channel.endpoint, timeout, tcp=channel.tcp)
        except TimeoutError as e:
            raise TimeoutError(f"shard {channel.index}: {e}") from None
        except (OSError, EOFError) as e:
            raise channel.gone() from e
        try:
            if not self._c.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"shard {channel.index} did not send its buffers in time")
            hello = self._c.recv()
            if isinstance(hello, wire.Refused):
                raise RuntimeError(f"shard {channel.index} could not serve a new connection:\n{hello.traceback}")
            if self._streamed:  # private buffers: the push buffer, then the first pull buffer
                self._bufs = [mmap.mmap(-1, max(hello.push_size, 1)), mmap.mmap(-1, channel.size)]
            else:  # the shard's segments
                self._bufs = [shm.attach(n) for n in hello.names]
            self._c.send(wire.Attached())
        except BaseException as e:
            self._c.close()
            if isinstance(e, (OSError, EOFError)):
                raise channel.gone() from e
            raise
        self._push_views = shm.views(self._bufs[0], channel.layout, channel.offsets)
        self._lent: list[weakref.ref | None] = [None]  # per pull buffer: the base of the views it last lent out

    # -- requests ---------------------------------------------------------------
    def stage(self, leaves, check: bool) -> Staged:
        """Copies `leaves` into the push buffer once the shard has taken the last push's
        (checking each for NaN/Inf as it goes, if asked).

        Arrays laid out otherwise than the shard's leaves (a push filter's
        payload) are packed in as they come, and the push names their layout.
        """
        leaves = [np.asarray(x) for x in leaves]
        layout = [(x.shape, x.dtype) for x in leaves]
        own = layout == self.channel.layout
        if not own:
            offsets, size = shm.layout(layout)
            if size > len(self._bufs[0]):
                raise ValueError(f"shard {self.channel.index}: a push of {size:,} bytes does not fit its {len(self._bufs[0]):,}-byte buffer")
        with self._lock:
            self.wait(lambda: self._push_busy is None, None)
            views = self._push_views if own else shm.views(self._bufs[0], layout, offsets)
            if own and self.channel.flat is not None:  # back to back: one copy, one check
                flat = packed.flat_view(self._bufs[0], self.channel.flat, layout)
                np.concatenate([x.reshape(-1) for x in leaves], out=flat)
                finite = None
                if check:
                    finite = [True] * len(leaves) if host_finite(flat) else [host_finite(v) for v in views]
            elif check:
                finite = [copy_checked(view, x) for view, x in zip(views, leaves)]
            else:
                finite = None
                for view, x in zip(views, leaves):
                    np.copyto(view, x)
            self._staged = None if own else tuple((x.shape, x.dtype) for x in leaves)
        return Staged(None, finite)

    def submit(self, request) -> _Pending:
        with self._lock:
            if isinstance(request, Push):
                return self._push(request)
            if isinstance(request, Pull):
                return self._pull(request)
            return self._send(request)[1]

    def _push(self, request: Push) -> _Pending:
        if not request.skipped and self._staged is False:
            raise RuntimeError("a push must be staged first: ShardChannel.stage(leaves, check)")
        rid, pending = self._send(request, layout=None if request.skipped else self._staged)
        if not request.skipped:
            self._push_busy, self._staged = rid, False
        return pending

    def _pull(self, request: Pull) -> _Pending:
        if self._live_pull is not None:  # an abandoned (timed-out) pull: its leaves will not be read
            old = self._pending.pop(self._live_pull, None)
            if old is not None:
                old._set(error=RuntimeError("superseded by a later pull from the same thread"))
            self._live_pull = None
        buf = self._free_buffer()
        rid, pending = self._send(request, buf[0])
        self._live_pull, self._live_buf = rid, buf
        return pending

    def _free_buffer(self) -> tuple[int, bool]:
        """A pull buffer no pulled array uses (growing the pool if need be), and whether to lend it.

        At `POOL` buffers the last free one is not lent, so a pull always has
        one. An abandoned pull's buffer is free: the shard handles requests in
        order, so it will not write there once it has seen this pull.
        """
        collect_garbage()
        free = [i for i, base in enumerate(self._lent) if base is None or base() is None]
        if not free:
            free = [self._grow()]
        return free[0], len(self._lent) < POOL or len(free) > 1

    def _grow(self) -> int:
        """Maps one more pull buffer, made by the shard, which unlinks its name once told it is mapped
        (streamed: one of this process's own)."""
        if self._streamed:
            self._bufs.append(mmap.mmap(-1, self.channel.size))
            self._lent.append(None)
            return len(self._lent) - 1
        name = self.call(wire.Grow())
        try:
            buf = shm.attach(name)
        finally:
            self.call(wire.Mapped(name))
        self._bufs.append(buf)
        self._lent.append(None)
        return len(self._lent) - 1

    def _take(self, buf: int, lend: bool) -> list[jax.Array]:
        """The leaves just pulled into buffer `buf`: lent out as read-only views, or copied out."""
        if self.channel.unpack is not None:  # copied out in one call (the buffer stays free)
            return self.channel.unpack(self._bufs[1 + buf])
        views = shm.views(self._bufs[1 + buf], self.channel.layout, self.channel.offsets)
        if not lend:
            return [own_copy(v) for v in views]
        for v in views:
            v.flags.writeable = False
        if views:  # every array over the buffer (JAX's included) keeps their base alive
            self._lent[buf] = weakref.ref(views[0].base)
        return jax.device_put(views)  # one call for all leaves: far less overhead per leaf than one each

    def call(self, request) -> Any:
        with self._lock:
            _, pending = self._send(request)
        return pending.result()

    # -- the wire -----------------------------------------------------------------
    def _send(self, request, buffer: int = 0, layout: tuple | None = None) -> tuple[int, _Pending]:
        self._check()
        rid, pending = next(self._ids), _Pending(self, request)
        self._pending[rid] = pending
        try:
            wire.send(self._c, wire.Call(rid, request, buffer, layout))
            if self._streamed and wire.carries_arrays(request):  # the staged arrays follow their call
                wire.send_arrays(self._c, self._staged_views(layout))
        except (OSError, EOFError, ValueError):
            self._die()
            self._check()
        except BaseException:  # e.g. KeyboardInterrupt: the stream may hold half a message
            self._break()
            raise
        return rid, pending

    def _staged_views(self, layout: tuple | None) -> list[np.ndarray]:
        """The push buffer as the staged arrays (laid out as the shard's leaves, or as `layout`)."""
        if layout is None:
            return self._push_views
        specs = [(tuple(shape), np.dtype(dtype)) for shape, dtype in layout]
        return shm.views(self._bufs[0], specs, shm.layout(specs)[0])

    def wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Reads answers until `ready()`; False if `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            self._check()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = _SLICE if left is None else min(left, _SLICE)
            if self._lock.acquire(timeout=step):
                try:
                    if not ready():
                        self._read_answer(step)
                finally:
                    self._lock.release()
            if not ready() and left is not None and time.monotonic() >= deadline:
                return False
        return True

    def _read_answer(self, within: float) -> bool:
        """(Under the lock.) Reads and handles one answer if one comes within `within` s; whether one did. A
        connection that ended, or a message cut short, makes it dead; an interrupt breaks it."""
        try:
            if self._dead or not self._c.poll(within):
                return False
            self._handle(wire.recv(self._c))
            return True
        except (OSError, EOFError, ValueError):
            self._die()
            return False
        except BaseException:
            self._break()
            raise

    def _handle(self, message) -> None:
        rid = message.rid
        if rid == self._push_busy:
            self._push_busy = None
        if isinstance(message, wire.Taken):
            return
        if isinstance(message, wire.Pulled):
            if self._streamed:  # the leaves follow on the socket: read them now, wanted or not
                if rid != self._live_pull:
                    return wire.skip_bytes(self._c, sum(int(np.prod(s)) * d.itemsize for s, d in self.channel.layout))
                views = shm.views(self._bufs[1 + self._live_buf[0]], self.channel.layout, self.channel.offsets)
                wire.recv_arrays(self._c, views)
                del views
            if rid != self._live_pull:
                return
            self._live_pull = None
            pending = self._pending.pop(rid, None)
            if pending is not None:
                pending._set((message.version, self._take(*self._live_buf)))
            return
        if rid == self._live_pull:  # answered without leaves: the client holds them already
            self._live_pull = None
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        if isinstance(message, wire.Failure):
            pending._set(error=wire.unpack_error(message.error, message.traceback, f"shard {self.channel.index}"))
        else:
            pending._set(message.value)

    def _check(self) -> None:
        if self._dead:
            raise RuntimeError("this connection was interrupted") if self.broken else self.channel.gone()

    @property
    def dead(self) -> bool:
        return self._dead

    def alive(self) -> bool:
        """Whether the shard may still be at the other end: answers already there are read, without waiting, so a
        connection its shard closed (it died) is found dead now, before a request is staged or sent on it."""
        if self._dead or not self._lock.acquire(blocking=False):  # (busy: another thread is reading its answers)
            return not self._dead
        try:
            while self._read_answer(0):
                pass
        finally:
            self._lock.release()
        return not self._dead

    def _die(self, error: Callable[[], Exception] | None = None) -> None:
        self._dead = True
        recovering = error is None and self.channel.recovery is not None and not self.channel.closed
        for pending in list(self._pending.values()):
            answer = lost_answer(pending._request, self.channel.recovery.standby) if recovering else None
            if answer is not None:  # rolled back with the shard, or to be sent again by the client
                pending._set(answer)
            elif recovering and isinstance(pending._request, RESENT_AFTER_RESTART):
                pending._set(error=_Lost())
            else:
                pending._set(error=(error or self.channel.gone)())
        self._pending.clear()

    def _break(self) -> None:
        self.broken = True
        self._die(lambda: RuntimeError("interrupted: this request's answer is lost"))
        self._c.close()

    def close(self) -> None:
        """Drops the connection and unmaps the buffers (those still lent out go with their last view)."""
        if not self._lock.acquire(timeout=1.0):
            return
        try:
            self._die()
            self._c.close()
            self._push_views = []
            for b in self._bufs:
                try:
                    b.close()
                except BufferError:  # a pulled array still uses it; the mapping goes with the last one
                    pass
            self._bufs = []
        finally:
            self._lock.release()


class Recovery(NamedTuple):
    """A shard that dies is restarted at the same endpoint: wait up to `timeout` s for it, unless segment `given_up` appears."""

    timeout: float
    given_up: str  # a shared-memory segment the driver creates, holding the reason, once it stops restarting
    standby: bool = False  # a standby takes over (`replicas=1`): clients send what was in flight again (`lost_answer`)


class SharedMemoryChannel(ShardChannel):
    """A client's line to one shard's endpoint; connects lazily, once per thread.

    `died()` returns the exception for a shard that has gone away (it must be
    picklable if the channel is). With `recovery`, a dead shard is waited for
    instead: requests in flight go to the restarted shard (a push's answer is
    "rolled_back"), new ones wait until it serves again.
    """

    def __init__(
        self, index: int, endpoint: wire.Endpoint, died: Callable[[], Exception], recovery: Recovery | None = None, tcp: bool = False
    ):
        self.index, self.endpoint, self.died, self.recovery, self.tcp = index, endpoint, died, recovery, tcp
        self.layout = [(tuple(s), np.dtype(d)) for s, d in endpoint.layout]
        self.offsets, self.size = packed.layout(self.layout)  # as the shard lays its buffers out
        # many small leaves: pulled as copies, in one call; those of one dtype lie back to back
        self.unpack = packed.Unpacker(self.layout, self.offsets) if packed.worth_packing(self.layout) else None
        self.flat = packed.flat_dtype(self.layout)
        self._local = threading.local()
        self._conns: weakref.WeakSet[_Conn] = weakref.WeakSet()

    def __reduce__(self):
        return (SharedMemoryChannel, (self.index, self.endpoint, self.died, self.recovery, self.tcp))

    def gone(self) -> Exception:
        if self.closed:
            return ServerClosedError("the ParameterServer is closed")
        if self._server_gone():
            return ServerClosedError("the ParameterServer was closed (or its driver ended): its shards' socket directory is gone")
        if self.recovery is not None:
            return died_during_request(self.index, self.recovery.standby)
        return self.died()

    def _server_gone(self) -> bool:
        """Whether the directory of the shard's socket is gone: its server was closed, or its driver and shards
        ended (no restart can come: a restarted shard serves in that directory). An abstract socket cannot say."""
        address = self.endpoint.address
        if self.tcp or not isinstance(address, str) or address.startswith("\0"):  # (over TCP: another machine's path)
            return False
        return not os.path.isdir(os.path.dirname(address))

    def conn(self, timeout: float | None = None, wait: bool = True, look: bool = True) -> _Conn:
        """This thread's connection, made on first use (within `timeout` seconds).

        With `recovery`, a dead shard's connection is made anew, waiting for
        the restarted shard (unless not `wait`). With `look`, it is found dead
        before it is used: a push staged on the connection of a shard
        restarted since would be answered "rolled_back" while the other shards
        apply it.
        """
        if self.closed:
            raise self.gone()
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.broken or (self.recovery is not None and (conn.dead or (look and not conn.alive()))):
            conn = self._local.conn = self._connect(timeout, wait)
            self._conns.add(conn)
        return conn

    def _connect(self, timeout: float | None, wait: bool) -> _Conn:
        """A new connection; with `recovery` (and `wait`), retried while the shard is being restarted, for at most
        `timeout` seconds if given (the supervisor's own requests must not wait for the recovery it runs)."""
        if self.recovery is None or not wait:
            return _Conn(self, timeout)
        deadline, not_back = recovery_deadline(self.index, self.recovery.timeout, timeout)
        while True:
            try:
                return _Conn(self, timeout)
            except ShardDiedError:
                reason = shm.read_text(self.recovery.given_up)
                if reason is not None:
                    raise ShardDiedError(reason) from None
                if self.closed or self._server_gone():
                    raise self.gone() from None
                if time.monotonic() >= deadline:
                    raise not_back from None
                time.sleep(0.05)

    def stage(self, leaves, check: bool) -> Staged:
        conn = self.conn(look=False)
        if self.recovery is not None and not conn.alive():  # it died since this thread last heard from it
            if self.recovery.standby:  # the pushes lost with it (answered so just now) go first
                raise LostWithShard()
            conn = self.conn()
        try:
            return conn.stage(leaves, check)
        except ShardDiedError:
            if self.recovery is None or self.closed or not conn.dead:
                raise
            if self.recovery.standby:  # the pushes lost with it go first
                raise LostWithShard() from None
            return self.conn().stage(leaves, check)  # on the restarted shard

    def submit(self, request, payload=None, timeout=None) -> _Pending:
        # a push staged by `stage` goes on the connection it was staged on, dead or not (then answered as lost)
        staged = isinstance(request, Push) and not request.skipped and payload is None
        conn = self.conn(timeout, wait=isinstance(request, (Push, *RESENT_AFTER_RESTART)), look=not staged)
        if payload is not None:  # a push whose leaves were not staged here
            conn.stage(payload, False)
        try:
            pending = conn.submit(request)
        except ShardDiedError:
            if self.recovery is None or self.closed or not conn.dead:
                raise
            answer = lost_answer(request, self.recovery.standby)
            if answer is not None:  # (a push: staged on the connection that died) rolled back, or sent again by the client
                done = _Pending(conn, request)
                done._set(answer)
                return done
            if not isinstance(request, RESENT_AFTER_RESTART):
                raise
            pending = self.conn(timeout).submit(request)
        pending._reach = timeout  # (sent again if lost with its shard: within the same time to reach the restarted one)
        return pending

    def close(self) -> None:
        super().close()
        for conn in list(self._conns):
            conn.close()

    def __repr__(self) -> str:
        via = f", tcp={self.endpoint.tcp[0]}:{self.endpoint.tcp[1]}" if self.tcp else ""
        return f"SharedMemoryChannel(shard={self.index}, pid={self.endpoint.pid}{via})"
