"""Shared fixtures: every semantic test runs over every transport in TRANSPORTS."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

import jaxps

# The conformance suite: tests taking the `transport` fixture run once per entry.
# "ray" reaches its shards through shared memory here (one machine); "ray-tcp" is the
# Ray transport with data_path="tcp", as clients on other nodes reach them by default,
# and "ray-objectstore" with data_path="object_store", the fallback through Ray's object
# store (both with `-m slow`: they share everything but the data path with "ray";
# "ray-tcp" runs the modules where arrays cross, TCP_MODULES).
TRANSPORTS = ["inprocess", "multiprocessing", "ray", "ray-tcp", "ray-objectstore"]
DATA_PATHS = {"ray-tcp": "tcp", "ray-objectstore": "object_store"}
TCP_MODULES = ("test_semantics.py", "test_hardening.py", "test_filters.py", "test_rows.py", "test_backup_workers.py")


@pytest.fixture(params=[pytest.param(t, marks=pytest.mark.slow) if t in DATA_PATHS else t for t in TRANSPORTS])
def transport(request):
    """A transport name; transport-specific set-up (e.g. a shared Ray session) hangs off here."""
    if request.param.startswith("ray"):
        request.getfixturevalue("ray_session")
    return request.param


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole session (a start costs seconds), shut down at the end."""
    ray = pytest.importorskip("ray")
    # Ray workers get the driver's script dir and cwd on sys.path, not tests/: add it for test modules.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.abspath(__file__)), old) if p)
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


@pytest.fixture
def make_server(transport):
    """`make_server(params, tx, **kw)` -> a ParameterServer on `transport`, closed after the test; `.restore` likewise."""
    servers = []

    where = {"transport": transport}
    if transport in DATA_PATHS:
        where = {"transport": "ray", "transport_options": {"data_path": DATA_PATHS[transport]}}

    def make(params, tx, **kw):
        ps = jaxps.ParameterServer(params, tx, **where, **kw)
        servers.append(ps)
        return ps

    def restore(directory, params, tx, **kw):
        ps = jaxps.ParameterServer.restore(directory, params, tx, **where, **kw)
        servers.append(ps)
        return ps

    make.restore = restore  # `make_server.restore(directory, params, tx, **kw)`: ParameterServer.restore there

    yield make
    for ps in servers:
        ps.close()


# Long variants run with `-m slow` only (CI runs both sets): the README's test command keeps one
# variant of each behaviour per transport and stays near ten minutes on two cores.
SLOW_VARIANTS = (
    "test_ray_transport.py::test_ray_started_by_transports_is_shut_down_with_the_last_of_them",
    "test_flax.py::test_run_workers_sync_equals_the_mean_of_workers_with_metrics_and_rngs_across_calls[multiprocessing]",
    "test_flax.py::test_run_workers_sync_equals_the_mean_of_workers_with_metrics_and_rngs_across_calls[ray]",
    "test_flax.py::test_nnx_optimizer_equals_nnx_optimizer_step_by_step[multiprocessing]",
    "test_flax.py::test_nnx_optimizer_equals_nnx_optimizer_step_by_step[ray]",
    "test_semantics.py::test_bad_push_changes_nothing[ray-",  # all but ray-nan (below)
    "test_semantics.py::test_bad_push_changes_nothing[multiprocessing-",  # all but multiprocessing-nan
    "test_semantics.py::test_sharded_equals_unsharded[ray-",  # the inprocess and multiprocessing ones stay
    "test_failover.py::test_a_push_in_flight_when_a_shard_dies_is_rolled_back[ray]",
    "test_failover.py::test_a_shard_that_keeps_dying_ends_the_run_saying_so[ray]",
    "test_failover.py::test_async_after_a_rollback",
    "test_backup_workers.py::test_racing_workers_of_run_workers_make_the_same_step_on_every_shard[ray]",
    "test_filters.py::test_top_k_with_error_feedback_conserves_the_gradient_and_unchanged_pulls_move_nothing[ray]",
    "test_filters.py::test_a_ragged_chain_crosses_only_significant_entries_as_16_bit[ray]",
    "test_example.py::test_example_runs_end_to_end[ray]",  # the inprocess and multiprocessing runs stay
    "test_semantics.py::test_sync_run_workers_twice_with_pushes_not_waited_on[multiprocessing]",
    "test_semantics.py::test_finished_workers_do_not_block_sync[multiprocessing]",
    "test_semantics.py::test_finished_workers_do_not_block_sync[ray]",
    "test_semantics.py::test_a_worker_that_left_takes_part_again_from_the_current_step[multiprocessing]",
    # row leaves: every behaviour in-process, pulled rows and sgd pushes on every transport by default
    "test_rows.py::test_adam_row_pushes_are_lazy[ray]",
    "test_rows.py::test_adam_row_pushes_are_lazy[multiprocessing]",
    "test_rows.py::test_bad_rows_change_nothing_and_the_server_keeps_serving[ray]",
    "test_rows.py::test_bad_rows_change_nothing_and_the_server_keeps_serving[multiprocessing]",
    "test_rows.py::test_row_leaves_checkpoint_and_restore_into_another_shard_count[ray]",
    "test_rows.py::test_row_leaves_checkpoint_and_restore_into_another_shard_count[multiprocessing]",
    "test_rows.py::test_sync_averages_row_pushes_over_the_workers[ray]",
    "test_movielens.py::test_example_learns_and_pushes_only_the_batch_rows[multiprocessing]",
    # Ray starts an actor (and JAX in it) per shard, seconds a server: the in-process and multiprocessing
    # variants of these stay in the default set, the Ray ones run with the slow set
    "test_failover.py::test_killed_shards_are_restarted_and_the_run_ends_as_if_none_had_died[ray]",
    "test_failover.py::test_a_shard_of_a_resharded_server_that_dies_is_restarted[ray]",
    # the standby's chaos run (60 steps, two kills): the quicker take-over tests stay in the default set
    "test_standby.py::test_killed_shards_are_taken_over_with_no_step_lost_bit_for_bit[multiprocessing]",
    "test_reshard.py::test_sync_training_resharded_twice_mid_run_ends_bit_identical_to_one_optax_run[ray]",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[ray-leaf0",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[ray-text",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[ray-leaf3",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[multiprocessing-leaf0",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[multiprocessing-text",
    "test_hardening.py::test_non_numeric_leaves_are_push_errors_naming_the_path[multiprocessing-leaf3",
    "test_hardening.py::test_a_push_that_cannot_be_converted_changes_no_shard[ray]",
    "test_hardening.py::test_integer_and_bool_gradients_are_cast_to_the_parameters_dtype[ray]",
    "test_hardening.py::test_a_worker_push_error_reaches_the_caller_as_itself[ray]",
    "test_hardening.py::test_a_client_of_a_closed_server_fails_at_once[ray]",
    "test_flax.py::test_values_sync_are_the_mean_of_the_workers_values[ray]",
    "test_flax.py::test_train_state_workers_sync_batch_stats_are_the_mean[ray]",
    "test_filters.py::test_precision_is_optax_on_cast_gradients_and_halves_the_bytes[ray]",
    # resharding and racing backup workers on Ray: the in-process and multiprocessing runs stay
    "test_backup_workers.py::test_racing_threads_make_the_same_step_on_every_shard[ray]",
    "test_reshard.py::test_async_pushes_across_a_reshard_are_each_applied_once[ray-",
    "test_reshard.py::test_async_pushes_across_a_reshard_are_each_applied_once[multiprocessing-ssp]",
    "test_reshard.py::test_a_reshard_moves_the_optimizer_state_and_counts[ray]",
)
KEPT_VARIANTS = ("test_bad_push_changes_nothing[ray-nan]", "test_bad_push_changes_nothing[multiprocessing-nan]")


def pytest_collection_modifyitems(config, items):
    elsewhere = [i for i in items if "[ray-tcp" in i.nodeid and not i.nodeid.split("::")[0].endswith(TCP_MODULES)]
    if elsewhere:  # checkpoints and the Flax layer sit above the data path: "ray" and "ray-objectstore" cover them
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [i for i in items if i not in elsewhere]
    for item in items:
        if any(v in item.nodeid for v in SLOW_VARIANTS) and not any(item.nodeid.endswith(k) for k in KEPT_VARIANTS):
            item.add_marker(pytest.mark.slow)
