"""Behaviour specific to the multiprocessing transport, with real spawned processes."""

import gc
import multiprocessing
import operator
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import optax
import pytest
from helpers import assert_trees_equal, grads_like, params_tree, wait_for

import jaxps
from jaxps.transports import multiprocess, shm_channel
from jaxps.transports.multiprocess import POOL, MultiprocessingTransport

PARAMS = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(5, np.float32), "c": np.float32(2.0)}
ONES = {k: np.ones_like(v) for k, v in PARAMS.items()}


def _alive(pid):
    """Running (a zombie, or a pid reaped and gone, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _segments(prefix):
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def _assert_clean(pids, prefix, within=10.0, socket_dir=None):
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "shard processes left running"
    assert not _segments(prefix), "shared-memory segments left behind"
    assert socket_dir is None or not os.path.exists(socket_dir), "the shards' socket directory left behind"


@pytest.fixture
def server():
    """`server(**kw)` -> a multiprocessing ParameterServer; closed after the test, then checked for leftovers."""
    made = []

    def make(params=PARAMS, tx=None, **kw):
        ps = jaxps.ParameterServer(params, tx or optax.sgd(1.0), transport="multiprocessing", **kw)
        made.append(ps)
        return ps

    yield make
    for ps in made:
        ps.close()
    for ps in made:
        _assert_clean(ps._transport.pids, ps._transport.shm_prefix, socket_dir=ps._transport.socket_dir)


def _conn(ps, shard=0):
    """This thread's connection to `shard` (its pull buffers are `_lent`)."""
    return ps._channels[shard].conn()


def _lent(conn):
    """Indices of the pull buffers that arrays handed out still use (as the next pull sees them)."""
    shm_channel.collect_garbage()
    return [i for i, base in enumerate(conn._lent) if base is not None and base() is not None]


def _mapped(prefix):
    """How many segments named with `prefix` this process still maps."""
    with open("/proc/self/maps") as f:
        return len({line.split("/dev/shm/")[1].split()[0] for line in f if f"/dev/shm/{prefix}" in line})


def _expected(k):
    """PARAMS after `k` pushes of ONES with sgd(1.0)."""
    return {name: v - np.float32(k) for name, v in PARAMS.items()}


def _assert_values(tree, expected):
    for name in expected:
        np.testing.assert_array_equal(np.asarray(tree[name]), expected[name], err_msg=name)


def test_pull_lends_its_buffer_and_a_training_loop_reuses_two(server):
    ps = server()
    params = ps.pull()
    conn = _conn(ps)
    assert _lent(conn) == [0]  # the arrays are views of the pull buffer: no copy on the client
    for k in range(1, 8):  # pull, push, pull: the previous pull is alive during the next one
        ps.push(ONES).result(30)
        params = ps.pull()
        _assert_values(params, _expected(k))
    assert len(conn._lent) == 2 and len(_lent(conn)) == 1
    del params
    assert _lent(conn) == []
    for _ in range(3):  # arrays dropped before the next pull: one buffer does
        jax.block_until_ready(ps.pull())
    assert len(conn._lent) == 2 and _lent(conn) == []


def test_held_pulls_stay_intact_past_the_pool(server):
    ps = server()
    held = []  # (pushes before the pull, the pulled tree)
    for k in range(POOL + 3):  # the last ones find the pool full and are copied out
        held.append((k, ps.pull()))
        ps.push(ONES).result(30)
    conn = _conn(ps)
    assert len(conn._lent) == POOL and len(_lent(conn)) == POOL - 1
    for k in range(POOL + 3, 3 * POOL):  # later pushes and pulls, some kept
        pulled = ps.pull()
        _assert_values(pulled, _expected(k))
        if k % 2:
            held.append((k, pulled))
        ps.push(ONES).result(30)
    assert len(conn._lent) == POOL
    for k, tree in held:
        _assert_values(tree, _expected(k))
    held.clear()
    assert _lent(conn) == []
    _assert_values(ps.pull(), _expected(3 * POOL))


def test_pulled_arrays_are_read_only(server):
    ps = server()
    a = ps.pull()["a"]
    view = np.asarray(a)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 100.0
    with pytest.raises(ValueError):
        view.flags.writeable = True
    b = a.at[0, 0].set(100.0)  # a new array; the pulled one is unchanged
    ps.push(ONES).result(30)
    _assert_values(ps.pull(), _expected(1))
    np.testing.assert_array_equal(np.asarray(a), PARAMS["a"])
    assert float(b[0, 0]) == 100.0


def test_pulls_match_the_inprocess_transport(server):
    tx = optax.sgd(0.1, momentum=0.9)
    ps = server(params_tree(), tx, shards=2)
    ref = jaxps.ParameterServer(params_tree(), tx, shards=2, transport="inprocess")
    try:
        held = []
        for seed in range(2 * POOL):
            got, want = ps.pull(), ref.pull()
            assert_trees_equal(got, want)
            held.append((got, want))
            grads = grads_like(want, seed)
            assert ps.push(grads).result(30) == ref.push(grads).result(30) == "applied"
        assert_trees_equal(ps.params(), ref.params())
        for got, want in held:
            assert_trees_equal(got, want)
    finally:
        ref.close()


@pytest.mark.parametrize("dtypes", ["float32", pytest.param("mixed", marks=pytest.mark.slow)])
def test_many_small_leaves_cross_packed_and_match_the_inprocess_transport(server, dtypes):
    """100+ small leaves go to the device in one call each way (`transports.packed`), bit for bit; leaves of
    one dtype lie back to back and are copied and checked at once; a NaN among them still names its leaf."""
    import ml_dtypes

    from jaxps.validate import PushError

    rng = np.random.default_rng(1)
    params = {f"w{i:03d}": rng.standard_normal((i % 5 + 1, 4)).astype(np.float32) for i in range(100)}
    params.update(scalar=np.float32(3), empty=np.zeros((0, 2), np.float32))
    if dtypes == "mixed":
        params.update(half=np.ones(7, ml_dtypes.bfloat16))
    tx = optax.adam(1e-2)
    ps = server(params, tx, shards=2)
    ref = jaxps.ParameterServer(params, tx, shards=2, transport="inprocess")
    try:
        client = ps.client(0)
        assert all(ch.unpack is not None for ch in client.channels)  # the packed path, both shards
        assert all(ch.flat is not None for ch in client.channels) == (dtypes == "float32")  # bf16: one shard is not
        held = []
        for seed in range(3):
            got, want = client.pull(), ref.pull()
            assert_trees_equal(got, want)
            held.append((got, want))
            grads = grads_like(params, seed)
            assert client.push(grads).result(30) == ref.push(grads).result(30) == "applied"
        bad = dict(grads_like(params, 9), w057=np.full((3, 4), np.nan, np.float32))
        with pytest.raises(PushError, match=r"\['w057'\]"):
            client.push(bad)
        assert_trees_equal(client.pull(), ref.pull())  # the bad push changed nothing
        for got, want in held:  # pulled copies: later pulls never write into them
            assert_trees_equal(got, want)
    finally:
        ref.close()


def test_an_abandoned_pull_does_not_hold_a_buffer(server):
    ps = server(mode="sync", workers=2)
    c0, c1 = ps.client(0), ps.client(1)
    kept = c0.pull()
    c1.pull()
    c0.push(ONES)  # the step waits for worker 1, and so do worker 0's pulls
    for _ in range(2 * POOL):
        with pytest.raises(TimeoutError):
            c0.pull(timeout=0.05)
    assert c1.push(ONES).result(30) == "applied"
    _assert_values(c0.pull(timeout=30), _expected(1))
    _assert_values(kept, _expected(0))
    assert len(_conn(ps)._lent) == 2  # `kept`'s buffer, and one for every later pull


def test_close_with_pulled_arrays_alive(server):
    ps = server()
    held = []
    for k in range(POOL + 1):
        held.append(ps.pull())
        ps.push(ONES).result(30)
    assert len(_conn(ps)._lent) == POOL
    ps.close()
    prefix = ps._transport.shm_prefix
    _assert_clean(ps._transport.pids, prefix)
    for k, tree in enumerate(held):  # still mapped, and unchanged
        _assert_values(tree, _expected(k))
    assert _mapped(prefix) == POOL - 1  # the buffers lent out; the others are unmapped
    held.clear()
    gc.collect()
    shm_channel.collect_garbage()
    assert _mapped(prefix) == 0


def _pull_push_in_child(client, out):
    try:
        before = client.pull()
        outcome = client.push({k: np.full_like(v, 2.0) for k, v in before.items()}).result(60)
        out.send((outcome, {k: np.asarray(v) for k, v in client.pull().items()}, os.getpid()))
    except BaseException as e:  # pragma: no cover - reported to the parent
        out.send(("error", repr(e), os.getpid()))
    finally:
        client.leave()


def test_client_travels_into_a_user_spawned_process(server):
    ps = server(shards=2)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_pull_push_in_child, args=(ps.client(1), theirs))
    child.start()
    try:
        assert ours.poll(120), "the child did not answer"
        outcome, seen, pid = ours.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert pid != os.getpid() and outcome == "applied", seen
    expected = {k: v - 2.0 for k, v in PARAMS.items()}
    for k in PARAMS:  # the child saw its push, and so does the parent
        np.testing.assert_array_equal(seen[k], expected[k])
        np.testing.assert_array_equal(np.asarray(ps.params()[k]), expected[k])
    assert ps.stats()["pushes_applied"] == 1


def _sync_steps_in_child(client, steps, value):
    """A worker in a process of its own: `steps` sync steps (None: until killed), each pushing `value` everywhere."""
    t = 0
    while steps is None or t < steps:
        client.pull(timeout=120)
        client.push({k: np.full_like(v, value) for k, v in PARAMS.items()}).result(120)
        t += 1
    client.leave()


def test_a_killed_worker_process_is_replaced_mid_run_by_a_newcomer(server):
    # sync, 2 workers: worker 1's process is SIGKILLed mid-run; worker 0 goes on alone once it has left,
    # and a new process takes worker 1's slot, counted from the current step on both shards
    ps = server(shards=2, mode="sync", workers=2)
    ctx = multiprocessing.get_context("spawn")
    worker0 = ps.client(0)

    def steps(n):
        for _ in range(n):
            worker0.pull(timeout=120)
            assert worker0.push(ONES).result(120) == "applied"

    first = ctx.Process(target=_sync_steps_in_child, args=(ps.client(1), None, 2.0))
    first.start()
    try:
        steps(6)
        # worker 1 has pushed for step 6 on both shards and waits in its pull for worker 0: kill it there
        assert wait_for(lambda: all(s["worker_pushes"][1] == 7 for s in ps.stats()["shards"]), 120)
        os.kill(first.pid, signal.SIGKILL)
        first.join(30)
    finally:
        if first.is_alive():
            first.kill()
    ps.client(1).leave()  # the driver's word for a worker process of its own that died
    steps(3)  # step 6 with worker 1's last push, steps 7 and 8 alone
    second = ps.client(1)
    newcomer = ctx.Process(target=_sync_steps_in_child, args=(second, 3, 2.0))
    newcomer.start()
    try:
        steps(3)  # steps 9-11 with the newcomer
        newcomer.join(120)
    finally:
        if newcomer.is_alive():
            newcomer.kill()
    assert newcomer.exitcode == 0 and not _alive(first.pid)
    # the newcomer left in its own process: the driver learns it from the shards, and a third takes the slot
    third = ps.client(1)
    assert third is not second
    futures = [worker0.push(ONES), third.push({k: np.full_like(v, 2.0) for k, v in PARAMS.items()})]
    assert [f.result(120) for f in futures] == ["applied"] * 2
    assert ps.step == 13 and [s["version"] for s in ps.stats()["shards"]] == [13, 13]
    moved = 7 * 1.5 + 2 * 1.0 + 4 * 1.5  # the mean of both workers' pushes, or worker 0's alone
    for k, v in PARAMS.items():
        np.testing.assert_array_equal(np.asarray(ps.params()[k]), v - np.float32(moved), err_msg=k)


def test_channels_pickle_and_connect_per_thread(server):
    ps = server(shards=2)
    clone = pickle.loads(pickle.dumps(ps.client(0)))
    clone.push(ONES).result(30)
    seen = {}
    t = threading.Thread(target=lambda: seen.update(clone.pull()))
    t.start()
    t.join(60)
    np.testing.assert_array_equal(np.asarray(seen["a"]), PARAMS["a"] - 1.0)
    assert not _segments(ps._transport.shm_prefix), "buffer names must be unlinked once both sides mapped them"


def test_run_workers_in_two_processes(server):
    ps = server(shards=2, mode="sync", workers=2)

    def work(client, scale):  # a closure: cloudpickle sends it by value
        for _ in range(3):
            client.pull()
            assert client.push({k: np.full_like(v, scale) for k, v in PARAMS.items()}).result(60) == "applied"
        return client.worker, os.getpid()

    results = ps.run_workers(work, [1.0, 3.0])
    assert [w for w, _ in results] == [0, 1]
    assert len({pid for _, pid in results} | {os.getpid()}) == 3
    assert ps.step == 3  # three sync steps, each on the mean gradient 2.0
    np.testing.assert_array_equal(np.asarray(ps.params()["a"]), PARAMS["a"] - 6.0)


def test_run_workers_propagates_a_worker_error(server):
    ps = server()

    def work(client, arg):
        if arg == "bad":
            raise ValueError("worker blew up")
        return arg

    with pytest.raises(ValueError, match="worker blew up"):
        ps.run_workers(work, ["bad"])
    assert ps.run_workers(lambda client, arg: arg * 2, [21]) == [42]


def test_what_cannot_cross_to_or_from_a_worker_process_is_named(server):
    ps = server(mode="sync", workers=2)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="worker 0 cannot be sent to its process: its function cannot be pickled"):
        ps.run_workers(lambda client, arg: lock.acquire(), [0, 1])
    with pytest.raises(TypeError, match="worker 1 cannot be sent to its process: its argument cannot be pickled"):
        ps.run_workers(_identity, [1, lock])
    with pytest.raises(TypeError, match=r"worker 1's result \(Event\) cannot be pickled back to the driver"):
        ps.run_workers(_an_event, [0, 1])
    # the workers joined for the calls that could not start have left: a sync step does not wait for them
    assert ps.push(ONES).result(30) == "applied" and ps.step == 1
    assert ps.run_workers(_identity, [7, 8]) == [7, 8]


def test_a_dead_worker_process_leaves_so_the_others_go_on(server):
    ps = server(shards=2, mode="sync", workers=2)

    def work(client, steps):
        for t in range(steps):
            client.pull(timeout=60)
            if client.worker == 1 and t == 1:
                os._exit(3)  # dies without leaving, as an OOM kill would
            client.push({k: np.ones_like(v) for k, v in PARAMS.items()}).result(60)
        return steps

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1's process died \(exit code 3\)"):
        ps.run_workers(work, [4, 4])
    assert time.monotonic() - t0 < 50, "worker 0 waited for the dead worker until its timeout"
    assert ps.step == 4  # step 0 with both, steps 1-3 with worker 0 alone


def test_killed_shard_raises_shard_died_error(server):
    ps = server(shards=2)
    client = ps.client(0)
    client.pull()
    where = [s["where"] for s in ps.stats()["shards"]]  # the shards say where they run
    assert [w["pid"] for w in where] == ps._transport.pids and len(set(ps._transport.pids)) == 2
    pid = where[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    for call in (client.pull, lambda: client.push(ONES).result(60), ps.params):
        t = time.monotonic()
        with pytest.raises(jaxps.ShardDiedError, match=f"shard 1 \\(pid {pid}\\)"):
            call()
        assert time.monotonic() - t < 10


def test_killed_shard_wakes_a_waiting_result(server):
    ps = server(mode="sync", workers=2)
    client = ps.client(0)
    client.pull()
    future = client.push(ONES)  # waits for worker 1, which never comes
    assert not future.done()
    killer = threading.Timer(0.5, os.kill, (ps._transport.pids[0], signal.SIGKILL))
    killer.start()
    t = time.monotonic()
    with pytest.raises(jaxps.ShardDiedError, match="shard 0"):
        future.result(timeout=60)
    assert time.monotonic() - t < 10
    killer.join()


class _Bomb:
    """Pickles fine; blows up when unpickled (in the shard process)."""

    def __reduce__(self):
        return (operator.truediv, (1, 0))


def _unloadable_tx():
    bomb = _Bomb()
    base = optax.sgd(0.1)
    return optax.GradientTransformation(lambda p: (bomb, base.init(p))[1], base.update)


def test_shard_that_cannot_start_fails_clearly():
    before = set(multiprocessing.active_children())
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)shard 0 failed to start.*ZeroDivisionError"):
        jaxps.ParameterServer(PARAMS, _unloadable_tx(), transport="multiprocessing")
    assert time.monotonic() - t < 60
    assert set(multiprocessing.active_children()) <= before


def test_start_timeout():
    transport = MultiprocessingTransport(start_timeout=0.01)
    with pytest.raises(RuntimeError, match="did not start within 0.01 s"):
        jaxps.ParameterServer(PARAMS, optax.sgd(0.1), transport=transport)
    _assert_clean(transport.pids, transport.shm_prefix, socket_dir=transport.socket_dir)


_SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, whatever the runner ignores
import typing
import numpy as np, optax, jaxps
class Params(typing.NamedTuple):  # a class of __main__ in the tree: the shards rebuild it (cloudpickle >= 3)
    w: typing.Any
if __name__ == "__main__":
    ps = jaxps.ParameterServer(Params(np.zeros(1000, np.float32)), optax.sgd(0.1), shards=1,
                               transport="multiprocessing")
    ps.push(Params(np.ones(1000, np.float32))).result(60)
    assert isinstance(ps.pull(), Params)
    print(ps._transport.shm_prefix, ps._transport.socket_dir, *ps._transport.pids, flush=True)
    %s
"""


@pytest.mark.parametrize(
    "ending",
    [
        "pass",  # exits without close(): atexit cleans up
        "time.sleep(120)",  # SIGKILLed: the shard notices its parent is gone
        "held = [ps.pull() for _ in range(6)]; print(flush=True); time.sleep(120)",  # the same, with a full pool
        "while True: ps.push(Params(np.ones(1000, np.float32))); ps.pull()",  # Ctrl-C
        "time.sleep(120) # and its shards with it",  # SIGKILL to the group: the next server sweeps the socket directory
    ],
    ids=["exit-without-close", "parent-killed", "parent-killed-holding-pulls", "ctrl-c", "group-killed"],
)
def test_no_leftovers_when_the_parent_goes(tmp_path, ending, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT % ending))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        prefix, socket_dir, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert pids, proc.communicate(timeout=60)
        if ending.startswith("held"):
            assert proc.stdout.readline() == "\n", proc.communicate(timeout=60)  # the pulls are held
        if "shards with it" in ending:
            os.killpg(proc.pid, signal.SIGKILL)
        elif "time.sleep" in ending:
            proc.kill()
        elif ending.startswith("while"):
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_clean(pids, prefix)
    if "shards with it" in ending:  # nobody was left to remove it: what a later server's sweep removes
        assert os.path.isdir(socket_dir)
        parent = os.path.dirname(socket_dir)
        assert socket_dir not in multiprocess.sweep_socket_dirs(parent)  # not yet: it might be a server starting
        monkeypatch.setattr(multiprocess, "LEFT_FOR_S", 0.0)
        assert socket_dir in multiprocess.sweep_socket_dirs(parent)
    assert not os.path.exists(socket_dir), os.listdir(socket_dir)  # the shards' sockets, and their directory
    assert "leaked" not in err and "resource_tracker" not in err, err
    if ending == "pass":
        assert proc.returncode == 0, err


def test_the_sweep_leaves_socket_directories_that_may_be_in_use(tmp_path):
    """Only a directory named for a process gone, untouched a while, whose lock nobody holds and with no socket anyone
    listens on is swept; whatever else lies there, a server still starts."""
    import fcntl

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid, old = int(ended.stdout), time.time() - 2 * multiprocess.LEFT_FOR_S
    names = {"left": gone_pid, "young": gone_pid, "listened": gone_pid, "mine": os.getpid(), "odd": gone_pid,
             "locked": gone_pid, "unlocked": gone_pid, "huge": 10**30}  # fmt: skip
    made = {}
    for name, pid in names.items():
        made[name] = tmp_path / f"jaxps_{pid}_{name}"
        made[name].mkdir(mode=0o700)
        if name != "unlocked":  # (no lock file: not a server's, or one still being made)
            (made[name] / multiprocess.LOCK).touch()
    sockets = []
    for name in ("left", "listened", "locked", "unlocked"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(made[name] / "s0"))
        sockets.append(s)
    sockets[1].listen()
    for s in (sockets[0], sockets[2], sockets[3]):
        s.close()  # bound, never listening: as a killed shard leaves its socket
    (made["odd"] / "notes.txt").write_text("not a socket")
    held = os.open(made["locked"] / multiprocess.LOCK, os.O_RDONLY)  # a live driver, of another PID namespace say
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        for name, path in made.items():
            if name != "young":
                os.utime(path, (old, old))
        assert multiprocess.sweep_socket_dirs(str(tmp_path)) == [str(made["left"])]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(str(made[n].name) for n in made if n != "left")
    finally:
        sockets[1].close()
        os.close(held)
    made_now, lock = multiprocess._socket_dir()  # a server's: named for the process that made it, and locked
    try:
        assert os.path.basename(made_now).startswith(f"jaxps_{os.getpid()}_")
        assert os.listdir(made_now) == [multiprocess.LOCK]
        probe = os.open(os.path.join(made_now, multiprocess.LOCK), os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        os.close(lock)
        shutil.rmtree(made_now)


def test_large_numpy_push_with_nan_is_staged_then_rejected(server):
    # several 1 MB chunks: the push is checked chunk by chunk as it is copied into shared memory
    params = {"big": np.zeros(1 << 19, np.float32), "small": np.zeros(3, np.float32)}
    ps = server(params, shards=2)
    ones = {k: np.ones_like(v) for k, v in params.items()}
    ps.push(ones).result(30)
    bad = {**ones, "big": ones["big"].copy()}
    bad["big"][-1] = np.nan
    with pytest.raises(jaxps.PushError, match=r"NaN or Inf in \[\"\['big'\] \(float32\[524288\]\)\"\]"):
        ps.push(bad)
    assert ps.step == 1 and float(ps.params()["big"][-1]) == -1.0  # nothing was sent
    ps.push(ones).result(30)  # the push buffer it was staged in is reused
    np.testing.assert_array_equal(ps.params()["big"], np.full(1 << 19, -2.0, np.float32))


def test_large_arrays_in_messages_travel_beside_the_pickle_bit_for_bit():
    """`wire.send`/`wire.recv` (every message after the handshake): large buffers go out of band, straight
    from their memory; what arrives equals what was sent, bit for bit, writable, small ones in band."""
    import ml_dtypes
    from multiprocessing.connection import Pipe

    from jaxps.service import Mirror
    from jaxps.transports import wire

    rng = np.random.default_rng(0)
    big = rng.normal(size=(300, 200)).astype(np.float32)
    big[0, :3] = [np.nan, np.inf, -0.0]
    arrays = [big, np.asfortranarray(big), big[:, ::2], big.astype(ml_dtypes.bfloat16), np.arange(5), jax.numpy.ones((256, 128))]
    message = Mirror(steps=((arrays, 3),), clock=("c", 7), answered=((("id", 1), "applied"),), state={"w": big[::-1]})
    ours, theirs = Pipe()
    sent = []
    writer = threading.Thread(target=lambda: sent.append(wire.send(ours, message)))  # larger than a socket buffer
    writer.start()
    got = wire.recv(theirs)
    writer.join()
    assert sent == [None] and isinstance(got, Mirror) and got.clock == message.clock and got.answered == message.answered
    for want, have in zip([*arrays, message.state["w"]], [*got.steps[0][0], got.state["w"]], strict=True):
        assert have.dtype == want.dtype and have.shape == want.shape and np.asarray(have).tobytes() == np.asarray(want).tobytes()
        assert isinstance(have, type(want) if isinstance(want, np.ndarray) else jax.Array)
        assert not isinstance(have, np.ndarray) or have.flags.writeable
    # every large numpy array crossed out of band, bfloat16 and strided ones too (numpy pickles those in band);
    # jax arrays are pickled as jax pickles them; a message of small arrays is one ordinary frame
    writer = threading.Thread(target=wire.send, args=(ours, message))
    writer.start()
    head = theirs.recv()
    wire.recv_arrays(theirs, [np.empty(n, np.uint8) for n in head.sizes])
    writer.join()
    assert isinstance(head, wire.OutOfBand) and len(head.head) < 2 * jax.numpy.ones((256, 128)).nbytes
    assert head.sizes == (big.nbytes, big.nbytes, big.nbytes // 2, big.nbytes // 2, big.nbytes)
    wire.send(ours, {"small": np.arange(10)})
    assert not isinstance(pickle.loads(theirs.recv_bytes()), wire.OutOfBand)
    ours.close(), theirs.close()


def test_a_message_written_in_part_is_cut_and_read_as_the_end_of_the_stream():
    """A shard whose answer fails part way (`wire.cut`): its client reads the end of the connection, not the
    next message's bytes as the rest of the half-written one."""
    import socket
    from multiprocessing.connection import Connection

    from jaxps.transports import wire

    a, b = socket.socketpair()
    ours, theirs = Connection(a.detach()), Connection(b.detach())
    with socket.socket(fileno=os.dup(ours.fileno())) as sock:  # the peer reads nothing: the write stops part way
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 200_000))
    with socket.socket(fileno=os.dup(theirs.fileno())) as sock:  # uncut, the reader would wait: an OSError here
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    with pytest.raises(OSError):
        wire.send(ours, {"big": np.ones(1 << 22, np.float32)})
    wire.cut(ours)
    with pytest.raises(EOFError):  # the frame's header, then fewer bytes than it names
        wire.recv(theirs)
    ours.close(), theirs.close()


def _identity(client, arg):
    return arg


def _an_event(client, arg):
    import threading

    return threading.Event() if arg == 1 else arg
