"""The MNIST example (examples/mnist.py) and its data loader (examples/datasets.py).

The end-to-end tests train on real Fashion-MNIST files from Debian's
`dataset-fashion-mnist` package (the CI script installs it) and are skipped,
saying so, where it is missing.
"""

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import import_example

import jaxps
import jaxps.checkpoint

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


datasets = import_example("datasets")
mnist = import_example("mnist")

needs_fashion_mnist = pytest.mark.skipif(
    datasets.find_idx_files(FASHION_DIR) is None,
    reason=f"Fashion-MNIST IDX files not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


def _transport_params():
    for name, module in [("inprocess", "jaxps.transports.inprocess"), ("multiprocessing", "jaxps.transports.multiprocess"), ("ray", "jaxps.transports.ray_transport")]:
        missing = importlib.util.find_spec(module) is None or (name == "ray" and importlib.util.find_spec("ray") is None)
        yield pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{module} (or its dependency) is not there yet"))


# -- the IDX reader ---------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 255], np.uint8)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    for name, array in [("images", images), ("labels", labels), ("floats", floats)]:
        datasets.write_idx(tmp_path / (name + suffix), array)
        back = datasets.read_idx(tmp_path / (name + suffix))
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_idx_reader_reads_the_format_by_hand(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), sizes 2 x 2 x 3 big-endian, then the bytes
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        np.testing.assert_array_equal(datasets.read_idx(tmp_path / name), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="5,"):
        datasets.read_idx(tmp_path / "short")


def _write_tiny_dataset(directory, n_train=6, n_test=4, gz=True, dotted=False):
    rng = np.random.default_rng(0)
    for (split, kind), name in datasets.IDX_FILES.items():
        n = n_train if split == "train" else n_test
        array = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if kind == "images" else rng.integers(0, 10, n, dtype=np.uint8)
        name = name.replace("-idx", ".idx") if dotted else name
        datasets.write_idx(Path(directory) / (name + (".gz" if gz else "")), array)


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_load_from_data_dir(tmp_path, gz, dotted):
    _write_tiny_dataset(tmp_path, gz=gz, dotted=dotted)
    ds = datasets.load("mnist", data_dir=tmp_path)
    assert ds.train_images.shape == (6, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (4,) and ds.test_labels.dtype == np.int32
    assert str(tmp_path) in ds.source and len(ds.files) == 4
    limited = datasets.load("mnist", data_dir=tmp_path, train_limit=2, test_limit=3)
    assert len(limited.train_labels) == 2 and len(limited.test_labels) == 3


def test_missing_data_fails_fast_with_advice(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load("mnist", data_dir=tmp_path)
    with pytest.raises(datasets.DataNotFoundError, match="not a directory"):
        datasets.load("mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte"):
        mnist.main(["--dataset", "mnist", "--data-dir", str(tmp_path)])


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion_mnist"):
        datasets.load("cifar10")


# -- the example, end to end ---------------------------------------------------------
@needs_fashion_mnist
@pytest.mark.parametrize("transport", list(_transport_params()))
def test_example_runs_end_to_end(transport, tmp_path, request, capsys):
    if transport == "ray":
        ray = request.getfixturevalue("ray_session")  # one shared local Ray (tests/conftest.py)
        ray.cloudpickle.register_pickle_by_value(mnist)  # Ray pickles with its own copy of cloudpickle
    log, png = tmp_path / "run.jsonl", tmp_path / "run.png"
    argv = ["--transport", transport, "--mode", "async", "--steps", "8", "--batch-size", "16",
            "--train-limit", "512", "--test-limit", "200", "--eval-every", "4",
            "--log", str(log), "--plot", str(png)]  # fmt: skip
    (result,) = mnist.main(argv)
    assert result["steps"] == 16 and result["gradients"] == 16
    assert 0.0 <= result["test_accuracy"] <= 1.0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["event"] == "final" and records[-1]["transport"] == transport
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[-1]["step"] == 16
    for r in evals:
        assert {"step", "time", "loss", "accuracy", "mode", "transport", "workers", "shards"} <= set(r)
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "fashion_mnist" in out and str(FASHION_DIR) in out


@needs_fashion_mnist
def test_short_sync_run_learns(tmp_path):
    argv = ["--mode", "sync", "--steps", "150", "--batch-size", "32", "--train-limit", "6000",
            "--test-limit", "1000", "--eval-every", "0", "--lr", "2e-3"]  # fmt: skip
    (result,) = mnist.main(argv)
    assert result["steps"] == 150
    assert result["test_accuracy"] > 0.65, result  # chance is 10%


@needs_fashion_mnist
def test_compare_plots_sync_and_async(tmp_path):
    png = tmp_path / "compare.png"
    argv = ["--compare", "--steps", "6", "--batch-size", "16", "--train-limit", "256",
            "--test-limit", "100", "--eval-every", "3", "--plot", str(png)]  # fmt: skip
    results = mnist.main(argv)
    assert [r["mode"] for r in results] == ["sync", "async"]
    assert [r["steps"] for r in results] == [6, 12]
    assert png.stat().st_size > 1000


@needs_fashion_mnist
def test_checkpoint_dir_saves_and_a_second_run_resumes(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = ["--mode", "sync", "--batch-size", "16", "--train-limit", "512", "--test-limit", "100",
            "--eval-every", "3", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]  # fmt: skip
    (first,) = mnist.main(argv + ["--steps", "6"])
    assert first["steps"] == 6 and jaxps.checkpoint.steps(ckpt)[-1] == 6
    (second,) = mnist.main(argv + ["--steps", "12"])  # the same directory: goes on from step 6
    out = capsys.readouterr().out
    assert f"resuming from the checkpoint of step 6 in {ckpt}" in out
    assert second["steps"] == 12 and jaxps.checkpoint.steps(ckpt)[-1] == 12
    steps = [h["step"] for h in second["history"]]
    assert steps[-1] == 12 and all(s > 6 for s in steps), steps  # the curve goes on from step 6
    assert len(jaxps.checkpoint.steps(ckpt)) <= 3  # keep=3


@needs_fashion_mnist
def test_push_filter_sends_fewer_bytes_per_push(capsys):
    argv = ["--mode", "sync", "--steps", "4", "--batch-size", "16", "--train-limit", "256",
            "--test-limit", "100", "--eval-every", "0"]  # fmt: skip
    (plain,) = mnist.main(argv)
    (filtered,) = mnist.main(argv + ["--push-filter", "topk:0.01+bf16"])
    assert plain["gradients"] == filtered["gradients"] == 8
    assert filtered["bytes_pushed"] * 50 < plain["bytes_pushed"]  # 1% of the entries, 6 bytes each instead of 4
    assert "with push filter topk:0.01+bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mnist.main(argv + ["--push-filter", "topk:2"])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--test-limit", "0"], "--test-limit must be positive"),
        (["--train-limit", "-100"], "--train-limit must be positive"),
        (["--eval-every", "-1"], "--eval-every and --max-staleness cannot be negative"),
        (["--mode", "ssp", "--max-staleness", "-1"], "--eval-every and --max-staleness cannot be negative"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--transport", "multiprocessing", "--kill-shard-at", "-5"], "--kill-shard-at must be positive"),
    ],
)
def test_bad_option_values_are_refused_before_anything_runs(argv, says, capsys):
    with pytest.raises(SystemExit):
        mnist.parse_args(argv)
    assert says in capsys.readouterr().err
