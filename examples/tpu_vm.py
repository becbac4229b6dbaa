"""jaxps on a Ray cluster of TPU VMs: shards as CPU actors, one worker task per TPU host.

The parameter server's shards are Ray actors that run JAX on the CPU
(`JAX_PLATFORMS=cpu` in their runtime env), optionally pinned to a CPU node by a
custom resource; the workers are Ray tasks that ask for the `TPU` resource, one
task per TPU host holding all of that host's chips (one libtpu process per
host), each computing `jax.grad` of a small MLP on its default device (the
host's TPU) on synthetic data. Sync mode: a step is the mean of the workers'
gradients.

    # on the Ray head node of a cluster of TPU VMs (README, "TPU VMs"):
    python examples/tpu_vm.py --address auto --shards 4 --steps 1000 --shard-resource ps \\
        --checkpoint-dir /mnt/disks/ckpt/run
    # anywhere, without a TPU: a local Ray whose node advertises a fake `TPU` resource
    python examples/tpu_vm.py --fake-tpu --steps 100

With `--fake-tpu` no TPU is used: the `TPU` resource is only a number that Ray
schedules by, and the workers run JAX on the CPU. The placement (who asks for
what, who gets which chips) is the same as on a cluster.

Never call `jax.distributed.initialize` across the parameter server's processes
(driver, shard actors, worker tasks): they are independent JAX programs that
exchange arrays only through the server, and a collective spanning them would
wait for processes that never join it.

`--checkpoint-dir DIR`: the server saves into DIR every `--checkpoint-every`
steps and at the end, and a later run with the same DIR resumes from its latest
checkpoint. The driver and each shard actor write into DIR themselves: it is
a `gs://bucket/path` URL (every node needs `pip install "jaxps[gcs]"` and the
VMs' own credentials), or one filesystem path that the driver and every
shard's node see (pin the shards to the driver's node with `--shard-resource`,
or use a shared mount); other URLs are refused (see `check_checkpoint_dir`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

# The driver never touches a TPU: on a TPU host it would take the chips its worker task needs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import ray  # noqa: E402

import jaxps  # noqa: E402

FEATURES, HIDDEN = 16, 64


# -- placement -------------------------------------------------------------------------
def tpu_transport_options(
    tpu_per_worker: float, shard_resources: dict | None = None, *, cpus_per_worker: float = 1.0
) -> dict:
    """The Ray `transport_options` of a server whose shards are CPU actors and whose workers hold TPU chips.

    Shard actors: JAX on the CPU (`JAX_PLATFORMS=cpu` in their runtime env):
    a shard actor placed on a TPU host would otherwise open that host's TPU
    (libtpu takes the chips for the whole process) and the host's worker could
    not. `shard_resources` (e.g. `{"ps": 1}`) pins them to nodes advertising
    those custom resources.

    Worker tasks (`ps.run_workers`): each asks for `tpu_per_worker` of Ray's
    `TPU` resource: with all of a host's chips, one worker task per TPU host,
    so one libtpu process per host. (Ray keeps a task's process for later
    tasks, and that process keeps the TPU open; `max_calls=1`, which would end
    it with its task, cannot be given in `worker_options`: Ray takes it only
    in `@ray.remote`. Not tried on a TPU: whether a second `run_workers` on a
    host lands in the same idle process, or in a new one that finds the chips
    taken.)
    """
    if not tpu_per_worker > 0:
        raise ValueError(f"tpu_per_worker must be positive, got {tpu_per_worker!r}")
    return {
        "actor_options": {"runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}},
        "resources": dict(shard_resources or {}),
        "worker_options": {
            "resources": {"TPU": tpu_per_worker}, "num_cpus": cpus_per_worker, "max_retries": 0,
        },
    }


def tpu_hosts() -> dict:
    """{node id: its `TPU` and `CPU` counts} of the alive nodes of the connected Ray that advertise `TPU`."""
    return {
        n["NodeID"]: {"TPU": n["Resources"]["TPU"], "CPU": n["Resources"].get("CPU", 0.0)}
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get("TPU", 0) > 0
    }


def worker_slots(tpu_per_worker: float, cpus_per_worker: float = 1.0) -> int:
    """How many worker tasks of `tpu_per_worker` chips (and `cpus_per_worker` CPUs) the cluster runs at once."""
    slots = 0
    for r in tpu_hosts().values():
        n = int(r["TPU"] // tpu_per_worker)
        if cpus_per_worker > 0:
            n = min(n, int(r["CPU"] // cpus_per_worker))
        slots += n
    return slots


def check_tpu_capacity(workers: int, tpu_per_worker: float, cpus_per_worker: float = 1.0) -> None:
    """Refuses at once `workers` worker tasks that the cluster cannot run all together.

    In sync mode every step waits for all workers: one left pending would
    stall the run forever. (jaxps refuses a worker asking for resources that
    no node has, but not more workers than the nodes run at once.)
    """
    if tpu_per_worker <= 0 or cpus_per_worker < 0:
        raise ValueError(f"a worker holds a positive number of TPU chips and no negative CPUs, got {tpu_per_worker} and {cpus_per_worker}")
    slots = worker_slots(tpu_per_worker, cpus_per_worker)
    if slots == 0 or workers > slots:
        hosts = {node[:8]: r for node, r in tpu_hosts().items()}
        raise ValueError(
            f"{workers} workers of {tpu_per_worker} TPU and {cpus_per_worker} CPU each do not fit at once: "
            f"the cluster's TPU hosts {hosts or '(none)'} hold {slots}"
        )


def check_checkpoint_dir(directory: str | None) -> None:
    """Refuses a directory jaxps cannot write checkpoints into (a URL other than gs://, or gs:// without gcsfs), with advice."""
    if not directory:
        return
    try:
        jaxps.checkpoint.location(directory)
    except ImportError as e:
        raise ValueError(f"--checkpoint-dir {directory}: {e} (on the driver and every shard's node)") from None
    except ValueError as e:
        raise ValueError(f"--checkpoint-dir {directory}: {e}") from None


# -- the model and the data --------------------------------------------------------------
def init_params(seed: int = 0) -> dict:
    """A 16 -> 64 -> 64 -> 1 MLP (tanh), as a dict of float32 arrays."""
    rng = np.random.default_rng(seed)
    sizes = [FEATURES, HIDDEN, HIDDEN, 1]
    return {
        f"layer{i}": {
            "w": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32),
            "b": np.zeros(n, np.float32),
        }
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp(params, x):
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return (x @ layers[-1]["w"] + layers[-1]["b"])[:, 0]


def loss_fn(params, x, y):
    return jnp.mean((mlp(params, x) - y) ** 2)


_TEACHER = np.random.default_rng(12345).normal(size=(FEATURES, 4)).astype(np.float32) / np.sqrt(FEATURES)


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic regression data: y = sum(sin(2 x A)) + noise, for a fixed random A."""
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = np.sin(2.0 * x @ _TEACHER).sum(axis=1) + 0.05 * rng.normal(size=n)
    return x, y.astype(np.float32)


def evaluate(params, n: int = 1024) -> float:
    """The loss on a fixed held-out set, on the driver (CPU)."""
    x, y = make_batch(np.random.default_rng(999), n)
    return float(loss_fn(params, x, y))


# -- the server and the workers ----------------------------------------------------------
def make_server(
    *,
    shards: int,
    workers: int,
    tpu_per_worker: float,
    shard_resources: dict | None = None,
    cpus_per_worker: float = 1.0,
    mode: str = "sync",
    lr: float = 1e-2,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 50,
) -> jaxps.ParameterServer:
    """A Ray parameter server placed by `tpu_transport_options`; resumes from `checkpoint_dir` if it holds a checkpoint."""
    check_checkpoint_dir(checkpoint_dir)
    options = dict(
        shards=shards, transport="ray", mode=mode, workers=workers,
        transport_options=tpu_transport_options(tpu_per_worker, shard_resources, cpus_per_worker=cpus_per_worker),
    )  # fmt: skip
    if checkpoint_dir:
        options["checkpoint"] = jaxps.Checkpointing(checkpoint_dir, every=checkpoint_every, keep=3)
        if jaxps.checkpoint.steps(checkpoint_dir):
            return jaxps.ParameterServer.restore(checkpoint_dir, init_params(), optax.adam(lr), **options)
    return jaxps.ParameterServer(init_params(), optax.adam(lr), **options)


def train_worker(client, job: dict) -> dict:
    """One worker task: `job["steps"]` rounds of pull, `jax.grad` on this process's default device, push.

    Returns where it ran (host, node, Ray's resources and TPU chip ids, JAX's
    devices) and its batch losses.
    """
    # A JAX program of its own: no jax.distributed.initialize here (nor anywhere across the server's processes).
    devices = jax.devices()  # a TPU VM's worker: the host's TPU chips (libtpu opens them here, once)
    context = ray.get_runtime_context()
    info = {
        "worker": client.worker,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node_id": context.get_node_id(),
        "assigned_resources": context.get_assigned_resources(),
        "tpu_ids": list(context.get_accelerator_ids().get("TPU", [])),
        "platform": devices[0].platform,
        "devices": [str(d) for d in devices],
        "jax_platforms_env": os.environ.get("JAX_PLATFORMS"),
    }
    print(
        f"worker {client.worker} on {info['host']} (node {info['node_id'][:8]}, pid {info['pid']}): "
        f"jax platform {info['platform']}, devices {info['devices']}; Ray gave it {info['assigned_resources']}, "
        f"TPU chips {info['tpu_ids']}",
        flush=True,
    )
    if job.get("require_tpu") and info["platform"] != "tpu":
        raise RuntimeError(
            f"worker {client.worker} on {info['host']} runs JAX on {info['platform']!r}, not on a TPU "
            f"(JAX_PLATFORMS={info['jax_platforms_env']!r} in its environment, from the node's `ray start`)"
        )
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    rng = np.random.default_rng(job.get("seed", 0) + 1000 * client.worker)  # each worker its own data
    losses = []
    for step in range(job["steps"]):
        params = client.pull()  # onto this process's default device
        x, y = make_batch(rng, job["batch"])
        loss, grads = grad_fn(params, x, y)
        client.push(grads).result()
        losses.append(float(loss))
        if client.worker == 0 and job.get("log_every") and (step + 1) % job["log_every"] == 0:
            print(f"step {step + 1}/{job['steps']}: worker 0's batch loss {losses[-1]:.4f}", flush=True)
    return {**info, "losses": losses}


def train(
    ps: jaxps.ParameterServer, workers: int, steps: int, *, batch: int = 64, require_tpu: bool = False, log_every: int = 10
) -> list[dict]:
    """Runs `workers` worker tasks on `ps`, each computing `steps` gradients; their reports, by worker."""
    if __name__ != "__main__":  # imported (tests): Ray's workers cannot import this file, send it by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = {"steps": steps, "batch": batch, "require_tpu": require_tpu, "log_every": log_every}
    return ps.run_workers(train_worker, [dict(job, seed=ps.step)] * workers)


# -- the command line ---------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None, help="Ray address to join ('auto': the cluster running on this machine); "
                   "default: Ray's rule (a cluster running here, else a local Ray)")  # fmt: skip
    p.add_argument("--fake-tpu", action="store_true", help="start a local Ray advertising a fake TPU resource (no TPU is used)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="server steps to train up to (each: one gradient per worker)")
    p.add_argument("--workers", type=int, default=None, help="default: as many as the TPU hosts hold (one per host)")
    p.add_argument("--tpu-per-worker", type=float, default=None,
                   help="TPU chips each worker task holds; default: a host's chips (fake: 2, two pretend hosts)")  # fmt: skip
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--shard-resource", default=None, metavar="NAME",
                   help="pin each shard actor to nodes advertising the custom resource NAME (asks for 1); fake: ps")  # fmt: skip
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--mode", default="sync", choices=["sync", "async"])
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="save into DIR as training goes; resume from it")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    if args.fake_tpu and args.address is not None:
        p.error("--fake-tpu starts a local Ray: it does not take --address")
    try:
        check_checkpoint_dir(args.checkpoint_dir)
    except ValueError as e:
        p.error(str(e))
    for name in ("workers", "tpu_per_worker"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.cpus_per_worker < 0:
        p.error(f"--cpus-per-worker cannot be negative, got {args.cpus_per_worker}")
    if args.fake_tpu:
        args.tpu_per_worker = 2 if args.tpu_per_worker is None else args.tpu_per_worker
        args.shard_resource = args.shard_resource or "ps"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.fake_tpu:  # one local node with 2 CPUs, 4 fake TPU chips, and the `ps` resource for the shards
        ray.init(address="local", num_cpus=2, resources={"TPU": 4, "ps": 8}, include_dashboard=False, logging_level="warning")
    else:
        ray.init(address=args.address, logging_level="warning")
    try:
        hosts = tpu_hosts()
        if not hosts:
            raise SystemExit("no node of the Ray cluster advertises a TPU resource (try --fake-tpu)")
        tpu = args.tpu_per_worker if args.tpu_per_worker is not None else min(r["TPU"] for r in hosts.values())
        workers = args.workers if args.workers is not None else max(1, worker_slots(tpu, args.cpus_per_worker))
        check_tpu_capacity(workers, tpu, args.cpus_per_worker)
        print(f"Ray: {len(ray.nodes())} node(s), TPU hosts {[f'{n[:8]}: {r}' for n, r in hosts.items()]}"
              + (" (a fake TPU resource: no TPU is used)" if args.fake_tpu else ""))  # fmt: skip
        print(f"{workers} worker tasks of {tpu:g} TPU each, {args.shards} shard actors on CPU"
              + (f" pinned to resource {args.shard_resource!r}" if args.shard_resource else ""))  # fmt: skip
        ps = make_server(
            shards=args.shards, workers=workers, tpu_per_worker=tpu, cpus_per_worker=args.cpus_per_worker,
            shard_resources={args.shard_resource: 1} if args.shard_resource else None, mode=args.mode, lr=args.lr,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        )  # fmt: skip
        with ps:
            for s in ps.stats()["shards"]:
                w = s["where"]
                print(f"shard {s['shard']}: node {w.get('node_id', '?')[:8]}, pid {w['pid']} on {w['host']}")
            start, initial = ps.step, evaluate(ps.params())
            if start:
                print(f"resuming from the checkpoint of step {start} in {args.checkpoint_dir}")
            print(f"initial loss {initial:.4f} (held-out set, at step {start})")
            per_worker = max(0, args.steps - start) if args.mode == "sync" else max(0, args.steps - start) // workers
            reports = train(ps, workers, per_worker, batch=args.batch, require_tpu=not args.fake_tpu, log_every=args.log_every)
            for r in reports:
                print(f"worker {r['worker']}: node {r['node_id'][:8]}, jax {r['platform']} {r['devices']}, "
                      f"Ray resources {r['assigned_resources']}, TPU chips {r['tpu_ids']}")  # fmt: skip
            final = evaluate(ps.params())
            if args.checkpoint_dir:
                print(f"saved step {ps.save(args.checkpoint_dir, keep=3)} in {args.checkpoint_dir}")
            step = ps.step
        print(f"final loss {final:.4f} at step {step} (initial {initial:.4f}) in {time.monotonic() - t0:.1f} s")
        return {"initial_loss": initial, "final_loss": final, "steps": step, "workers": reports}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
