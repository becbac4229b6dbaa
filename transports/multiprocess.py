"""Multiprocessing transport: each shard serves from its own spawned process.

This module is the processes' lifecycle only: start the shard processes
(`spawn`, never `fork`: JAX is multithreaded), wait until each serves its
shard's endpoint (`jaxps.transports.endpoint`), run workers in processes of
their own, and leave nothing behind. Clients reach the shards through
`SharedMemoryChannel`s: control messages over Unix sockets, arrays through
shared memory. The initial leaves travel through shared memory too; the
`ShardConfig` (with the optax closures) goes by cloudpickle.

A shard process exits when told to or when its parent is gone; if one dies,
the next call on its channel raises `ShardDiedError`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
import uuid
import weakref
from multiprocessing import connection
from typing import Any, Callable, Sequence

import cloudpickle

from jaxps.errors import ShardDiedError
from jaxps.service import TakeOver
from jaxps.client import closed_while_running, unpicklable_result, unpicklable_worker
from jaxps.transport import ShardConfig, leave_quietly, run_worker, worker_failed
from jaxps.transports import shm, wire
from jaxps.transports.endpoint import POOL  # noqa: F401  (re-exported: the pull-buffer pool size)
from jaxps.transports.shm_channel import Recovery, SharedMemoryChannel

_MAIN_GUARD = "a script that starts a ParameterServer must do so under `if __name__ == '__main__':`"


def shard_died(index: int, pid: int) -> ShardDiedError:
    return ShardDiedError(f"shard {index} (pid {pid}) has died; its parameters and optimizer state are lost")


def standby_died(index: int, pid: int) -> ShardDiedError:
    return ShardDiedError(f"shard {index}'s standby (pid {pid}) has died")


def _shard_main(ctrl, payload: bytes, prefix: str, socket_dir: str | None, authkey: bytes | None = None, primary: tuple | None = None) -> None:
    """A shard process: reports its endpoint (or its traceback), serves, exits on 'stop' or its parent's end.

    Its socket is a file in the server's `socket_dir`, a directory only this user can enter.
    A restarted shard gets its predecessor's `authkey` (and `prefix`): it serves at the same endpoint.
    A standby gets its primary's `(prefix, authkey)`: once it takes over, it serves there too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it stops us
    try:
        from jaxps.service import ShardService
        from jaxps.shard import Shard
        from jaxps.transports.endpoint import serve

        config = cloudpickle.loads(payload)
        if config.restore is None and config.leaves is not None:
            config = dataclasses.replace(config, leaves=config.leaves.load())
        service = ShardService(Shard(config))
        servers = [serve(service, config.plan.layout(config.index), prefix=prefix, authkey=authkey, socket_dir=socket_dir)]
        if primary is not None:
            layout = config.plan.layout(config.index)
            service.on_take_over = lambda: servers.append(serve(service, layout, prefix=primary[0], authkey=primary[1], socket_dir=socket_dir))
    except BaseException:
        ctrl.send(wire.Refused(traceback.format_exc()))
        return
    ctrl.send(wire.Serving(servers[0].endpoint))
    orphaned = False
    try:
        ctrl.recv()  # Stop, or EOF once the parent is gone
    except (EOFError, OSError):
        orphaned = True
    for server in servers:
        server.stop()
    if socket_dir is not None and orphaned:  # (else the parent removes it as it closes the server)
        _remove_when_last(socket_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # serving threads may be inside JAX; do not wait for them


def _payload(fn: Callable, client: Any, arg: Any) -> bytes:
    """What a `run_workers` process is sent; a clear error naming what cannot be pickled."""
    try:
        return cloudpickle.dumps((fn, client, arg))
    except Exception as e:
        raise unpicklable_worker(client, fn, arg, e, cloudpickle.dumps, "its process") from e


def _worker_main(out, payload: bytes) -> None:
    """A `run_workers` process: runs one worker and sends back its result or exception."""
    fn, client, arg = cloudpickle.loads(payload)
    try:
        result = run_worker(fn, client, arg)
        try:
            msg = wire.Answer(0, cloudpickle.dumps(result))
        except Exception as e:
            raise unpicklable_result(client, result, e) from e
    except BaseException as e:
        msg = wire.Failure(0, wire.pack_error(e), traceback.format_exc())
    try:
        out.send(msg)
        out.close()
    except OSError:  # the driver is gone (e.g. SIGTERM): nobody to tell
        pass


def _socket_dir() -> tuple[str | None, int | None]:
    """A new directory for the shards' sockets, mode 0700: another user can neither reach nor take an address
    there. Short (a socket's path holds ~107 bytes): the temporary directory, $XDG_RUNTIME_DIR or /tmp; None if
    none can be made (the sockets are then abstract, Linux's, under a random name; a client still answers only
    a listener of its own user). Named for this process, and locked (the file descriptor returned holds the lock
    on its `LOCK` file) for as long as the server runs: a later server can tell when it was left behind."""
    for parent in (tempfile.gettempdir(), os.environ.get("XDG_RUNTIME_DIR"), "/tmp"):
        if parent and len(parent) <= 48:
            sweep_socket_dirs(parent)
            try:
                path = tempfile.mkdtemp(prefix=f"jaxps_{os.getpid()}_", dir=parent)
            except OSError:
                continue
            try:
                lock = os.open(os.path.join(path, LOCK), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
                continue
            return path, lock
    return None, None


LOCK = "lock"  # the file in a socket directory that its server's driver holds locked (`flock`) while it runs
CLOSED_POLL_S = 0.1  # how often a `run_workers` looks whether the server was closed meanwhile
_SOCKET_DIR = re.compile(r"jaxps_(\d+)_\w+$")
LEFT_FOR_S = 60.0  # a socket directory untouched this long, whose process is gone, may be swept


def sweep_socket_dirs(parent: str) -> list[str]:
    """Removes the socket directories in `parent` that servers killed with their shards left (SIGKILL to the
    whole process group: nobody was left to remove them); returns their paths. Never fails."""
    swept = []
    try:
        names = os.listdir(parent)
    except OSError:
        return swept
    for name in names:
        path = os.path.join(parent, name)
        try:
            if _left_behind(path):
                shutil.rmtree(path, ignore_errors=True)
                swept.append(path)
        except Exception:  # (whatever another process left there, a server still starts)
            continue
    return swept


def _left_behind(path: str) -> bool:
    """Whether socket directory `path` was left by a server that no longer runs: this user's, named for a process
    gone, untouched for `LEFT_FOR_S` seconds, its `LOCK` free (a driver holds it while it runs, in whatever PID
    namespace), and holding only sockets nobody listens on."""
    match = _SOCKET_DIR.match(os.path.basename(path))
    if match is None:
        return False
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or time.time() - info.st_mtime < LEFT_FOR_S:
        return False
    if _runs(int(match.group(1))):
        return False
    entries = os.listdir(path)
    if LOCK not in entries or not all(_dead_socket(os.path.join(path, e)) for e in entries if e != LOCK):
        return False
    return _lock_free(path)  # (held: its server runs)


def _lock_free(socket_dir: str, within: float = 0.0) -> bool:
    """Whether the `LOCK` of `socket_dir` can be taken (trying for up to `within` s): no driver holds it."""
    fd = os.open(os.path.join(socket_dir, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)


def _runs(pid: int) -> bool:
    """Whether process `pid` runs here (or might: another user's, or a number no process can have)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        pass
    return True


def _dead_socket(path: str) -> bool:
    """Whether `path` is a Unix socket that nobody listens on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:  # a full queue, a timeout: someone listens
        return False
    return False


def _remove_when_last(socket_dir: str, within: float = 5.0) -> None:
    """A shard whose parent is gone removes its server's socket directory if it is the last one there, once the
    parent's lock on it is free (a process that ends closes its files one by one: the lock may go a moment after
    the pipe that told the shard)."""
    try:
        if os.listdir(socket_dir) != [LOCK] or not _lock_free(socket_dir, within):
            return
        os.unlink(os.path.join(socket_dir, LOCK))
        os.rmdir(socket_dir)
    except OSError:  # another shard got there first
        pass


def _shutdown(procs, ctrls, channels, prefix: str, standbys: dict, socket_dir: str | None, lock: int | None) -> None:
    procs = [*procs, *(p for p, _, _ in standbys.values())]
    ctrls = [*ctrls, *(ctrl for _, ctrl, _ in standbys.values())]
    channels = [*channels, *(channel for _, _, channel in standbys.values())]
    for ch in channels:
        ch.close()
    for ctrl in ctrls:
        try:
            ctrl.send(wire.Stop())
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
    if socket_dir is not None:
        shutil.rmtree(socket_dir, ignore_errors=True)
        os.close(lock)


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
        self._channels: list[SharedMemoryChannel] = []
        self._endpoints: list[wire.Endpoint] = []
        self._recovery: Recovery | None = None
        self._standbys: dict[int, tuple] = {}  # shard index -> (process, control pipe, channel) of its standby
        self._standbys_started = 0
        self._finalizer: weakref.finalize | None = None
        self._closed = False  # a `run_workers` under way stops its workers' processes and raises
        self.shm_prefix: str | None = None  # every segment of this server is named with it
        self.socket_dir: str | None = None  # the shards' sockets: a directory only this user can enter

    @property
    def pids(self) -> list[int]:
        """The shard processes' pids, by shard index."""
        return [p.pid for p in self._procs]

    def start(self, configs: Sequence[ShardConfig]) -> list[SharedMemoryChannel]:
        if self._finalizer is not None:
            raise RuntimeError("this transport has already been started")
        prefix = self.shm_prefix = f"jaxps_{uuid.uuid4().hex[:16]}_"
        self.socket_dir, lock = _socket_dir()
        if self._recovery is not None:
            self._recovery = self._recovery._replace(given_up=f"{prefix}given_up")
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._ctrls, self._channels, prefix, self._standbys, self.socket_dir, lock
        )
        inits = []
        try:
            for config in configs:
                init = None
                if config.restore is None:
                    init = shm.SharedLeaves.write(f"{prefix}s{config.index}_init", config.plan.layout(config.index), config.leaves)
                    inits.append(init.name)
                p, ours = self._spawn(dataclasses.replace(config, leaves=init))
                self._ctrls.append(ours)
                self._procs.append(p)
            deadline = time.monotonic() + self.start_timeout
            endpoints = [self._await_ready(c.index, p, ctrl, deadline) for c, p, ctrl in zip(configs, self._procs, self._ctrls)]
        except BaseException:
            self.close()
            raise
        finally:
            for name in inits:
                shm.unlink(name)
        self._endpoints = endpoints
        self._channels.extend(
            SharedMemoryChannel(c.index, e, functools.partial(shard_died, c.index, e.pid), self._recovery) for c, e in zip(configs, endpoints)
        )
        return list(self._channels)

    def _spawn(self, config: ShardConfig, authkey: bytes | None = None, prefix: str | None = None, primary: tuple | None = None):
        """Starts shard `config.index`'s process; (process, control pipe)."""
        try:
            payload = cloudpickle.dumps(config)
        except Exception as e:
            raise TypeError(f"cannot send shard {config.index}'s config (the optimizer) to its process: {e}") from e
        ours, theirs = self._ctx.Pipe()
        p = self._ctx.Process(
            target=_shard_main,
            args=(theirs, payload, prefix or self.shm_prefix, self.socket_dir, authkey, primary),
            name=f"jaxps-shard-{config.index}{'-standby' if primary else ''}",
            daemon=True,
        )
        try:
            p.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its copy (or never started)
        return p, ours

    # -- fail-over (`ParameterServer(on_shard_failure="restart")`) ------------------------
    def expect_restarts(self, timeout: float, standby: bool = False) -> None:
        """Before `start`: clients wait up to `timeout` s for a dead shard to be restarted (or, `standby`, taken
        over by its standby), instead of failing."""
        if not sys.platform.startswith("linux"):
            raise NotImplementedError("restarting shards needs Linux (clients learn that a shard will not come back through /dev/shm)")
        self._recovery = Recovery(timeout, "", standby)  # the segment's name is known once `start` picks the prefix

    # -- hot standby (`ParameterServer(replicas=1)`) ---------------------------------------
    def start_standby(self, config: ShardConfig) -> SharedMemoryChannel:
        """Starts a standby of shard `config.index` in a process of its own; returns the channel its primary feeds it through."""
        i = config.index
        self._standbys_started += 1
        prefix = f"{self.shm_prefix}b{self._standbys_started}_"  # swept with the server's segments
        primary = (self.shm_prefix, self._endpoints[i].authkey)
        p, ours = self._spawn(dataclasses.replace(config, leaves=None, restore=None), prefix=prefix, primary=primary)
        try:
            endpoint = self._await_ready(i, p, ours, time.monotonic() + self.start_timeout)
        except BaseException:
            p.kill()
            p.join()
            ours.close()
            raise
        channel = SharedMemoryChannel(i, endpoint, functools.partial(standby_died, i, endpoint.pid))
        self._standbys[i] = (p, ours, channel)
        return channel

    @property
    def standbys(self) -> dict[int, SharedMemoryChannel]:
        """A channel to each shard's standby, by shard index."""
        return {i: channel for i, (_, _, channel) in list(self._standbys.items())}

    def dead_standbys(self) -> list[int]:
        """The shards whose standby's process has ended (they go on without one)."""
        return [i for i, (p, _, _) in list(self._standbys.items()) if not p.is_alive()]

    def drop_standby(self, i: int) -> None:
        """Stops (if it still runs) and forgets shard `i`'s standby."""
        p, ctrl, channel = self._standbys.pop(i)
        channel.close()
        if p.is_alive():
            p.kill()
        p.join(5.0)
        ctrl.close()
        if self.socket_dir is not None and not p.is_alive():  # its socket file (a killed process leaves it)
            try:
                os.unlink(channel.endpoint.address)
            except OSError:
                pass

    def promote(self, i: int) -> None:
        """Shard `i`'s primary died: its standby takes over, serving where clients reached the primary."""
        p, ctrl, channel = self._standbys[i]
        channel.call(TakeOver(), timeout=60)
        del self._standbys[i]
        channel.close()
        self._procs[i].join(1.0)
        self._ctrls[i].close()
        self._procs[i], self._ctrls[i] = p, ctrl

    def dead(self) -> list[int]:
        """The shards whose process has ended."""
        return [i for i, p in enumerate(self._procs) if not p.is_alive()]

    def restart(self, config: ShardConfig) -> None:
        """Starts a new process for shard `config.index` (from `config.restore`), serving at the dead one's endpoint."""
        i = config.index
        self._procs[i].join(1.0)
        self._ctrls[i].close()
        p, ours = self._spawn(config, self._endpoints[i].authkey)
        self._procs[i], self._ctrls[i] = p, ours
        endpoint = self._await_ready(i, p, ours, time.monotonic() + self.start_timeout)
        if endpoint.address != self._endpoints[i].address:  # (a bug if ever seen: clients reconnect to the old address)
            raise RuntimeError(f"shard {i} restarted at {endpoint.address!r}, not at its predecessor's {self._endpoints[i].address!r}")

    def give_up(self, reason: str) -> None:
        """Dead shards stay dead: clients waiting for one raise `ShardDiedError(reason)`."""
        if self._recovery is not None:
            try:
                shm.write_text(self._recovery.given_up, reason)
            except FileExistsError:
                pass

    def _await_ready(self, index: int, p, ctrl, deadline: float) -> wire.Endpoint:
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
        if isinstance(msg, wire.Refused):
            raise RuntimeError(f"shard {index} failed to start in its process (pid {p.pid}):\n{msg.traceback}")
        return msg.endpoint

    def run_workers(self, fn: Callable, clients: Sequence[Any], args: Sequence[Any]) -> list:
        """Runs each `fn(client, arg)` in its own spawned process; results in order, the first error raised."""
        try:
            payloads = [_payload(fn, c, a) for c, a in zip(clients, args)]
        except BaseException:
            for c in clients:  # joined for this call: they leave, or sync steps would wait for them
                leave_quietly(c)
            raise
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
                ready = connection.wait(list(pipes), timeout=CLOSED_POLL_S)
                if self._closed and not ready:  # its workers' processes are stopped below, however busy
                    raise closed_while_running(errors)
                for ours in ready:
                    i = pipes.pop(ours)
                    try:
                        msg = ours.recv()
                    except EOFError:
                        procs[i].join(5.0)
                        errors[i] = RuntimeError(f"worker {i}'s process died (exit code {procs[i].exitcode})")
                        leave_quietly(clients[i])  # so that the others' sync steps and ssp pulls go on
                        worker_failed(clients[i], errors[i], bool(pipes))
                        continue
                    finally:
                        ours.close()
                    if isinstance(msg, wire.Answer):
                        results[i] = cloudpickle.loads(msg.value)
                    else:
                        errors[i] = wire.unpack_error(msg.error, msg.traceback, f"worker {i}")
                        worker_failed(clients[i], errors[i], bool(pipes))
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
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
