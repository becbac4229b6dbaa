"""Multiprocessing transport: each shard serves from its own spawned process.

Only small control messages (request ids, worker, tag, versions, outcomes)
cross the `multiprocessing.connection` sockets; array data crosses only
through shared memory. Every connection (one per client thread and process)
gets a push buffer and a pool of pull buffers (one at first, at most `POOL`),
each sized to the shard, created by the shard process and unlinked as soon as
the client has mapped them, so no segment name outlives a handshake and a
killed process leaks nothing. The initial leaves travel the same way; the
`ShardSpec` (with the optax closures) goes by cloudpickle.

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

A request's reply is read by the thread that waits for it (no reader
threads): replies may come out of order (a sync push is settled later), so
each connection keeps a table of its outstanding requests. A shard process
exits when told to or when its parent is gone; if one dies, the next call on
its channel raises `ShardDiedError`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import weakref
from multiprocessing import connection
from typing import Any, Callable, Sequence

import cloudpickle
import jax
import numpy as np

from jaxps.client import leave_quietly, run_worker
from jaxps.shard import ShardSpec
from jaxps.transport import STAGED, ShardDiedError
from jaxps.validate import copy_checked
from transports import shm

try:  # JAX drops the numpy array under a dead jax array at its next call or GC; this does it now
    from jax._src.lib import _jax

    _collect_garbage = _jax.collect_garbage
except (ImportError, AttributeError):  # another jaxlib: a freed pull buffer is seen a little later
    _collect_garbage = lambda: None

_SLICE = 0.05  # seconds a waiting thread holds a connection's lock at a time
POOL = 4  # pull buffers per connection, at most
_MAIN_GUARD = "a script that starts a ParameterServer must do so under `if __name__ == '__main__':`"


def _own(view: np.ndarray) -> jax.Array:
    """A jax array holding a private copy of `view` (shared memory is reused, and JAX may alias it).

    The copy is 64-byte aligned so that JAX on CPU can adopt it without a second copy.
    """
    raw = np.empty(view.nbytes + shm.ALIGN, np.uint8)
    start = -raw.ctypes.data % shm.ALIGN
    out = raw[start : start + view.nbytes].view(view.dtype).reshape(view.shape)
    np.copyto(out, view)
    return jax.device_put(out)


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return self.args[0]


def _pack(e: BaseException) -> bytes | None:
    try:
        return cloudpickle.dumps(e)
    except Exception:
        return None


def _unpack(packed: bytes | None, tb: str, where: str) -> BaseException:
    """The exception raised in another process, with its traceback as the cause."""
    try:
        e = cloudpickle.loads(packed) if packed is not None else None
    except Exception:
        e = None
    if not isinstance(e, BaseException):
        e = RuntimeError(f"{where} failed:\n{tb}")
    e.__cause__ = _RemoteTraceback(f"\n\nin {where}'s process:\n{tb}")
    return e


class _Reply:
    """`.result()` of one request; whoever waits reads the connection."""

    def __init__(self, conn: "_Conn"):
        self._conn = conn
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

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
        if not self._conn.wait(lambda: self._done, timeout):
            raise TimeoutError(f"shard {self._conn.channel.index} did not answer within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value


class _Conn:
    """One thread's connection to a shard process, with its push buffer and pull buffers."""

    def __init__(self, channel: "MultiprocessingChannel"):
        self.channel = channel
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._replies: weakref.WeakValueDictionary[int, _Reply] = weakref.WeakValueDictionary()
        self._push_busy: int | None = None  # push whose leaves the shard has not copied out yet
        self._live_pull: int | None = None  # the one pull whose leaves may be read (others are abandoned)
        self._live_buf = (0, False)  # its pull buffer, and whether its views are lent out
        self._dead = False
        self.broken = False  # interrupted mid-message: the channel opens a new connection
        try:
            self._c = connection.Client(channel.address, "AF_UNIX", authkey=channel.authkey)
        except (OSError, EOFError) as e:
            raise channel.gone() from e
        try:
            kind, *names = self._c.recv()
            if kind == "error":
                raise RuntimeError(f"shard {channel.index} could not serve a new connection:\n{names[0]}")
            self._bufs = [shm.attach(n) for n in names]  # the push buffer, then the first pull buffer
            self._c.send("attached")
        except BaseException as e:
            self._c.close()
            if isinstance(e, (OSError, EOFError)):
                raise channel.gone() from e
            raise
        self._push_views = shm.views(self._bufs[0], channel.specs, channel.offsets)
        self._lent: list[weakref.ref | None] = [None]  # per pull buffer: the base of the views it last lent out

    # -- requests ---------------------------------------------------------------
    def stage(self, leaves, check: bool = False) -> tuple[str, list[bool] | None]:
        """Copies `leaves` into the push buffer once the shard is done with the last push's
        (checking each for NaN/Inf as it goes, if asked)."""
        with self._lock:
            self.wait(lambda: self._push_busy is None, None)
            if check:
                return STAGED, [copy_checked(view, np.asarray(x)) for view, x in zip(self._push_views, leaves)]
            for view, x in zip(self._push_views, leaves):
                np.copyto(view, np.asarray(x))
        return STAGED, None

    def push(self, worker, tag, based_on, leaves) -> _Reply:
        with self._lock:
            if leaves is not None and leaves is not STAGED:
                self.stage(leaves)
            rid, reply = self._send("push", worker, tag, based_on, leaves is not None)
            if leaves is not None:
                self._push_busy = rid
            return reply

    def pull(self, worker) -> _Reply:
        with self._lock:
            if self._live_pull is not None:  # an abandoned (timed-out) pull: its leaves will not be read
                old = self._replies.pop(self._live_pull, None)
                if old is not None:
                    old._set(error=RuntimeError("superseded by a later pull from the same thread"))
                self._live_pull = None
            buf = self._free_buffer()
            rid, reply = self._send("pull", worker, buf[0])
            self._live_pull, self._live_buf = rid, buf
            return reply

    def _free_buffer(self) -> tuple[int, bool]:
        """A pull buffer no pulled array uses (growing the pool if need be), and whether to lend it.

        At `POOL` buffers the last free one is not lent, so a pull always has
        one. An abandoned pull's buffer is free: the shard handles requests in
        order, so it will not write there once it has seen this pull.
        """
        _collect_garbage()
        free = [i for i, base in enumerate(self._lent) if base is None or base() is None]
        if not free:
            free = [self._grow()]
        return free[0], len(self._lent) < POOL or len(free) > 1

    def _grow(self) -> int:
        """Maps one more pull buffer, made by the shard, which unlinks its name once told it is mapped."""
        name = self.call("grow")
        try:
            buf = shm.attach(name)
        finally:
            self.call("mapped", name)
        self._bufs.append(buf)
        self._lent.append(None)
        return len(self._lent) - 1

    def _take(self, buf: int, lend: bool) -> list[jax.Array]:
        """The leaves just pulled into buffer `buf`: lent out as read-only views, or copied out."""
        views = shm.views(self._bufs[1 + buf], self.channel.specs, self.channel.offsets)
        if not lend:
            return [_own(v) for v in views]
        for v in views:
            v.flags.writeable = False
        if views:  # every array over the buffer (JAX's included) keeps their base alive
            self._lent[buf] = weakref.ref(views[0].base)
        return [jax.device_put(v) for v in views]

    def call(self, op: str, *args) -> Any:
        with self._lock:
            _, reply = self._send(op, *args)
        return reply.result()

    # -- the wire -----------------------------------------------------------------
    def _send(self, op: str, *args) -> tuple[int, _Reply]:
        self._check()
        rid, reply = next(self._ids), _Reply(self)
        self._replies[rid] = reply
        try:
            self._c.send((op, rid, *args))
        except (OSError, EOFError, ValueError):
            self._die()
            self._check()
        except BaseException:  # e.g. KeyboardInterrupt: the stream may hold half a message
            self._break()
            raise
        return rid, reply

    def wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Reads replies until `ready()`; False if `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            self._check()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = _SLICE if left is None else min(left, _SLICE)
            if self._lock.acquire(timeout=step):
                try:
                    if not ready() and not self._dead and self._c.poll(step):
                        self._handle(self._c.recv())
                except (OSError, EOFError, ValueError):
                    self._die()
                except BaseException:
                    self._break()
                    raise
                finally:
                    self._lock.release()
            if not ready() and left is not None and time.monotonic() >= deadline:
                return False
        return True

    def _handle(self, msg) -> None:
        rid, kind, *rest = msg
        if rid == self._push_busy:
            self._push_busy = None
        if kind == "taken":
            return
        if kind == "pulled":
            if rid != self._live_pull:
                return
            self._live_pull = None
            reply = self._replies.pop(rid, None)
            if reply is not None:
                reply._set((rest[0], self._take(*self._live_buf)))
            return
        reply = self._replies.pop(rid, None)
        if reply is None:
            return
        if kind == "error":
            reply._set(error=_unpack(rest[0], rest[1], f"shard {self.channel.index}"))
        else:
            reply._set(rest[0])

    def _check(self) -> None:
        if self._dead:
            raise RuntimeError("this connection was interrupted") if self.broken else self.channel.gone()

    def _die(self, error: Callable[[], Exception] | None = None) -> None:
        self._dead = True
        for reply in list(self._replies.values()):
            reply._set(error=(error or self.channel.gone)())
        self._replies.clear()

    def _break(self) -> None:
        self.broken = True
        self._die(lambda: RuntimeError("interrupted: this request's reply is lost"))
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


class MultiprocessingChannel:
    """A client's picklable line to one shard process; connects lazily, once per thread."""

    def __init__(self, index: int, pid: int, address: str, authkey: bytes, specs: Sequence[tuple]):
        self.index, self.pid, self.address, self.authkey = index, pid, address, authkey
        self.specs = [(tuple(s), np.dtype(d)) for s, d in specs]
        self.offsets, _ = shm.layout(self.specs)
        self._local = threading.local()
        self._conns: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._closed = False

    def __reduce__(self):
        return (MultiprocessingChannel, (self.index, self.pid, self.address, self.authkey, self.specs))

    def gone(self) -> Exception:
        if self._closed:
            return RuntimeError("the ParameterServer is closed")
        return ShardDiedError(
            f"shard {self.index} (pid {self.pid}) has died; its parameters and optimizer state are lost"
        )

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.broken:
            if self._closed:
                raise self.gone()
            conn = self._local.conn = _Conn(self)
            self._conns.add(conn)
        return conn

    def stage(self, leaves, check: bool = False) -> tuple[str, list[bool] | None]:
        return self._conn().stage(leaves, check)

    def push(self, worker, tag, based_on, leaves) -> _Reply:
        return self._conn().push(worker, tag, based_on, leaves)

    def pull(self, worker) -> _Reply:
        return self._conn().pull(worker)

    def leave(self, worker) -> None:
        self._conn().call("leave", worker)

    def join(self, worker) -> int:
        return self._conn().call("join", worker)

    def stats(self) -> dict:
        return self._conn().call("stats")

    def close(self) -> None:
        self._closed = True
        for conn in list(self._conns):
            conn.close()

    def __repr__(self) -> str:
        return f"MultiprocessingChannel(shard={self.index}, pid={self.pid})"


# -- the shard process ---------------------------------------------------------------
class _Peer:
    """The shard process's side of one connection."""

    def __init__(self, conn, server: "_Server", name: str, bufs):
        self._conn, self._server, self._shard, self._bufs = conn, server, server._shard, bufs
        self._name = name  # of this connection's segments
        self._offsets, _ = shm.layout(server._specs)
        self._push_views = shm.views(bufs[0], server._specs, self._offsets)
        self._pull_views = [shm.views(bufs[1], server._specs, self._offsets)]
        self._lock = threading.Lock()  # taken after the shard's lock, never before
        self._live_pull: int | None = None
        self._live_buf = 0  # the pull buffer the live pull's leaves go to
        self._closed = False

    def run(self) -> None:
        ops = {
            "push": self._push,
            "pull": self._pull,
            "leave": self._leave,
            "join": self._join,
            "stats": self._stats,
            "grow": self._grow,
            "mapped": self._mapped,
        }
        try:
            while True:
                try:
                    op, rid, *args = self._conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    ops[op](rid, *args)
                except Exception as e:
                    self._send((rid, "error", _pack(e), traceback.format_exc()))
        finally:
            self._server.release([f"{self._name}_pull{i}" for i in range(len(self._pull_views))])  # a grow cut short
            with self._lock:
                self._closed = True
                self._push_views = self._pull_views = []
                for b in self._bufs:
                    try:
                        b.close()
                    except BufferError:  # a view is still alive; the mapping goes with it
                        pass
                self._conn.close()

    def _send(self, msg) -> None:
        with self._lock:
            self._send_locked(msg)

    def _send_locked(self, msg) -> None:
        if not self._closed:
            try:
                self._conn.send(msg)
            except OSError:  # the client is gone; `run` sees EOF next
                pass

    def _push(self, rid, worker, tag, based_on, has_leaves) -> None:
        # The client reuses the buffer once it hears back: a shard that keeps gradients
        # (sync mode) gets a real copy; otherwise the step reads the buffer in place
        # and the reply waits until it has run.
        keep = self._shard.keeps_gradients
        leaves = [_own(v) if keep else jax.device_put(v) for v in self._push_views] if has_leaves else None
        lock, early = threading.Lock(), []  # outcomes settled before the step has run

        def done(outcome):
            with lock:
                if early is not None:
                    early.append(outcome)
                    return
            self._send((rid, "outcome", outcome))

        self._shard.push(worker, tag, based_on, leaves, done)
        del leaves
        if not keep:
            self._shard.block_until_ready()
        with lock:
            settled, early = early, None
        self._send((rid, "outcome", settled[0]) if settled else (rid, "taken"))

    def _pull(self, rid, worker, buf) -> None:
        if not 0 <= buf < len(self._pull_views):
            raise ValueError(f"no pull buffer {buf}")
        with self._lock:  # an earlier pull not served yet is abandoned: its buffer may be reused
            self._live_pull, self._live_buf = rid, buf
        self._shard.pull(worker, functools.partial(self._ready, rid), lend=False)

    def _ready(self, rid, version, leaves) -> None:  # under the shard's lock: the leaves are consistent
        with self._lock:
            if self._closed or rid != self._live_pull:
                return
            self._live_pull = None
            for view, x in zip(self._pull_views[self._live_buf], leaves):
                np.copyto(view, np.asarray(x))
            self._send_locked((rid, "pulled", version))

    def _grow(self, rid) -> None:
        """A new pull buffer; its name lasts until the client says it has mapped it ('mapped')."""
        if len(self._pull_views) >= POOL:
            raise RuntimeError(f"a connection has at most {POOL} pull buffers")
        name = f"{self._name}_pull{len(self._pull_views)}"
        buf = self._server.create(name)
        self._bufs.append(buf)
        self._pull_views.append(shm.views(buf, self._server._specs, self._offsets))
        self._send((rid, "ok", name))

    def _mapped(self, rid, name) -> None:
        self._server.release([name])
        self._send((rid, "ok", None))

    def _leave(self, rid, worker) -> None:
        self._shard.leave(worker)
        self._send((rid, "ok", None))

    def _join(self, rid, worker) -> None:
        self._send((rid, "ok", self._shard.join(worker)))

    def _stats(self, rid) -> None:
        self._send((rid, "ok", self._shard.stats()))


class _Server:
    """Accepts connections and gives each a thread and its buffers."""

    def __init__(self, shard, specs, prefix: str):
        self._shard, self._specs, self._prefix = shard, specs, prefix
        self._size = shm.layout(specs)[1]
        self._lock = threading.Lock()
        self._unlinked_later: set[str] = set()  # created, not yet mapped by the client
        self._stopping = False
        self._ids = itertools.count()

    def accept(self, listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except (EOFError, ConnectionError, multiprocessing.AuthenticationError):
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        name = f"{self._prefix}s{self._shard.index}c{next(self._ids)}"
        names = [f"{name}_push", f"{name}_pull0"]
        bufs = []
        try:
            bufs = [self.create(n) for n in names]
            conn.send(("buffers", *names))
            if conn.recv() != "attached":
                raise EOFError
        except Exception:
            if not self._stopping:
                try:
                    conn.send(("error", traceback.format_exc()))
                except OSError:
                    pass
            for b in bufs:
                b.close()
            return conn.close()
        finally:
            self.release(names)
        _Peer(conn, self, name, bufs).run()

    def create(self, name: str):
        """A new segment the size of the shard, for a client to map; its name lasts until `release`."""
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"shard {self._shard.index} is stopping")
            self._unlinked_later.add(name)
            return shm.create(name, self._size)

    def release(self, names) -> None:
        """Unlinks `names` (their mappings stay); a no-op for those already gone."""
        with self._lock:
            for name in names:
                shm.unlink(name)
            self._unlinked_later.difference_update(names)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for name in self._unlinked_later:
                shm.unlink(name)


def _shard_main(ctrl, payload: bytes, address: str, authkey: bytes, prefix: str) -> None:
    """A shard process: reports ready (or its traceback), serves, exits on 'stop' or its parent's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it stops us
    try:
        from jaxps.shard import Shard

        spec = cloudpickle.loads(payload)
        spec = dataclasses.replace(spec, leaves=spec.leaves.load())
        specs = [(spec.plan.leaves[i].shape, spec.plan.leaves[i].dtype) for i in spec.plan.shard_leaves[spec.index]]
        server = _Server(Shard(spec), specs, prefix)
        listener = connection.Listener(address, "AF_UNIX", backlog=64, authkey=authkey)
    except BaseException:
        ctrl.send(("error", traceback.format_exc()))
        return
    threading.Thread(target=server.accept, args=(listener,), daemon=True).start()
    ctrl.send(("ready", os.getpid()))
    try:
        ctrl.recv()  # "stop", or EOF once the parent is gone
    except (EOFError, OSError):
        pass
    server.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # serving threads may be inside JAX; do not wait for them


def _worker_main(out, payload: bytes) -> None:
    """A `run_workers` process: runs one worker and sends back its result or exception."""
    fn, client, arg = cloudpickle.loads(payload)
    try:
        msg = ("ok", cloudpickle.dumps(run_worker(fn, client, arg)))
    except BaseException as e:
        msg = ("error", _pack(e), traceback.format_exc())
    out.send(msg)
    out.close()


def _shutdown(procs, ctrls, channels, prefix: str, tmpdir: str | None) -> None:
    for ch in channels:
        ch.close()
    for ctrl in ctrls:
        try:
            ctrl.send("stop")
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    for ctrl in ctrls:
        ctrl.close()
    shm.sweep(prefix)
    if tmpdir is not None:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


class MultiprocessingTransport:
    """Shards in spawned processes on this machine; workers in spawned processes.

    Args:
      start_timeout: seconds to wait for the shard processes to report ready.

    `pids` are the shard processes' ids; every shared-memory segment of this
    server is named with `shm_prefix`. Each client thread (in any process)
    maps, per shard it talks to, a push buffer and one to `POOL` pull buffers
    the size of the shard (more only while it keeps earlier pulls alive).
    """

    def __init__(self, start_timeout: float = 60.0):
        self.start_timeout = start_timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list = []
        self._ctrls: list = []
        self._channels: list[MultiprocessingChannel] = []
        self._finalizer: weakref.finalize | None = None
        self.shm_prefix: str | None = None  # every segment of this server is named with it

    @property
    def pids(self) -> list[int]:
        """The shard processes' pids, by shard index."""
        return [p.pid for p in self._procs]

    def start(self, specs: Sequence[ShardSpec]) -> list[MultiprocessingChannel]:
        if self._finalizer is not None:
            raise RuntimeError("this transport has already been started")
        prefix = self.shm_prefix = f"jaxps_{uuid.uuid4().hex[:16]}_"
        tmpdir = None if sys.platform.startswith("linux") else tempfile.mkdtemp(prefix="jaxps_")
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._ctrls, self._channels, prefix, tmpdir)
        authkey = os.urandom(32)
        addresses, leaf_specs, inits = [], [], []
        try:
            for spec in specs:
                plan = spec.plan
                leaf_specs.append([(plan.leaves[i].shape, plan.leaves[i].dtype) for i in plan.shard_leaves[spec.index]])
                init = shm.SharedLeaves.write(f"{prefix}s{spec.index}_init", leaf_specs[-1], spec.leaves)
                inits.append(init.name)
                try:
                    payload = cloudpickle.dumps(dataclasses.replace(spec, leaves=init))
                except Exception as e:
                    raise TypeError(f"cannot send shard {spec.index}'s spec (the optimizer) to its process: {e}") from e
                name = f"{prefix}s{spec.index}"
                addresses.append("\0" + name if tmpdir is None else os.path.join(tmpdir, name))
                ours, theirs = self._ctx.Pipe()
                p = self._ctx.Process(
                    target=_shard_main,
                    args=(theirs, payload, addresses[-1], authkey, prefix),
                    name=f"jaxps-shard-{spec.index}",
                    daemon=True,
                )
                self._ctrls.append(ours)
                try:
                    p.start()
                finally:
                    theirs.close()  # the child has its copy (or never started)
                self._procs.append(p)
            deadline = time.monotonic() + self.start_timeout
            for spec, p, ctrl in zip(specs, self._procs, self._ctrls):
                self._await_ready(spec.index, p, ctrl, deadline)
        except BaseException:
            self.close()
            raise
        finally:
            for name in inits:
                shm.unlink(name)
        self._channels.extend(
            MultiprocessingChannel(spec.index, p.pid, a, authkey, ls)
            for spec, p, a, ls in zip(specs, self._procs, addresses, leaf_specs)
        )
        return list(self._channels)

    def _await_ready(self, index: int, p, ctrl, deadline: float) -> None:
        if not ctrl.poll(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"shard {index}'s process (pid {p.pid}) did not start within {self.start_timeout} s")
        try:
            msg = ctrl.recv()
        except EOFError:
            p.join(1.0)
            raise RuntimeError(
                f"shard {index}'s process (pid {p.pid}) exited with code {p.exitcode} before it was ready "
                f"(see its output above; {_MAIN_GUARD})"
            ) from None
        if msg[0] == "error":
            raise RuntimeError(f"shard {index} failed to start in its process (pid {p.pid}):\n{msg[1]}")

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list:
        """Runs each `fn(client, arg)` in its own spawned process; results in order, the first error raised."""
        payloads = [cloudpickle.dumps((fn, c, a)) for c, a in zip(clients, args)]
        procs, pipes = [], {}
        results: list = [None] * len(payloads)
        errors: dict[int, BaseException] = {}
        try:
            for i, payload in enumerate(payloads):
                ours, theirs = self._ctx.Pipe(duplex=False)
                p = self._ctx.Process(target=_worker_main, args=(theirs, payload), name=f"jaxps-worker-{i}")
                pipes[ours] = i
                try:
                    p.start()
                finally:
                    theirs.close()  # the child has its copy (or never started)
                procs.append(p)
            while pipes:
                for ours in connection.wait(list(pipes)):
                    i = pipes.pop(ours)
                    try:
                        msg = ours.recv()
                    except EOFError:
                        procs[i].join(5.0)
                        errors[i] = RuntimeError(f"worker {i}'s process died (exit code {procs[i].exitcode})")
                        leave_quietly(clients[i])  # so that the others' sync steps and ssp pulls go on
                        continue
                    finally:
                        ours.close()
                    if msg[0] == "ok":
                        results[i] = cloudpickle.loads(msg[1])
                    else:
                        errors[i] = _unpack(msg[1], msg[2], f"worker {i}")
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
            for ours in pipes:
                ours.close()
        if errors:
            raise errors[min(errors)]
        return results

    def close(self) -> None:
        """Stops the shard processes and removes every shared-memory segment. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
