"""Behaviour specific to the multiprocessing transport, with real spawned processes."""

import multiprocessing
import operator
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import optax
import pytest

import jaxps
from transports.multiprocess import MultiprocessingTransport

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


def _assert_clean(pids, prefix, within=10.0):
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "shard processes left running"
    assert not _segments(prefix), "shared-memory segments left behind"


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
        _assert_clean(ps._transport.pids, ps._transport.shm_prefix)


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


def test_killed_shard_raises_shard_died_error(server):
    ps = server(shards=2)
    client = ps.client(0)
    client.pull()
    pid = ps._transport.pids[1]
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
    _assert_clean(transport.pids, transport.shm_prefix)


_SCRIPT = """
import os, sys, time
import numpy as np, optax, jaxps
if __name__ == "__main__":
    ps = jaxps.ParameterServer({"w": np.zeros(1000, np.float32)}, optax.sgd(0.1), shards=1,
                               transport="multiprocessing")
    ps.push({"w": np.ones(1000, np.float32)}).result(60)
    ps.pull()
    print(ps._transport.shm_prefix, *ps._transport.pids, flush=True)
    %s
"""


@pytest.mark.parametrize(
    "ending",
    [
        "pass",  # exits without close(): atexit cleans up
        "time.sleep(120)",  # SIGKILLed: the shard notices its parent is gone
        "while True: ps.push({'w': np.ones(1000, np.float32)}); ps.pull()",  # Ctrl-C
    ],
    ids=["exit-without-close", "parent-killed", "ctrl-c"],
)
def test_no_leftovers_when_the_parent_goes(tmp_path, ending):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT % ending))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        prefix, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert pids, proc.communicate(timeout=60)
        if ending.startswith("time"):
            proc.kill()
        elif ending.startswith("while"):
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_clean(pids, prefix)
    assert "leaked" not in err and "resource_tracker" not in err, err
    if ending == "pass":
        assert proc.returncode == 0, err
