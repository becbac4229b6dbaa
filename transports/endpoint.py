"""A shard's shared-memory endpoint: serves a `ShardService` to clients on this machine.

`serve(service, layout)` listens on a Unix socket and returns an `EndpointServer`
whose `.endpoint` (a picklable `wire.Endpoint`) is all a client needs. Both the
multiprocessing shard process and the Ray shard actor start it the same way.

Every connection (one per client thread and process) gets a thread, a push
buffer and a pool of pull buffers (one at first, at most `POOL`), each sized to
the shard, created here and unlinked as soon as the client has mapped them, so
no segment name outlives a handshake and a killed process leaks nothing.

Robustness: the accept loop never ends while the endpoint serves. A peer of
another user, a failed or stalled handshake (cut off after
`wire.HANDSHAKE_TIMEOUT`), or a malformed message costs that connection only;
handshakes run in their connections' threads, so none blocks another; running
out of file descriptors backs off and recovers.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any

import numpy as np

from jaxps.service import Pull, Reply, ShardService
from jaxps.transports import shm, wire

POOL = 4  # pull buffers per connection, at most
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class EndpointServer:
    """Accepts connections to one shard and serves each in its own thread."""

    def __init__(self, service: ShardService, layout, node: str | None = None, prefix: str | None = None, authkey: bytes | None = None):
        """`prefix` names the segments and (on Linux) the socket: a shard restarted with its prefix and
        `authkey` is reached at the same endpoint."""
        self.service = service
        self.layout = tuple(layout)
        self.prefix = prefix or f"jaxps_{uuid.uuid4().hex[:16]}_"
        self.offsets, self.size = shm.layout(self.layout)
        self.push_size = max(self.size, shm.layout(service.shard.push_layout)[1])  # a push filter's payload may be larger
        self._lock = threading.Lock()
        self._named: set[str] = set()  # segments created whose client has not mapped them yet
        self._stopping = False
        self._ids = itertools.count()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket_dir = None
        if sys.platform.startswith("linux"):  # abstract: no file to leave behind; peers checked by uid
            address = f"\0{self.prefix}s{service.shard.index}"
        else:  # a socket file in a directory only this user can enter
            self._socket_dir = tempfile.mkdtemp(prefix="jaxps_")
            address = os.path.join(self._socket_dir, "shard")
        self._listener.bind(address)
        self._listener.listen(64)
        self.endpoint = wire.Endpoint(address, authkey or os.urandom(32), self.layout, os.getpid(), node)
        threading.Thread(target=self._accept, name=f"jaxps-shard{service.shard.index}-accept", daemon=True).start()

    # -- connections ---------------------------------------------------------------------
    def _accept(self) -> None:
        backoff = 0.01
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError as e:
                if self._stopping:
                    return
                # out of descriptors or memory: wait for some to be freed, never give up
                time.sleep(backoff if e.errno in _RESOURCE_ERRORS else 0.01)
                backoff = min(2 * backoff, 1.0) if e.errno in _RESOURCE_ERRORS else backoff
                continue
            backoff = 0.01
            try:
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
            except RuntimeError:  # no thread to be had: this connection is refused
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        """Handshake, then this connection's requests until it closes."""
        deadline = time.monotonic() + wire.HANDSHAKE_TIMEOUT
        try:
            conn = wire.accept(sock, self.endpoint.authkey)
        except BaseException:  # not ours, not authentic, malformed or too slow: drop it
            sock.close()
            return
        name = f"{self.prefix}s{self.service.shard.index}p{os.getpid()}c{next(self._ids)}"
        names = (f"{name}_push", f"{name}_pull0")
        bufs = []
        try:
            bufs = [self.create(names[0], self.push_size), self.create(names[1])]
            conn.send(wire.Buffers(names))
            if not conn.poll(max(0.0, deadline - time.monotonic())) or not isinstance(conn.recv(), wire.Attached):
                raise EOFError("the client did not map its buffers in time")
        except BaseException:
            if not self._stopping:
                try:
                    conn.send(wire.Refused(traceback.format_exc()))
                except OSError:
                    pass
            for b in bufs:
                b.close()
            conn.close()
            return
        finally:
            self.release(names)
        _Connection(conn, self, name, bufs).run()

    # -- segments ------------------------------------------------------------------------
    def create(self, name: str, size: int | None = None):
        """A new segment (the size of the shard's leaves by default), for a client to map; its name lasts until `release`."""
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"shard {self.service.shard.index} is stopping")
            self._named.add(name)
            return shm.create(name, self.size if size is None else size)

    def release(self, names) -> None:
        """Unlinks `names` (their mappings stay); a no-op for those already gone."""
        with self._lock:
            for name in names:
                shm.unlink(name)
            self._named.difference_update(names)

    def stop(self) -> None:
        """Stops accepting and unlinks every name still pending."""
        with self._lock:
            self._stopping = True
            for name in self._named:
                shm.unlink(name)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        except OSError:
            pass
        self._listener.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


def serve(service: ShardService, layout, node: str | None = None, prefix: str | None = None, authkey: bytes | None = None) -> EndpointServer:
    """Starts serving `service` (whose leaves are laid out as `layout`) on this machine."""
    return EndpointServer(service, layout, node, prefix, authkey)


class _PeerReply(Reply):
    """Answers one request of a connection: through the socket, leaves through the pull buffer."""

    borrowed = True  # a push's arrays are the connection's push buffer

    def __init__(self, peer: "_Connection", rid: int, buffer: int):
        self._peer, self._rid, self._buffer = peer, rid, buffer

    def send(self, value: Any) -> None:
        self._peer.send(wire.Answer(self._rid, value))

    def taken(self) -> None:
        self._peer.send(wire.Taken(self._rid))

    def pulled(self, version: int, leaves: list) -> None:
        self._peer.deliver(self._rid, self._buffer, version, leaves)


class _Connection:
    """The shard's side of one connection."""

    def __init__(self, conn, server: EndpointServer, name: str, bufs):
        self._conn, self._server, self._name, self._bufs = conn, server, name, list(bufs)
        self._service = server.service
        self._push_views = shm.views(bufs[0], server.layout, server.offsets)
        self._pull_views = [shm.views(bufs[1], server.layout, server.offsets)]
        self._lock = threading.Lock()  # taken after the shard's lock, never before
        self._live_pull: int | None = None  # the one pull whose leaves will be read (an earlier one is abandoned)
        self._closed = False

    def run(self) -> None:
        try:
            while True:
                try:
                    call = self._conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    self._handle(call)
                except Exception as e:
                    self.send(wire.Failure(getattr(call, "rid", -1), wire.pack_error(e), traceback.format_exc()))
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

    def _handle(self, call: wire.Call) -> None:
        request = call.request
        if isinstance(request, wire.Grow):
            return self.send(wire.Answer(call.rid, self._grow()))
        if isinstance(request, wire.Mapped):
            self._server.release([request.name])
            return self.send(wire.Answer(call.rid, None))
        if isinstance(request, Pull):
            if not 0 <= call.buffer < len(self._pull_views):
                raise ValueError(f"no pull buffer {call.buffer}")
            with self._lock:  # an earlier pull not served yet is abandoned: its buffer may be reused
                self._live_pull = call.rid
        arrays = self._push_views if call.layout is None else self._payload_views(call.layout)
        self._service.handle(request, _PeerReply(self, call.rid, call.buffer), arrays)

    def _payload_views(self, layout: tuple) -> list[np.ndarray]:
        """A push's arrays laid out as its `layout` says (a push filter's payload)."""
        specs = [(tuple(shape), np.dtype(dtype)) for shape, dtype in layout]
        offsets, size = shm.layout(specs)
        if size > len(self._bufs[0]):
            raise ValueError(f"a push of {size:,} bytes named for a {len(self._bufs[0]):,}-byte push buffer")
        return shm.views(self._bufs[0], specs, offsets)

    def send(self, message) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message) -> None:
        if not self._closed:
            try:
                self._conn.send(message)
            except OSError:  # the client is gone; `run` sees EOF next
                pass

    def deliver(self, rid: int, buffer: int, version: int, leaves: list) -> None:
        """Copies a pull's leaves into its buffer (under the shard's lock: one consistent version)."""
        with self._lock:
            if self._closed or rid != self._live_pull:
                return
            self._live_pull = None
            for view, x in zip(self._pull_views[buffer], leaves):
                np.copyto(view, np.asarray(x))
            self._send_locked(wire.Pulled(rid, version))

    def _grow(self) -> str:
        """A new pull buffer; its name lasts until the client says it has mapped it (`Mapped`)."""
        if len(self._pull_views) >= POOL:
            raise RuntimeError(f"a connection has at most {POOL} pull buffers")
        name = f"{self._name}_pull{len(self._pull_views)}"
        buf = self._server.create(name)
        self._bufs.append(buf)
        self._pull_views.append(shm.views(buf, self._server.layout, self._server.offsets))
        return name

