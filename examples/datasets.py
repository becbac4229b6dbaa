"""MNIST and Fashion-MNIST from real files, for the jaxps examples, tests and benchmarks.

Where the data comes from, in this order:

1. `data_dir`, if given: the four standard IDX files (gzipped or not), or a
   Keras-style `mnist.npz` / `fashion-mnist.npz`.
2. TensorFlow Datasets, if `tensorflow_datasets` is importable *and* the data set
   is already prepared in its data directory (nothing is downloaded from here,
   so an offline machine never hangs).
3. The usual local places: Debian's `dataset-fashion-mnist` package
   (`/usr/share/datasets/fashion-mnist/`), the Keras cache (`~/.keras/datasets`),
   torchvision-style folders (`~/data/MNIST/raw`, `./data/FashionMNIST/raw`, ...).

If none has it, `load` raises `DataNotFoundError`, whose message says what to do.

    >>> ds = load("fashion_mnist")
    >>> ds.train_images.shape, ds.train_images.dtype, ds.source
    ((60000, 28, 28), dtype('uint8'), 'idx files in /usr/share/datasets/fashion-mnist')
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import socket
import struct
from pathlib import Path

import numpy as np

DATASETS = ("mnist", "fashion_mnist")

# The four standard files of an IDX data set, by split and kind.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# The element type codes of the IDX format (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Local places to look in, after `data_dir` and TFDS, per data set.
_HOME = Path("~").expanduser()
_CANDIDATE_DIRS = {
    "fashion_mnist": [
        Path("/usr/share/datasets/fashion-mnist"),  # Debian: apt-get install dataset-fashion-mnist
        _HOME / ".keras/datasets/fashion-mnist",
        _HOME / "data/FashionMNIST/raw",
        Path("data/FashionMNIST/raw"),
        _HOME / ".cache/fashion-mnist",
    ],
    "mnist": [
        Path("/usr/share/datasets/mnist"),
        _HOME / ".keras/datasets",  # mnist.npz
        _HOME / ".keras/datasets/mnist",
        _HOME / "data/MNIST/raw",
        Path("data/MNIST/raw"),
        _HOME / ".cache/mnist",
    ],
}
_NPZ_NAMES = {"mnist": "mnist.npz", "fashion_mnist": "fashion-mnist.npz"}


class DataNotFoundError(FileNotFoundError):
    """The data set is in none of the places looked at; the message lists them and says what to do."""


@dataclasses.dataclass
class Dataset:
    """Images as uint8 `[n, 28, 28]`, labels as int32 `[n]`; `source` says where they came from."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    files: list[str] = dataclasses.field(default_factory=list)

    def limit(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The first `train` training and `test` test examples (None: all)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images[:train],
            train_labels=self.train_labels[:train],
            test_images=self.test_images[:test],
            test_labels=self.test_labels[:test],
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"source={self.source!r})"
        )


# -- the IDX format ---------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped if its name ends in `.gz`) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions `d`, then `d`
    big-endian uint32 sizes, then the data in row-major order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes `array` as an IDX file (gzipped if the name ends in `.gz`); the inverse of `read_idx`."""
    path = Path(path)
    array = np.asarray(array)
    for code, dtype in _IDX_DTYPES.items():
        if np.dtype(dtype).newbyteorder("=") == array.dtype.newbyteorder("="):
            break
    else:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.dtype(dtype).newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def find_idx_files(directory: str | os.PathLike) -> dict[tuple[str, str], Path] | None:
    """The four IDX files in `directory` (`name`, `name.gz`, or the `train-images.idx3-ubyte` spelling), or None."""
    directory = Path(directory)
    found = {}
    for key, name in IDX_FILES.items():
        dotted = name.replace("-idx", ".idx")
        for candidate in (name + ".gz", name, dotted + ".gz", dotted):
            if (directory / candidate).is_file():
                found[key] = directory / candidate
                break
        else:
            return None
    return found


def _from_idx_dir(name: str, directory: Path) -> Dataset | None:
    files = find_idx_files(directory)
    if files is None:
        return None
    arrays = {key: read_idx(path) for key, path in files.items()}
    return Dataset(
        name,
        arrays["train", "images"],
        arrays["train", "labels"].astype(np.int32),
        arrays["test", "images"],
        arrays["test", "labels"].astype(np.int32),
        source=f"idx files in {directory}",
        files=[str(p) for p in files.values()],
    )


def _from_npz(name: str, path: Path) -> Dataset | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        return Dataset(
            name,
            z["x_train"],
            z["y_train"].astype(np.int32),
            z["x_test"],
            z["y_test"].astype(np.int32),
            source=f"npz file {path}",
            files=[str(path)],
        )


def _from_dir(name: str, directory: Path) -> Dataset | None:
    return _from_idx_dir(name, directory) or _from_npz(name, directory / _NPZ_NAMES[name])


# -- TensorFlow Datasets, only if already prepared -------------------------------
def _from_tfds(name: str) -> tuple[Dataset | None, str]:
    """Loads from TFDS if it is installed and the data set is prepared locally; never downloads.

    Returns (dataset or None, a note on why not for the error message).
    """
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None, "tensorflow_datasets is not installed"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # belt and braces: nothing below should touch the network
    try:
        builder = tfds.builder(name, try_gcs=False)
        data_dir = builder.data_dir
        if not Path(data_dir).is_dir():
            # Not prepared here. Downloading could hang for minutes offline, so we do not try.
            return None, f"tensorflow_datasets has not prepared {name!r} (no {data_dir}; run `tfds build {name}` online)"
        arrays = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1)) for split in ("train", "test")}
    except Exception as e:  # a broken or partial TFDS install must not hide the other sources
        return None, f"tensorflow_datasets failed ({type(e).__name__}: {e})"
    finally:
        socket.setdefaulttimeout(old_timeout)
    return (
        Dataset(
            name,
            arrays["train"]["image"].reshape(-1, 28, 28).astype(np.uint8),
            arrays["train"]["label"].astype(np.int32),
            arrays["test"]["image"].reshape(-1, 28, 28).astype(np.uint8),
            arrays["test"]["label"].astype(np.int32),
            source=f"tensorflow_datasets ({data_dir})",
            files=[str(data_dir)],
        ),
        "",
    )


# -- the entry point ---------------------------------------------------------------
def load(
    name: str = "fashion_mnist",
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Dataset:
    """Loads MNIST or Fashion-MNIST from real files; see the module docstring for where it looks."""
    name = name.replace("-", "_").lower()
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")

    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise DataNotFoundError(f"--data-dir {directory} is not a directory")
        ds = _from_dir(name, directory)
        if ds is None:
            wanted = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
            raise DataNotFoundError(f"{directory} does not hold {name}: expected the IDX files {wanted}, or {_NPZ_NAMES[name]}")
        return ds.limit(train_limit, test_limit)

    ds, tfds_note = _from_tfds(name)
    if ds is not None:
        return ds.limit(train_limit, test_limit)

    for directory in _CANDIDATE_DIRS[name]:
        ds = _from_dir(name, directory)
        if ds is not None:
            return ds.limit(train_limit, test_limit)

    looked = "\n  ".join(str(d) for d in _CANDIDATE_DIRS[name])
    advice = (
        "Pass --data-dir DIR with the four IDX files (train-images-idx3-ubyte.gz, ...), "
        "or on Debian/Ubuntu: `apt-get install dataset-fashion-mnist` and use --dataset fashion_mnist."
    )
    raise DataNotFoundError(f"{name} not found. {tfds_note}; looked in:\n  {looked}\n{advice}")
