"""Gradients on other devices than the shards' (as workers on other GPUs of one machine), in-process.

Run by `tests/test_core.py` in a fresh interpreter with two CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`, set before JAX is
imported); prints "ok" once every check holds.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402


def main() -> None:
    d0, d1 = jax.devices()
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    # async and ssp check NaN/Inf on the device: a tree with leaves on both devices, then one with a NaN on device 1
    for mode, kw in (("async", {}), ("ssp", {"workers": 1, "max_staleness": 1})):
        with jaxps.ParameterServer(params, optax.adam(0.1), shards=2, mode=mode, **kw) as ps:
            assert ps.push({"a": jax.device_put(jnp.ones(3), d0), "b": jax.device_put(jnp.ones(2), d1)}).result(60) == "applied"
            before = ps.params()
            bad = {"a": jax.device_put(jnp.ones(3), d0), "b": jax.device_put(jnp.array([1.0, jnp.nan]), d1)}
            try:
                ps.push(bad).result(60)
                raise AssertionError("a NaN on device 1 was not refused")
            except jaxps.PushError as e:
                assert "['b'] (float32[2])" in str(e) and "['a']" not in str(e), e
            after = ps.params()
            assert all(np.array_equal(before[k], after[k]) for k in params), (before, after)
            assert ps.step == 1 and ps.stats()["pushes_refused"] == 1
    # sync: each worker's gradients on its own device; the step is the mean, as plain optax makes it
    with jaxps.ParameterServer(params, optax.sgd(1.0), shards=2, mode="sync", workers=2) as ps:
        grads = [{k: jax.device_put(jnp.full_like(v, w + 1.0), d) for k, v in params.items()} for w, d in enumerate((d0, d1))]
        clients = [ps.client(w) for w in range(2)]
        futures = [c.push(g) for c, g in zip(clients, grads)]
        assert [f.result(60) for f in futures] == ["applied"] * 2
        assert all(np.array_equal(ps.params()[k], np.full_like(params[k], -1.5)) for k in params), ps.params()
    # a shard placed on device 1 takes pushes from device 0
    with jaxps.ParameterServer(params, optax.sgd(1.0), transport_options={"device": d1}) as ps:
        assert ps.push({k: jax.device_put(jnp.ones_like(v), d0) for k, v in params.items()}).result(60) == "applied"
        assert all(x.devices() == {d1} for x in jax.tree.leaves(ps.params()))
    print("ok")


if __name__ == "__main__":
    main()
