"""A shard's shared-memory endpoint: serves a `ShardService` to clients on this machine.

`serve(service, layout)` listens on a Unix socket and returns an `EndpointServer`
whose `.endpoint` (a picklable `wire.Endpoint`) is all a client needs. Both the
multiprocessing shard process and the Ray shard actor start it the same way.

Every connection (one per client thread and process) gets a thread, a push
buffer and a pool of pull buffers (one at first, at most `POOL`), each sized to
the shard, created here and unlinked as soon as the client has mapped them, so
no segment name outlives a handshake and a killed process leaks nothing.

With `tcp_host`, the endpoint also listens on TCP at that address (the
node's own, never a wildcard) for clients on other machines: the same
handshake and requests; arrays stream over the socket (`wire.send_arrays`)
into the connection's own push buffer, and a pull's leaves are copied into
a buffer of the connection's own and written from there by its writer
thread (a client that stops reading stalls nothing but its connection).

Robustness: the accept loops never end while the endpoint serves. A peer of
another user, a failed or stalled handshake (cut off after
`wire.HANDSHAKE_TIMEOUT`), or a malformed message costs that connection only;
handshakes run in their connections' threads, so none blocks another; running
out of file descriptors backs off and recovers.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import queue
import secrets
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
from jaxps.transports import packed, shm, wire

POOL = 4  # pull buffers per connection, at most
WRITER_STOP_S = 10.0  # how long a streamed connection that ends waits for its writer thread
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class EndpointServer:
    """Accepts connections to one shard and serves each in its own thread."""

    def __init__(
        self,
        service: ShardService,
        layout,
        node: str | None = None,
        prefix: str | None = None,
        authkey: bytes | None = None,
        tcp_host: str | None = None,
        socket_dir: str | None = None,
    ):
        """`prefix` names the segments and the socket. `socket_dir`: a directory only this user can enter (the
        server's), where the socket is a file: a shard restarted with its prefix and `authkey` in the same
        directory is reached at the same endpoint, and no other user can take that address meanwhile. Without
        it the socket is abstract (Linux; its name is random) or in a directory of its own. `tcp_host`: also
        serve over TCP, bound to that address."""
        self.service = service
        self.layout = tuple(layout)
        self.prefix = prefix or f"jaxps_{uuid.uuid4().hex[:16]}_"
        self.offsets, self.size = packed.layout(self.layout)  # the clients lay theirs out alike
        # a push's many small leaves go to the device in one call; those of one dtype lie back to back
        self.unpack = packed.Unpacker(self.layout, self.offsets) if packed.worth_packing(self.layout) else None
        self.flat = packed.flat_dtype(self.layout)
        self.push_size = max(self.size, shm.layout(service.shard.push_layout)[1])  # a push filter's payload may be larger
        self._lock = threading.Lock()
        self._named: set[str] = set()  # segments created whose client has not mapped them yet
        self._stopping = False
        self._ids = itertools.count()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket_dir = None
        if socket_dir is not None:  # the server's own directory: a dead predecessor's socket file is replaced
            address = os.path.join(socket_dir, f"{self.prefix}s{service.shard.index}")
            if os.path.exists(address):
                os.unlink(address)
        elif sys.platform.startswith("linux"):  # abstract: no file to leave behind; peers checked by uid
            address = f"\0{self.prefix}s{service.shard.index}"
        else:  # a socket file in a directory only this user can enter
            self._socket_dir = tempfile.mkdtemp(prefix="jaxps_")
            address = os.path.join(self._socket_dir, "shard")
        self._listener.bind(address)
        self._socket_file = _identity(address) if socket_dir is not None else None
        self._listener.listen(socket.SOMAXCONN)  # (a flood of connections from others waits in the queue)
        self._listeners = [self._listener]
        tcp = None
        if tcp_host is not None:
            family = socket.AF_INET6 if ":" in tcp_host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.bind((tcp_host, 0))
            listener.listen(socket.SOMAXCONN)
            self._listeners.append(listener)
            tcp = (tcp_host, listener.getsockname()[1])
        self.endpoint = wire.Endpoint(address, authkey or os.urandom(32), self.layout, os.getpid(), node, tcp)
        for listener in self._listeners:
            threading.Thread(target=self._accept, args=(listener,), name=f"jaxps-shard{service.shard.index}-accept", daemon=True).start()

    # -- connections ---------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        backoff = 0.01
        while not self._stopping:
            try:
                sock, _ = listener.accept()
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
        streamed = sock.family != socket.AF_UNIX
        try:
            if streamed:
                wire.tune_tcp(sock)
            conn = wire.accept(sock, self.endpoint.authkey)
        except BaseException:  # not ours, not authentic, malformed or too slow: drop it
            sock.close()
            return
        if streamed:
            return self._serve_streamed(conn, deadline)
        # a random part: another user who reads the prefix cannot take the names first (O_EXCL would refuse them)
        name = f"{self.prefix}s{self.service.shard.index}p{os.getpid()}c{next(self._ids)}_{secrets.token_hex(8)}"
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

    def _serve_streamed(self, conn, deadline: float) -> None:
        """A TCP connection: its push buffer is private memory; a pull's leaves go out over the socket."""
        try:
            push = mmap.mmap(-1, max(self.push_size, 1))
            conn.send(wire.Streamed(self.push_size))
            if not conn.poll(max(0.0, deadline - time.monotonic())) or not isinstance(conn.recv(), wire.Attached):
                raise EOFError("the client did not make its buffers in time")
        except BaseException:
            conn.close()
            return
        _Connection(conn, self, None, [push]).run()

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
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes its accept loop
            except OSError:
                pass
            listener.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._socket_file is not None and _identity(self._socket_file[0]) == self._socket_file:  # (not a successor's)
            try:
                os.unlink(self._socket_file[0])
            except OSError:
                pass


def _identity(path: str) -> tuple | None:
    """`(path, device, inode)` of a file, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino)


def serve(service: ShardService, layout, **options) -> EndpointServer:
    """Starts serving `service` (whose leaves are laid out as `layout`) on this machine; `options`: `EndpointServer`'s."""
    return EndpointServer(service, layout, **options)


class _PeerReply(Reply):
    """Answers one request of a connection: through the socket, leaves through the pull buffer."""

    borrowed = True  # a push's arrays are the connection's push buffer (unless copied out: `packed`)

    def __init__(self, peer: "_Connection", rid: int, buffer: int, borrowed: bool = True):
        self._peer, self._rid, self._buffer, self.borrowed = peer, rid, buffer, borrowed

    def send(self, value: Any) -> None:
        self._peer.send(wire.Answer(self._rid, value))

    def taken(self) -> None:
        self._peer.send(wire.Taken(self._rid))

    def pulled(self, version: int, leaves: list) -> None:
        self._peer.deliver(self._rid, self._buffer, version, leaves)


class _Connection:
    """The shard's side of one connection."""

    def __init__(self, conn, server: EndpointServer, name: str | None, bufs):
        """`name`: the prefix of the connection's segments (`bufs`: push, first pull); None for a
        streamed (TCP) connection, whose one buffer (`bufs`: push) is private."""
        self._conn, self._server, self._name, self._bufs = conn, server, name, list(bufs)
        self._streamed = name is None
        self._service = server.service
        self._push_views = shm.views(bufs[0], server.layout, server.offsets)
        self._pull_views = [] if self._streamed else [shm.views(bufs[1], server.layout, server.offsets)]
        self._lock = threading.Lock()  # taken after the shard's lock, never before
        self._live_pull: int | None = None  # the one pull whose leaves will be read (an earlier one is abandoned)
        self._closed = False
        # streamed: what goes to the peer is written by a thread of its own (`_write_out`), from a queue, so that a
        # peer that stops reading holds up nobody (not the shard's lock, not this connection's reading of requests);
        # a pull's leaves go from a buffer of the connection's own, copied there under the shard's lock
        self._outbox: queue.SimpleQueue | None = queue.SimpleQueue() if self._streamed else None
        self._out_views: list[np.ndarray] | None = None
        self._newest_pull: int | None = None  # the client's latest pull: an earlier one still queued is not written

    def run(self) -> None:
        writer = None
        if self._streamed:
            writer = threading.Thread(target=self._write_out, name="jaxps-shard-writer", daemon=True)
            writer.start()
        try:
            while True:
                try:
                    call = wire.recv(self._conn)
                    arrays = self._receive(call) if self._streamed else None
                except (EOFError, OSError):
                    return
                try:
                    if isinstance(arrays, Exception):
                        raise arrays
                    self._handle(call, arrays)
                except Exception as e:
                    self.send(wire.Failure(getattr(call, "rid", -1), wire.pack_error(e), traceback.format_exc()))
        finally:
            if not self._streamed:
                self._server.release([f"{self._name}_pull{i}" for i in range(len(self._pull_views))])  # a grow cut short
            with self._lock:
                self._closed = True
            if writer is not None:  # it closes the socket once done (before, its number could be another's next)
                wire.cut(self._conn)  # (a write to a peer that stopped reading fails now)
                self._outbox.put(None)
                writer.join(WRITER_STOP_S)
            with self._lock:
                self._out_views = None
                self._push_views = self._pull_views = []
                for b in self._bufs:
                    try:
                        b.close()
                    except BufferError:  # a view is still alive; the mapping goes with it
                        pass
                if writer is None:
                    self._conn.close()

    def _receive(self, call) -> list[np.ndarray] | Exception | None:
        """A streamed push's arrays, read off the socket into the push buffer (an error: read past, then raised)."""
        if not isinstance(call, wire.Call) or not wire.carries_arrays(call.request):
            return None
        try:
            views = self._push_views if call.layout is None else self._payload_views(call.layout)
        except ValueError as e:  # a layout that does not fit: its bytes still have to be read past
            wire.skip_bytes(self._conn, shm.layout(call.layout)[1])
            return e
        wire.recv_arrays(self._conn, views)
        return views

    def _handle(self, call: wire.Call, arrays: list | None = None) -> None:
        request = call.request
        if self._streamed and isinstance(request, (wire.Grow, wire.Mapped)):
            raise ValueError("a streamed connection has no shared buffers")
        if isinstance(request, wire.Grow):
            return self.send(wire.Answer(call.rid, self._grow()))
        if isinstance(request, wire.Mapped):
            self._server.release([request.name])
            return self.send(wire.Answer(call.rid, None))
        if isinstance(request, Pull):
            if not self._streamed and not 0 <= call.buffer < len(self._pull_views):
                raise ValueError(f"no pull buffer {call.buffer}")
            with self._lock:  # an earlier pull not served yet is abandoned: its buffer may be reused
                self._live_pull = self._newest_pull = call.rid
        if arrays is None:
            arrays = self._push_views if call.layout is None else self._payload_views(call.layout)
        borrowed = True
        if call.layout is None and wire.carries_arrays(request) and self._server.unpack is not None:  # many small leaves
            arrays, borrowed = self._server.unpack(self._bufs[0]), False
        self._service.handle(request, _PeerReply(self, call.rid, call.buffer, borrowed), arrays)

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

    def _send_locked(self, message, arrays: list | None = None) -> None:
        if self._closed:
            return
        if self._outbox is not None:  # pickled here (its errors are the caller's), written by `_write_out`
            return self._outbox.put((wire.encode(message), arrays, message.rid if isinstance(message, wire.Pulled) else None))
        try:
            wire.send(self._conn, message)
        except OSError:  # the client is gone, or the message went out in part: `run` sees EOF next
            wire.cut(self._conn)

    def _write_out(self) -> None:
        """A streamed connection's writer: sends what `_send_locked` queued, in order, until the connection ends
        (then closes its socket). A pull the client has since given up on (it asked for a newer one) is dropped."""
        try:
            while True:
                item = self._outbox.get()
                if item is None:
                    return
                encoded, arrays, pull = item
                if pull is not None and pull != self._newest_pull:
                    continue
                try:
                    wire.write(self._conn, encoded)
                    if arrays is not None:
                        wire.send_arrays(self._conn, arrays)
                except Exception:  # the client is gone, or a message went out in part: `run` sees EOF next
                    wire.cut(self._conn)
        finally:
            self._conn.close()

    def deliver(self, rid: int, buffer: int, version: int, leaves: list) -> None:
        """Copies a pull's leaves into its buffer (under the shard's lock: one consistent version)."""
        with self._lock:
            if self._closed or rid != self._live_pull:
                return
            self._live_pull = None
            if self._streamed:  # the leaves' bytes follow the message, from the connection's own buffer
                if self._out_views is None:
                    self._bufs.append(mmap.mmap(-1, max(self._server.size, 1)))
                    self._out_views = shm.views(self._bufs[-1], self._server.layout, self._server.offsets)
                for view, x in zip(self._out_views, leaves):  # (a pull still being written out is an abandoned one)
                    np.copyto(view, np.asarray(x))
                self._send_locked(wire.Pulled(rid, version), self._out_views)
                return
            if self._server.flat is not None:  # back to back: one copy
                flat = packed.flat_view(self._bufs[1 + buffer], self._server.flat, self._server.layout)
                np.concatenate([np.asarray(x).reshape(-1) for x in leaves], out=flat)
            else:
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

