"""The endpoint wire: its messages, its handshake, and where an endpoint is.

A client reaches a shard's endpoint over a Unix socket (control messages,
pickled by `multiprocessing.connection` only after both sides proved they hold
the endpoint's secret key) and moves arrays through `/dev/shm` buffers made
per connection. Every message is one of the typed values below. A message
that carries large arrays of its own (a standby's `Mirror`, a shard's state)
is pickled without their bytes, which follow it straight from their memory
(`send`, `recv`: pickle protocol 5's out-of-band buffers).

Across machines the same connection runs over TCP (`Endpoint.tcp`): the same
messages, and the arrays stream over the socket right behind the message that
carries them (a push's `Call`, a pull's `Pulled`), raw bytes gathered from and
scattered into each side's own reused buffers (`send_arrays`, `recv_arrays`):
no pickling of array data, no allocation per request.

Handshake: on a Unix socket the endpoint checks the peer's user id
(`SO_PEERCRED`: only the user that owns the shard may connect); then both
sides run the HMAC challenge in both directions, under a deadline, and nothing
either side sends is unpickled before it has passed. Over a Unix socket the
endpoint then sends `Buffers` (the names of the connection's push buffer and
first pull buffer), the client maps them and answers `Attached`, and the
endpoint unlinks the names; over TCP it sends `Streamed` (the push buffer's
size) and the client answers `Attached` once it has made its own buffers.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import struct
import threading
import time
from multiprocessing import connection
from typing import Any, NamedTuple

import cloudpickle
import numpy as np

from jaxps.service import Push

HANDSHAKE_TIMEOUT = 10.0  # seconds a connection has to prove itself and map its buffers
CONNECT_TIMEOUT = 30.0  # seconds a client waits to be accepted, when the caller gives no timeout


class Endpoint(NamedTuple):
    """Where a shard is served on this machine, and how to prove the right to talk to it."""

    address: str  # a Unix socket (abstract on Linux: it starts with a NUL byte)
    authkey: bytes
    layout: tuple  # (shape, dtype) of the shard's leaves, in order
    pid: int  # the serving process
    node: str | None = None  # the Ray node it runs on, if any
    tcp: tuple[str, int] | None = None  # (node address, port) for clients on other machines, if served

    def __repr__(self) -> str:  # never the secret
        return f"Endpoint(address={self.address!r}, pid={self.pid}, node={self.node!r}, tcp={self.tcp!r}, {len(self.layout)} leaves)"


# -- client -> endpoint ----------------------------------------------------------------
class Call(NamedTuple):
    """Request `rid` of a connection: a `jaxps.service` request, `Grow` or `Mapped`.

    A push's gradients are in the connection's push buffer, laid out as the
    shard's leaves, or as `layout` says (a push filter's payload: `(shape,
    dtype)` of each array); a `Pull`'s leaves go to pull buffer `buffer`.
    """

    rid: int
    request: Any
    buffer: int = 0
    layout: tuple | None = None


class Grow(NamedTuple):
    """One more pull buffer for this connection; answers its segment name."""


class Mapped(NamedTuple):
    """The client has mapped segment `name`: its name may go."""

    name: str


class Attached(NamedTuple):
    """Handshake: the client has mapped the buffers named in `Buffers`."""


# -- endpoint -> client ----------------------------------------------------------------
class Answer(NamedTuple):
    """Request `rid`'s answer."""

    rid: int
    value: Any


class Failure(NamedTuple):
    """Request `rid` raised in the shard's process: the exception (pickled if it could be) and its traceback."""

    rid: int
    error: bytes | None
    traceback: str


class Taken(NamedTuple):
    """Push `rid` no longer reads the push buffer; its outcome comes later as an `Answer`."""

    rid: int


class Pulled(NamedTuple):
    """Pull `rid`'s leaves, at `version`, are in the pull buffer it named."""

    rid: int
    version: int


class Buffers(NamedTuple):
    """Handshake: the connection's push buffer and first pull buffer."""

    names: tuple


class Streamed(NamedTuple):
    """Handshake over TCP: arrays stream over the socket; a push may be up to `push_size` bytes."""

    push_size: int


class Refused(NamedTuple):
    """Handshake: the endpoint could not serve this connection."""

    traceback: str


# -- a process and its parent (multiprocessing) -----------------------------------------
class Serving(NamedTuple):
    """A shard process serves its shard at `endpoint`."""

    endpoint: Endpoint


class Stop(NamedTuple):
    """The parent tells a shard process to exit (its parent's end does too)."""


# -- errors across processes ---------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process."""

    def __str__(self) -> str:
        return self.args[0]


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes."""
    return _ANSI.sub("", text)


def pack_error(e: BaseException) -> bytes | None:
    try:
        return cloudpickle.dumps(e)
    except Exception:
        return None


def unpack_error(packed: bytes | None, tb: str, where: str) -> BaseException:
    """The exception raised in another process, with its traceback as the cause."""
    try:
        e = cloudpickle.loads(packed) if packed is not None else None
    except Exception:
        e = None
    if not isinstance(e, BaseException):
        e = RuntimeError(f"{where} failed:\n{tb}")
    e.__cause__ = RemoteTraceback(f"\n\nin {where}'s process:\n{strip_ansi(tb)}")
    return e


# -- messages with large arrays ------------------------------------------------------------
OUT_OF_BAND_BYTES = 1 << 16  # a message's buffers at least this large travel beside its pickle, not in it


class OutOfBand(NamedTuple):
    """A message pickled with its large buffers left out (pickle protocol 5); their bytes follow it, `sizes`."""

    head: bytes
    sizes: tuple


def _array(buffer: Any, dtype: np.dtype, shape: tuple) -> np.ndarray:
    return np.frombuffer(buffer, dtype).reshape(shape)


class _Pickler(pickle.Pickler):
    """Protocol 5, with the bytes of every large numpy array out of band: numpy leaves those of `bfloat16` (any
    dtype it does not know) and of strided arrays in the pickle itself."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.nbytes >= OUT_OF_BAND_BYTES and not obj.dtype.hasobject:
            flat = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
            return _array, (pickle.PickleBuffer(flat), obj.dtype, obj.shape)
        return NotImplemented


def send(conn: connection.Connection, message: Any) -> None:
    """Sends a message (after the handshake). Its large arrays (a `Mirror`'s gradients, a state's arrays) are
    written straight from their memory behind it, not copied into the pickle and out again on the other side."""
    write(conn, encode(message))


class Encoded(NamedTuple):
    """A message pickled by `encode`, but for its large arrays' bytes (`raws`, read when it is written)."""

    head: bytes
    raws: list


def encode(message: Any) -> Encoded:
    """The pickling half of `send` (its errors are the caller's): what `write` then sends."""
    buffers: list = []
    pickled = io.BytesIO()
    _Pickler(pickled, protocol=5, buffer_callback=lambda b: b.raw().nbytes < OUT_OF_BAND_BYTES or buffers.append(b)).dump(message)
    return Encoded(pickled.getvalue(), [np.frombuffer(b.raw(), np.uint8) for b in buffers])


def write(conn: connection.Connection, encoded: Encoded) -> None:
    """The writing half of `send`."""
    if not encoded.raws:
        return conn.send_bytes(encoded.head)
    conn.send(OutOfBand(encoded.head, tuple(r.size for r in encoded.raws)))
    send_arrays(conn, encoded.raws)


def recv(conn: connection.Connection) -> Any:
    """A message `send` sent; its out-of-band buffers are read straight into arrays of their own (read-only where
    the sender's were, as pickle keeps that flag)."""
    message = conn.recv()
    if not isinstance(message, OutOfBand):
        return message
    buffers = [np.empty(n, np.uint8) for n in message.sizes]
    recv_arrays(conn, buffers)
    return pickle.loads(message.head, buffers=buffers)


# -- arrays over a TCP connection -----------------------------------------------------------
_IOV_MAX = 512  # buffers per writev/readv call (Linux allows 1024)


def carries_arrays(request: Any) -> bool:
    """Whether a request's `Call` is followed by its arrays on a streamed (TCP) connection: a push that is not skipped."""
    return isinstance(request, Push) and not request.skipped


def _bytes(arrays) -> list[memoryview]:
    return [memoryview(x.reshape(-1).view(np.uint8)) for x in arrays if x.nbytes]  # any dtype (bfloat16 too)


def _all(op, fd: int, views: list[memoryview], what: str) -> None:
    """Runs `op(fd, buffers)` (`os.writev` / `os.readv`) until every byte of `views` has moved."""
    while views:
        n = op(fd, views[:_IOV_MAX])
        if n == 0:
            raise EOFError(f"the connection closed in the middle of {what}")
        while n and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def send_arrays(conn: connection.Connection, arrays) -> None:
    """Writes C-contiguous `arrays`' bytes, one after another, straight from their memory."""
    _all(os.writev, conn.fileno(), _bytes(arrays), "sending arrays")


def recv_arrays(conn: connection.Connection, arrays) -> None:
    """Reads the bytes `send_arrays` wrote straight into writable C-contiguous `arrays` of the same layout."""
    _all(os.readv, conn.fileno(), _bytes(arrays), "receiving arrays")


def skip_bytes(conn: connection.Connection, nbytes: int) -> None:
    """Reads and drops `nbytes` (arrays nobody will read: an abandoned pull's)."""
    scratch = bytearray(min(nbytes, 1 << 20) or 1)
    while nbytes:
        n = os.readv(conn.fileno(), [memoryview(scratch)[: min(nbytes, len(scratch))]])
        if n == 0:
            raise EOFError("the connection closed in the middle of receiving arrays")
        nbytes -= n


def tune_tcp(sock: socket.socket) -> None:
    """No Nagle delay (requests are small messages), and a peer that vanishes is noticed within a minute."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 20), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# -- the handshake -----------------------------------------------------------------------
def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the OS does not say, or for TCP)."""
    if not hasattr(socket, "SO_PEERCRED") or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _authenticated(sock: socket.socket, authkey: bytes, serving: bool, timeout: float) -> connection.Connection:
    """A `Connection` over `sock` once the HMAC challenge has passed both ways within `timeout` seconds.

    Nothing the peer sends is unpickled before that. A peer that stalls is cut
    off at the deadline (shutting the socket wakes the blocked read).
    """
    sock.setblocking(True)
    conn = connection.Connection(os.dup(sock.fileno()))
    watchdog = threading.Timer(timeout, _shut, (sock,))
    watchdog.daemon = True
    watchdog.start()
    try:
        if serving:
            connection.deliver_challenge(conn, authkey)
            connection.answer_challenge(conn, authkey)
        else:
            connection.answer_challenge(conn, authkey)
            connection.deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    finally:
        watchdog.cancel()
        sock.close()
    return conn


def cut(conn: connection.Connection) -> None:
    """Shuts a connection down both ways (its owner still closes it): after a message written only in part, the
    peer then reads the end of the stream, never the next message's bytes as the rest of that one."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:  # closed already
        return
    with sock:
        _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def accept(sock: socket.socket, authkey: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> connection.Connection:
    """The endpoint's side: checks who connected, then authenticates. Raises on any failure."""
    uid = peer_uid(sock)
    if uid is not None and uid != os.getuid():
        sock.close()
        raise PermissionError(f"a process of user {uid} tried to connect; only user {os.getuid()} may")
    return _authenticated(sock, authkey, True, timeout)


def connect(endpoint: Endpoint, timeout: float | None = None, tcp: bool = False) -> connection.Connection:
    """The client's side: connects (to `endpoint.tcp` if `tcp`) and authenticates within `timeout` seconds
    (default `CONNECT_TIMEOUT`). On a Unix socket, it answers only a listener of its own user."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    if tcp and endpoint.tcp is None:
        raise ValueError("this shard's endpoint is not served over TCP")
    while True:
        sock = socket.socket(socket.AF_INET6 if tcp and ":" in endpoint.tcp[0] else socket.AF_INET if tcp else socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            if tcp:
                tune_tcp(sock)
            sock.connect(tuple(endpoint.tcp) if tcp else endpoint.address)
            break
        except BlockingIOError:  # a Unix socket's accept queue is full (others flooding it): room comes, or the deadline
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the shard's endpoint did not accept a connection within {timeout} s (its queue stayed full)") from None
            time.sleep(0.005)
        except socket.timeout:
            sock.close()
            raise TimeoutError(f"the shard's endpoint did not accept a connection within {timeout} s") from None
        except BaseException:
            sock.close()
            raise
    uid = peer_uid(sock)
    if uid is not None and uid != os.getuid():  # not our shard: another user holds its address
        sock.close()
        raise PermissionError(f"a process of user {uid}, not this user's shard, listens at the shard's address {endpoint.address!r}")
    try:
        return _authenticated(sock, endpoint.authkey, False, max(1e-3, deadline - time.monotonic()))
    except (EOFError, OSError) as e:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the shard's endpoint did not complete the handshake within {timeout} s") from e
        raise
