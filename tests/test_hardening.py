"""What a careless user or a hostile local process can do to a server, and what it must not achieve.

Endpoints: a peer that sends garbage, an oversized header or nothing at all,
or runs the shard out of file descriptors, costs that connection only; a fresh
client still pulls within seconds. Pushes are all or nothing. Ctrl-C stops
`run_workers` on every transport, leaving nothing behind. Clients of a closed
server fail at once, with one clear error on every transport.
"""

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_equal, params_tree, wait_for

import jaxps

PARAMS = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(5, np.float32)}
ONES = {k: np.ones_like(v) for k, v in PARAMS.items()}
ENDPOINT_TRANSPORTS = ["multiprocessing", "ray"]  # those that serve shards on Unix sockets


def _listening_unix_sockets() -> set[str]:
    """Addresses of listening Unix sockets on this machine ('@' marks the abstract namespace)."""
    found = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                found.add(fields[7])
    return found


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect("\0" + path[1:] if path.startswith("@") else path)
    return sock


def _pull_in_a_new_thread(ps, timeout: float) -> dict:
    """A fresh client connection (a new thread connects anew) pulls within `timeout` seconds."""
    seen, errors = {}, []

    def pull():
        try:
            seen.update(ps.client(0).pull(timeout=timeout))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=pull, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(timeout + 5)
    assert not t.is_alive(), f"a new client could not pull within {timeout + 5} s"
    assert not errors, errors
    return seen, time.monotonic() - started


@pytest.fixture(params=ENDPOINT_TRANSPORTS)
def endpoint_server(request):
    """A 2-shard server on a transport with endpoints, and the listening sockets it opened."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    before = _listening_unix_sockets()
    ps = jaxps.ParameterServer(PARAMS, optax.sgd(1.0), shards=2, transport=request.param)
    ps.pull()  # every endpoint is up and has served a connection
    opened = sorted(p for p in _listening_unix_sockets() - before if not p.startswith("/tmp/ray"))
    assert len(opened) >= 2, opened
    yield ps, opened
    ps.close()


def test_garbage_oversized_and_silent_peers_do_not_stall_a_shard(endpoint_server):
    ps, opened = endpoint_server
    silent = []
    for path in opened:
        with _connect(path) as sock:  # garbage, then gone
            sock.sendall(os.urandom(64))
        with _connect(path) as sock:  # a header announcing far more than a handshake may hold
            sock.sendall(struct.pack("!i", 1 << 30) + b"x" * 300)
        with _connect(path) as sock:  # a header announcing a negative length
            sock.sendall(struct.pack("!i", -1))
        silent.append(_connect(path))  # connects and says nothing, and stays
    try:
        seen, took = _pull_in_a_new_thread(ps, timeout=10)
        np.testing.assert_array_equal(np.asarray(seen["a"]), PARAMS["a"])
        assert ps.push(ONES).result(30) == "applied"
        np.testing.assert_array_equal(np.asarray(ps.params()["a"]), PARAMS["a"] - 1)
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.slow
def test_a_peer_that_stays_silent_is_cut_off(endpoint_server):
    ps, opened = endpoint_server
    from jaxps.transports import wire

    sock = _connect(opened[0])
    sock.settimeout(wire.HANDSHAKE_TIMEOUT + 10)
    t = time.monotonic()
    data = sock.recv(1024)  # the challenge; then silence until the deadline closes the socket
    while data:
        data = sock.recv(1024)
    assert time.monotonic() - t < wire.HANDSHAKE_TIMEOUT + 5
    sock.close()


@pytest.mark.slow
def test_running_a_shard_out_of_file_descriptors_recovers(endpoint_server):
    ps, opened = endpoint_server
    pid = ps._channels[0].endpoint.pid
    with open(f"/proc/{pid}/limits") as f:
        assert "Max open files" in f.read()
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, old[1]))
    hogs = []
    try:
        for _ in range(12):  # more connections than the shard can hold descriptors for
            for path in opened:
                try:
                    hogs.append(_connect(path))
                except OSError:
                    pass
        time.sleep(0.5)
    finally:
        for sock in hogs:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    seen, _ = _pull_in_a_new_thread(ps, timeout=15)
    np.testing.assert_array_equal(np.asarray(seen["b"]), PARAMS["b"])


def test_another_user_cannot_connect(endpoint_server):
    ps, opened = endpoint_server
    from jaxps.transports import wire

    def connect():  # a bare child, no JAX in it: it only connects and reads
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(ps._channels[0].endpoint.address)
        except PermissionError:  # (multiprocessing: the socket is in a directory only its user can enter)
            return 0
        return 0 if sock.recv(1) == b"" else 1  # closed at once, before any challenge

    assert _as_nobody(connect) == 0
    with _connect(opened[0]) as sock:  # the uid check reads the peer's credentials: here, the shard's own user
        assert wire.peer_uid(sock) == os.getuid()
    _pull_in_a_new_thread(ps, timeout=10)


def _fork_as_nobody(fn) -> int:
    """Starts `fn()` in a forked child as user 65534 (nobody); its pid. Its exit status: fn's return value, 99 if
    it raised."""
    import warnings

    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fork with JAX threads: the child runs no JAX
        pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            os._exit(fn())
        except BaseException:
            os._exit(99)
    return pid


def _as_nobody(fn) -> int:
    """Runs `fn()` as user 65534 (nobody) and returns its exit status."""
    return os.WEXITSTATUS(os.waitpid(_fork_as_nobody(fn), 0)[1])


def test_another_user_cannot_take_a_dead_shards_address(tmp_path):
    # multiprocessing, on_shard_failure="restart": the shard is SIGKILLed; another user tries to bind its address
    # (to be the one its clients reconnect to, or to keep it from coming back), and cannot: it is restarted there
    ps = jaxps.ParameterServer(
        PARAMS, optax.sgd(1.0), shards=2, transport="multiprocessing", on_shard_failure="restart",
        checkpoint=jaxps.Checkpointing(tmp_path, every=1),
    )
    try:
        ps.push(ONES).result(30)
        address = ps._channels[0].endpoint.address
        socket_dir = os.path.dirname(address)
        assert os.stat(socket_dir).st_mode & 0o777 == 0o700 and os.stat(socket_dir).st_uid == os.getuid()
        os.kill(ps._transport.pids[0], signal.SIGKILL)

        def bind():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(address)
            except PermissionError:
                return 0
            return 1

        assert _as_nobody(bind) == 0
        pulled = ps.pull(timeout=60)  # restarted at its address (from the last checkpoint: step 0 or 1)
        np.testing.assert_array_equal(np.asarray(pulled["a"]), PARAMS["a"] - ps.step)
        assert ps._channels[0].endpoint.address == address
    finally:
        ps.close()
    assert not os.path.exists(socket_dir)


def test_a_client_answers_only_a_listener_of_its_own_user():
    from jaxps.transports import wire

    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    address = f"\0jaxps_test_{os.getpid()}_impostor"
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def impostor():  # binds the address a client is about to use, and waits for the client to try
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        sock.listen(8)
        os.write(ready_w, b"x")
        os.read(done_r, 1)
        return 0

    pid = _fork_as_nobody(impostor)
    os.close(ready_w)  # (the child's copy only: a child that fails reads as the end of the pipe)
    os.close(done_r)
    try:
        assert os.read(ready_r, 1) == b"x", "the impostor could not listen"
        endpoint = wire.Endpoint(address, os.urandom(32), (), pid)
        with pytest.raises(PermissionError, match="user 65534, not this user's shard"):
            wire.connect(endpoint, timeout=5)
    finally:
        os.write(done_w, b"x")
        assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 0
        os.close(ready_r)
        os.close(done_w)


def test_a_full_accept_queue_is_a_timeout_not_a_dead_shard():
    # others flooding a shard's socket fill its accept queue; a client waits for room until its deadline
    from jaxps.transports import wire

    address = f"\0jaxps_test_{os.getpid()}_full"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)  # and never accepts
    flood = []
    try:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            flood.append(sock)
            try:
                sock.connect(address)
            except BlockingIOError:
                break
            assert len(flood) < 1000, "the queue never filled"
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="within 0.5 s \\(its queue stayed full\\)"):
            wire.connect(wire.Endpoint(address, os.urandom(32), (), os.getpid()), timeout=0.5)
        assert 0.4 < time.monotonic() - t < 5
    finally:
        for sock in flood:
            sock.close()
        listener.close()


def test_a_shards_endpoint_does_not_show_its_secret(endpoint_server):
    ps, _ = endpoint_server
    endpoint = ps._channels[0].endpoint
    assert endpoint.authkey.hex() not in repr(endpoint) and repr(endpoint.authkey) not in repr(endpoint)
    assert f"pid={endpoint.pid}" in repr(endpoint)


def test_closing_leaves_another_users_segments_alone(tmp_path):
    # another user who read a server's prefix creates segments named with it; they are not the server's to remove
    ps = jaxps.ParameterServer(PARAMS, optax.sgd(1.0), shards=2, transport="multiprocessing")
    prefix = ps._transport.shm_prefix
    path = f"/dev/shm/{prefix}s0p1c0_theirs"
    try:
        if os.getuid() != 0:
            pytest.skip("needs root to act as another user")
        with open(path, "wb"):
            pass
        os.chown(path, 65534, 65534)
        ps.pull()
        ps.close()
        assert os.path.exists(path)
    finally:
        ps.close()
        if os.path.exists(path):
            os.unlink(path)


def test_connecting_honours_the_pull_timeout(endpoint_server):
    ps, _ = endpoint_server
    channel = ps._channels[0]
    pid = channel.endpoint.pid
    os.kill(pid, signal.SIGSTOP)  # the shard accepts nothing (the kernel still queues the connection)
    try:
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            _fresh_thread_call(lambda: ps.client(0).pull(timeout=1.0))
        assert time.monotonic() - t < 6
    finally:
        os.kill(pid, signal.SIGCONT)
    _pull_in_a_new_thread(ps, timeout=10)


def _fresh_thread_call(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the call did not return"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- all or nothing ---------------------------------------------------------------------------
def test_a_push_that_cannot_be_converted_changes_no_shard(make_server):
    ps = make_server(params_tree(), optax.sgd(0.1), shards=3, nonfinite="allow")
    before, stats = ps.params(), ps.stats()
    grads = jax.tree.map(jnp.ones_like, params_tree())
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    jax.jit(lambda x: x + 1, donate_argnums=0)(leaves[-1])  # the last leaf (on some shard) is deleted
    with pytest.raises(jaxps.PushError, match="was deleted"):
        ps.push(jax.tree_util.tree_unflatten(treedef, leaves))
    assert [s["steps"] for s in ps.stats()["shards"]] == [0, 0, 0]
    assert ps.stats()["pushes_applied"] == stats["pushes_applied"] == 0
    assert_trees_equal(ps.params(), before)
    assert ps.push(jax.tree.map(jnp.ones_like, params_tree())).result(30) == "applied"  # still serving


@pytest.mark.parametrize(
    "leaf, shown",
    [
        (np.array(["x"] * 5), "<U1 is not numeric"),
        ("text", "str is not numeric"),
        (np.array([object()] * 5), "object is not numeric"),
        (np.zeros(5, "datetime64[s]"), "datetime64[s] is not numeric"),
    ],
)
def test_non_numeric_leaves_are_push_errors_naming_the_path(make_server, leaf, shown):
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2)
    with pytest.raises(jaxps.PushError, match=rf"\['b'\]: {shown}; expected float32\[5\]".replace("[s]", r"\[s\]")):
        ps.push({"a": ONES["a"], "b": leaf})
    assert ps.step == 0 and ps.push(ONES).result(30) == "applied"


def test_integer_and_bool_gradients_are_cast_to_the_parameters_dtype(make_server):
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2)
    ps.push({"a": np.ones((4, 3), np.int64), "b": np.array([True, False, True, False, True])}).result(30)
    params = ps.params()
    np.testing.assert_array_equal(np.asarray(params["a"]), PARAMS["a"] - 1)
    np.testing.assert_array_equal(np.asarray(params["b"]), -np.array([1, 0, 1, 0, 1], np.float32))
    assert params["b"].dtype == np.float32


# -- a closed server ------------------------------------------------------------------------
def test_a_client_of_a_closed_server_fails_at_once(make_server):
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2)
    client = ps.client(0)
    client.pull()
    ps.close()
    for call in (client.pull, lambda: client.push(ONES), ps.pull, ps.params, lambda: ps.client(1)):
        t = time.monotonic()
        with pytest.raises(jaxps.ServerClosedError, match="closed"):
            call()
        assert time.monotonic() - t < 2
    errors = []

    def from_another_thread():
        try:
            client.pull()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=from_another_thread)
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], jaxps.ServerClosedError)
    client.leave()  # a worker's final leave does not fail on a closed server


def _push_until_closed(client, _):
    while True:
        client.push({k: np.ones_like(v) for k, v in client.pull().items()}).result(60)


def _push_or_compute_until_closed(client, flag):
    if client.worker == 2:
        open(flag, "w").close()
        time.sleep(BUSY_S)  # a long computation, no pull or push
    _push_until_closed(client, None)


BUSY_S = 40


@pytest.mark.parametrize("mode", ["async", pytest.param("sync", marks=pytest.mark.slow)])
def test_closing_the_server_while_run_workers_runs_is_server_closed_not_a_death(make_server, mode, tmp_path, capfd):
    """`ps.close()` from another thread mid-run (async: once steps are applied; sync: while the others wait in a step
    for the busy one): `run_workers` raises `ServerClosedError` (worker processes see their shards stop, which is not
    a shard's death), and no worker is reported as failed; without waiting for a worker busy away from the server
    (in-process: a thread cannot be stopped, it is waited for 5 s)."""
    ps = make_server(PARAMS, optax.sgd(1e-3), shards=2, mode=mode, workers=3)
    flag = str(tmp_path / "busy")

    def close_once_under_way():
        wait_for(lambda: os.path.exists(flag) and (mode == "sync" or ps.step > 0), 60)
        time.sleep(0.3)
        ps.close()

    threading.Thread(target=close_once_under_way, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(jaxps.ServerClosedError, match="closed"):
        ps.run_workers(_push_or_compute_until_closed, [flag] * 3)
    assert time.monotonic() - started < BUSY_S / 2
    assert "failed" not in capfd.readouterr().err


def _fail_or_compute(client, flag):
    if client.worker == 0:
        raise ValueError("worker 0's own error")
    _push_or_compute_until_closed(client, flag)


@pytest.mark.slow
def test_a_worker_error_from_before_the_close_is_what_run_workers_raises(make_server, tmp_path):
    ps = make_server(PARAMS, optax.sgd(1e-3), shards=2, mode="async", workers=3)
    flag = str(tmp_path / "busy")
    threading.Thread(target=lambda: (wait_for(lambda: os.path.exists(flag), 60), time.sleep(0.5), ps.close()), daemon=True).start()
    with pytest.raises(ValueError, match="worker 0's own error"):
        ps.run_workers(_fail_or_compute, [flag] * 3)


@pytest.mark.parametrize(
    "transport, recovery",
    [
        ("multiprocessing", "restart"),
        pytest.param("multiprocessing", "standby", marks=pytest.mark.slow),
        pytest.param("ray", "restart", marks=pytest.mark.slow),
        pytest.param("ray", "standby", marks=pytest.mark.slow),
    ],
)
def test_closing_a_server_that_recovers_shards_ends_run_workers_at_once(request, transport, recovery, tmp_path, capfd):
    """With fail-over on, worker processes could take their stopped shards for dead ones being recovered and wait
    out the recovery's patience (300 s): `close()` still ends `run_workers` with `ServerClosedError` at once."""
    if transport == "ray":
        request.getfixturevalue("ray_session")
    kw = {"replicas": 1} if recovery == "standby" else {"on_shard_failure": "restart", "checkpoint": jaxps.Checkpointing(tmp_path, every=1000)}
    ps = jaxps.ParameterServer(PARAMS, optax.sgd(1e-3), shards=2, mode="sync", workers=2, transport=transport, **kw)
    try:
        threading.Timer(2.0, ps.close).start()
        started = time.monotonic()
        with pytest.raises(jaxps.ServerClosedError, match="closed"):
            ps.run_workers(_push_until_closed, [None, None])
        assert time.monotonic() - started < 30
    finally:
        ps.close()
    assert "failed" not in capfd.readouterr().err


def test_requests_waiting_when_the_server_closes_raise_server_closed(make_server):
    """A pull waiting for a sync step, and the push that step waits on, hear that the server closed."""
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2, mode="sync", workers=2)
    c0, _ = ps.client(0), ps.client(1)
    c0.pull()
    push = c0.push(ONES)  # step 0 waits for worker 1
    outcome = []

    def pull():
        try:
            outcome.append(c0.pull())
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=pull)
    t.start()
    time.sleep(0.5)
    assert not outcome  # waiting for step 0
    ps.close()
    t.join(30)
    assert not t.is_alive() and isinstance(outcome[0], jaxps.ServerClosedError), outcome
    with pytest.raises(jaxps.ServerClosedError):
        push.result(30)


# -- Ctrl-C ----------------------------------------------------------------------------------
_CTRL_C = """
import os, signal, sys, time
# as started from a terminal: a test runner in the background may hand us SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np, optax, jaxps

def work(client, n):
    for i in range(n):
        client.push({"w": np.ones(1000, np.float32)})
        client.pull()
        if i == 0 and client.worker == 0:
            print("working", flush=True)
    return n

if __name__ == "__main__":
    kw = {"transport_options": {"address": "local", "init_options": {"num_cpus": 2}}} if "%(transport)s" == "ray" else {}
    with jaxps.ParameterServer({"w": np.zeros(1000, np.float32)}, optax.sgd(1e-6), transport="%(transport)s",
                               mode="sync", workers=2, **kw) as ps:
        endpoints = [ch.endpoint.address for ch in ps._channels if getattr(ch, "endpoint", None)]
        prefixes = [getattr(ps._transport, "shm_prefix", None)] + [a.lstrip("\\0").rsplit("_", 1)[0] for a in endpoints]
        print("segments named", *[p for p in prefixes if p], flush=True)
        ps.run_workers(work, [10**6, 10**6])
"""


def _session_processes(sid: int) -> list[int]:
    """Processes still alive in session `sid` (zombies excluded)."""
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                left.append(int(pid))
    return left


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["inprocess", "multiprocessing", "ray"])
def test_ctrl_c_stops_run_workers_and_leaves_nothing(tmp_path, transport):
    if transport == "ray":
        pytest.importorskip("ray")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_CTRL_C % {"transport": transport}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        prefixes = proc.stdout.readline().split()[2:]
        assert prefixes or transport == "inprocess", proc.communicate(timeout=60)
        line = proc.stdout.readline()  # Ray prefixes a task's output with its name and pid
        assert line.endswith("working\n"), proc.communicate(timeout=60)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        t = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 10, f"exited {took:.1f} s after Ctrl-C"
    assert "KeyboardInterrupt" in err, err
    assert "terminate called" not in err and "FATAL" not in err, err
    deadline = time.monotonic() + 10
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_processes(proc.pid), "processes left running"
    assert not [n for n in os.listdir("/dev/shm") if any(n.startswith(p) for p in prefixes)], "segments left"


# -- errors from workers ---------------------------------------------------------------------
def _push_a_bad_tree(client, _):
    client.push({"a": np.ones((2, 2), np.float32), "b": np.ones(5, np.float32)})


def _fail_or_train(client, worker):
    if worker == 1:
        raise KeyError("worker 1's data ran out")
    client.pull()
    client.push(ONES).result(60)  # a sync step: applied once worker 1 has left
    time.sleep(2.0)  # still running when worker 1's error reaches the driver
    for _ in range(2):
        client.pull()
        client.push(ONES).result(60)


def test_a_worker_that_fails_is_reported_at_once_and_the_others_go_on(make_server, capfd):
    """A worker's exception does not stop the others (as a worker's death does not): it is said on stderr when it
    happens, and `run_workers` raises it once the others are done."""
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2, mode="sync", workers=2)
    with pytest.raises(KeyError, match="data ran out"):
        ps.run_workers(_fail_or_train, [0, 1])
    assert ps.step == 3
    err = capfd.readouterr().err
    assert "jaxps: worker 1 failed (KeyError: " in err and "the other workers go on" in err, err


def test_a_worker_push_error_reaches_the_caller_as_itself(make_server):
    ps = make_server(PARAMS, optax.sgd(1.0), shards=2)
    with pytest.raises(jaxps.PushError) as raised:
        ps.run_workers(_push_a_bad_tree, [None])
    assert type(raised.value) is jaxps.PushError  # not a wrapper class
    message = str(raised.value)
    assert message.startswith("push rejected, nothing was changed: ['a']: shape [2, 2], expected [4, 3]"), message
    assert "\x1b[" not in message and "Traceback" not in message
    assert ps.step == 0 and ps.push(ONES).result(30) == "applied"


def test_what_cannot_be_a_server_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"leaf \['s'\] is not an array or a number: str 'hello'"):
        jaxps.ParameterServer({**PARAMS, "s": "hello"}, optax.sgd(1.0))
    for tx in ("adam", None, optax.adam):
        with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
            jaxps.ParameterServer(PARAMS, tx)
    ps = jaxps.ParameterServer(PARAMS, optax.sgd(1.0))
    with pytest.raises(jaxps.PushError, match=r"nothing was changed: the gradient tree does not match .*\['c'\]"):
        ps.push({**ONES, "c": np.ones(2, np.float32)})
    assert ps.step == 0 and ps.push(ONES).result(30) == "applied"
    ps.close()
    with pytest.raises(jaxps.ServerClosedError):
        with ps:
            pass


def _a_generator(client, n):
    return (i for i in range(n))


def test_a_worker_that_returns_a_generator_is_told_on_every_transport(make_server):
    ps = make_server(PARAMS, optax.sgd(1.0))
    with pytest.raises(TypeError, match="worker 0's function returned a generator; return its items as a list"):
        ps.run_workers(_a_generator, [3])
