"""The TPU-VM placement of examples/tpu_vm.py, on a real local Ray. No real TPU is used.

The Ray node of this module advertises a fake `TPU` resource (4 "chips") and a `ps`
resource for the shards: Ray schedules by them and hands out TPU chip ids as it does on
a TPU VM, but every process runs JAX on the CPU. Checked, with the example's own
functions: shard actors run with `JAX_PLATFORMS=cpu` (read from their processes'
environment) and hold the `ps` resource; worker tasks hold the `TPU` resource, distinct
chips each, and are not forced to the CPU; training through the server lowers the loss;
more TPU than the cluster has is refused at once, by the example and by jaxps's
`run_workers`; and the example script runs end to end with `--fake-tpu`.
"""

import importlib.util
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import optax
import pytest
from helpers import wait_for

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # its own Ray session (with a fake TPU) replaces the suite's for a minute

TESTS = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(TESTS), "examples")
sys.path.insert(0, EXAMPLES)
import tpu_vm  # noqa: E402  (examples/tpu_vm.py)

import jaxps  # noqa: E402

FAKE = {"TPU": 4, "ps": 8}  # one node: 4 fake TPU chips, and room for 8 shards pinned by `ps`
STEPS = 30


def _custom(resources: dict) -> dict:
    return {
        k: v for k, v in resources.items()
        if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))
    }  # fmt: skip


def _ray_used_later(request) -> bool:
    """Whether a test after this module may use the suite's shared Ray session (tests/conftest.py)."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    later = items[max(mine) + 1 :] if mine else []
    return any("ray_session" in item.fixturenames or "ray" in item.nodeid for item in later)


@pytest.fixture(scope="module")
def fake_tpu_ray(request):
    """A local Ray of one node with 2 CPUs and the FAKE resources; shut down after this module.

    Started without JAX_PLATFORMS in its environment (a TPU host's `ray start` has none),
    so a process has JAX_PLATFORMS=cpu only if its runtime env sets it.

    The suite shares one Ray session (`ray_session`) without these resources, and a
    running node's resources cannot change: a session left by an earlier module is
    shut down first, and one alike (CPUs, custom resources, tests/ on workers'
    PYTHONPATH) is started again afterwards if a later test may use it.
    """
    previous = None
    if ray.is_initialized():
        have = ray.cluster_resources()
        previous = {"num_cpus": int(have.get("CPU", 1)), "resources": _custom(have)}
        ray.shutdown()
    saved = os.environ.pop("JAX_PLATFORMS", None)
    try:
        ray.init(address="local", num_cpus=2, resources=FAKE, include_dashboard=False, logging_level="error")
    finally:
        if saved is not None:
            os.environ["JAX_PLATFORMS"] = saved
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is not None and _ray_used_later(request):
            old = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, old) if p)
            try:
                ray.init(address="local", include_dashboard=False, logging_level="warning", **previous)
            finally:
                if old is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = old


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}



@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The example script with `--fake-tpu`, started in a process of its own before the in-process run
    (`run`), so that the two go on side by side: a Ray start and JAX imports cost seconds each here."""
    cwd = tmp_path_factory.mktemp("tpu_script")
    directory = cwd / "ckpt"
    argv = [sys.executable, os.path.join(EXAMPLES, "tpu_vm.py"), "--fake-tpu", "--steps", "20", "--shards", "1",
            "--log-every", "10", "--checkpoint-dir", str(directory)]  # fmt: skip
    with open(cwd / "stdout", "w") as out, open(cwd / "stderr", "w") as err, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # JAX's warning: the child execs at once
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd)
    try:
        yield process, directory, cwd
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def run(script, fake_tpu_ray):
    """One training run of the example's server and workers (2 shards pinned by `ps`, 2 workers of 2 TPU),
    and what was seen during it (the script's run checks checkpoints)."""
    ps = tpu_vm.make_server(shards=2, workers=2, tpu_per_worker=2, shard_resources={"ps": 1})
    with ps:
        shards = [s["where"] for s in ps.stats()["shards"]]
        seen = {
            "shards": shards,
            "shard_env": [_environ(w["pid"]) for w in shards],
            "ps_available": ray.available_resources().get("ps", 0),
            "initial": tpu_vm.evaluate(ps.params()),
        }
        seen["reports"] = tpu_vm.train(ps, 2, STEPS, batch=64, log_every=0)
        seen["final"] = tpu_vm.evaluate(ps.params())
        seen["step"] = ps.step
    return seen


# -- placement ---------------------------------------------------------------------------
def test_transport_options_put_shards_on_the_cpu_and_workers_on_tpu_chips():
    options = tpu_vm.tpu_transport_options(4, {"ps": 1}, cpus_per_worker=2)
    assert options == {
        "actor_options": {"runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}},
        "resources": {"ps": 1},
        "worker_options": {"resources": {"TPU": 4}, "num_cpus": 2, "max_retries": 0},
    }
    assert tpu_vm.tpu_transport_options(8)["resources"] == {}
    with pytest.raises(ValueError, match="tpu_per_worker"):
        tpu_vm.tpu_transport_options(0)


def test_shard_actors_run_jax_on_the_cpu_pinned_by_their_resource(run, fake_tpu_ray):
    node = ray.get_runtime_context().get_node_id()
    assert len(run["shards"]) == 2
    for where, env in zip(run["shards"], run["shard_env"]):
        assert env.get("JAX_PLATFORMS") == "cpu", where  # from the actor's runtime env: the node's Ray has none
        assert where["platform"] == "cpu"
        assert where["node_id"] == node and where["actor_id"]
    assert run["ps_available"] == FAKE["ps"] - 2  # each shard actor held one `ps` while the server ran
    assert wait_for(lambda: ray.available_resources().get("ps", 0) == FAKE["ps"])  # and gave it back on close


def test_each_worker_task_holds_tpu_chips_of_its_own(run):
    reports = run["reports"]
    assert [r["worker"] for r in reports] == [0, 1]
    for r in reports:
        assert r["assigned_resources"].get("TPU") == 2, r
        assert r["assigned_resources"].get("CPU") == 1, r
        assert len(r["tpu_ids"]) == 2, r
        assert r["jax_platforms_env"] is None, r  # not forced to the CPU: on a TPU VM, JAX finds the TPU
        assert r["platform"] == "cpu"  # the TPU is fake
        assert r["pid"] != os.getpid()
    chips = [set(r["tpu_ids"]) for r in reports]
    assert chips[0].isdisjoint(chips[1]) and chips[0] | chips[1] == {"0", "1", "2", "3"}
    assert {r["pid"] for r in reports} & {w["pid"] for w in run["shards"]} == set()


def test_training_through_the_server_lowers_the_loss(run):
    assert run["step"] == STEPS  # sync: one step per round of both workers' gradients
    assert run["final"] < 0.75 * run["initial"], (run["initial"], run["final"])
    for r in run["reports"]:
        assert len(r["losses"]) == STEPS and all(np.isfinite(r["losses"]))
        assert np.mean(r["losses"][-5:]) < np.mean(r["losses"][:5]), r["losses"]


# -- more TPU than there is ----------------------------------------------------------------
def test_the_example_refuses_more_tpu_than_the_cluster_has_at_once(fake_tpu_ray):
    assert tpu_vm.worker_slots(2) == 2 and tpu_vm.worker_slots(4) == 1 and tpu_vm.worker_slots(1) == 2  # 2 CPUs
    tpu_vm.check_tpu_capacity(2, 2)
    with pytest.raises(ValueError, match=r"1 workers of 8 TPU .* hold 0"):
        tpu_vm.check_tpu_capacity(1, 8)
    with pytest.raises(ValueError, match=r"3 workers of 2 TPU .* hold 2"):
        tpu_vm.check_tpu_capacity(3, 2)
    with pytest.raises(ValueError, match=r"a worker holds a positive number of TPU chips"):
        tpu_vm.check_tpu_capacity(1, 0)


@pytest.mark.parametrize("flag, value", [("--tpu-per-worker", "0"), ("--workers", "0"), ("--cpus-per-worker", "-1")])
def test_the_example_refuses_zero_or_negative_sizes_instead_of_a_default(flag, value, capsys):
    with pytest.raises(SystemExit):
        tpu_vm.parse_args(["--fake-tpu", flag, value])
    assert flag in capsys.readouterr().err


def test_a_worker_asking_more_tpu_than_any_node_has_is_refused_at_once(fake_tpu_ray, tmp_path):
    """Ray would leave such a worker task pending forever (and a sync step with it): jaxps refuses it."""
    started = tmp_path / "started"

    def work(client, path):
        open(path, "w").close()
        return client.worker

    options = tpu_vm.tpu_transport_options(8)
    with jaxps.ParameterServer(tpu_vm.init_params(), optax.sgd(0.1), transport="ray", transport_options=options) as ps:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"each worker task asks for .*'TPU': 8"):
            ps.run_workers(work, [str(started)])
        assert time.monotonic() - t0 < 10.0 and not started.exists()
        assert ray.available_resources().get("TPU") == FAKE["TPU"]


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_urls_other_than_gs_are_refused_with_advice():
    tpu_vm.check_checkpoint_dir("/mnt/disks/ckpt/run")
    if importlib.util.find_spec("gcsfs") is not None:  # installed with the test extras
        tpu_vm.check_checkpoint_dir("gs://bucket/run")
    with pytest.raises(ValueError, match="of URLs only gs:// is supported"):
        tpu_vm.check_checkpoint_dir("s3://bucket/run")
    with pytest.raises(SystemExit):
        tpu_vm.parse_args(["--fake-tpu", "--checkpoint-dir", "s3://bucket/run"])


# -- the script ------------------------------------------------------------------------------
def test_the_script_runs_end_to_end_with_a_fake_tpu(script):
    process, directory, cwd = script
    try:
        process.wait(timeout=180)
        why = f"exit status {process.returncode}"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        why = "killed after 180 s"
    stdout, stderr = (cwd / "stdout").read_text(), (cwd / "stderr").read_text()
    assert process.returncode == 0, f"{why}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "a fake TPU resource: no TPU is used" in stdout
    assert re.search(r"worker 0: .*TPU chips \['\d', '\d'\]", stdout), stdout
    assert re.search(r"worker 1: .*TPU chips \['\d', '\d'\]", stdout), stdout
    final = re.search(r"final loss ([\d.]+) at step 20 \(initial ([\d.]+)\)", stdout)
    assert final, stdout
    assert float(final[1]) < float(final[2])
    assert f"saved step 20 in {directory}" in stdout
    assert jaxps.checkpoint.steps(directory) == [20]
