"""MNIST, Fashion-MNIST and CIFAR-10 read from the Keras dataset cache, never downloaded.

``tf.keras.datasets.<name>.load_data()`` downloads whatever it does not find, which hangs on an
offline machine, and it re-downloads when a cached file fails its hash check or when only the
extracted CIFAR folder is present (it looks for the ``.tar.gz``). So the files are read here with
numpy/gzip/pickle exactly as Keras 2.14's loaders (``keras/src/datasets/*.py``) read them, and a
missing file is a ``DataError`` naming it.

Where the files are looked for, first match wins:
``data_dir`` argument > ``$TOOLCHAIN_DATA_DIR`` > the Keras cache folders (``$KERAS_HOME/datasets``
when set, ``~/.keras/datasets``, and ``/tmp/.keras/datasets`` which Keras uses when ``~/.keras``
is not writable). Keras 2.14's ``get_file`` itself ignores ``KERAS_HOME`` (only its config
file honours it); the folder is searched anyway because Keras 3's ``get_file`` does use it. The folder given is the one that directly holds ``mnist.npz``,
``fashion-mnist/`` and ``cifar-10-batches-py/``.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from toolchain.data.dataset import Dataset
from toolchain.errors import DataError

DATA_DIR_ENV = "TOOLCHAIN_DATA_DIR"

MNIST_FILE = "mnist.npz"
FASHION_MNIST_DIR = "fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
# Keras stores the download as <folder>.tar.gz; the Toronto site names it cifar-10-python.tar.gz.
CIFAR10_ARCHIVES = ("cifar-10-batches-py.tar.gz", "cifar-10-python.tar.gz")

MNIST_CLASS_NAMES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_IDX_LABELS_MAGIC = 2049
_IDX_IMAGES_MAGIC = 2051


def candidate_dirs(data_dir: str | None) -> tuple[list[Path], str]:
    """Folders to search, and how they were chosen (for messages)."""
    if data_dir is not None:
        return [Path(data_dir)], "the data_dir argument"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return [Path(env)], f"${DATA_DIR_ENV}"
    dirs = []
    if os.environ.get("KERAS_HOME"):
        dirs.append(Path(os.environ["KERAS_HOME"]) / "datasets")
    dirs += [Path("~/.keras/datasets").expanduser(), Path("/tmp/.keras/datasets")]
    return list(dict.fromkeys(dirs)), "the Keras cache"


def _missing_error(what: str, missing: list[str], dirs: list[Path], chosen_by: str) -> DataError:
    searched = ", ".join(str(d) for d in dirs)
    return DataError(
        f"{what} is not cached: {', '.join(missing)} not found in {searched} (searched via "
        f"{chosen_by}); nothing is downloaded here, so run tf.keras.datasets.{what}.load_data() "
        f"on a machine with internet and copy the result from its ~/.keras/datasets into "
        f"{dirs[0]}, or set {DATA_DIR_ENV} to a folder that holds it"
    )


def _first_dir_with(required: list[str], dirs: list[Path]) -> Path | None:
    for d in dirs:
        if all((d / r).exists() for r in required):
            return d
    return None


def _normalized(x_uint8: np.ndarray) -> np.ndarray:
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    return x[..., np.newaxis] if x.ndim == 3 else x


def _make(
    name: str, class_names: tuple[str, ...], source: Path,
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
) -> Dataset:
    x_train, x_eval = _normalized(x_train), _normalized(x_eval)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=np.asarray(y_train).reshape(-1).astype(np.int64),
        x_eval=x_eval,
        y_eval=np.asarray(y_eval).reshape(-1).astype(np.int64),
        class_names=class_names,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        provenance=(
            f"Keras {name} read from {source}: the official train split ({len(x_train)}) as "
            f"train/calibration in file order, the test split ({len(x_eval)}) as eval; uint8 "
            "pixels divided by 255"
        ),
    )


# -- MNIST -------------------------------------------------------------------------------------
def load_mnist(data_dir: str | None = None) -> Dataset:
    dirs, chosen_by = candidate_dirs(data_dir)
    folder = _first_dir_with([MNIST_FILE], dirs)
    if folder is None:
        raise _missing_error("mnist", [MNIST_FILE], dirs, chosen_by)
    path = folder / MNIST_FILE
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        # The real file holds plain arrays; refusing pickles keeps a tampered cache from running
        # code. Our own handle, because np.load leaks its file when the archive is corrupt.
        with open(path, "rb") as handle:
            f = np.load(handle, allow_pickle=False)
            files = f.files if isinstance(f, np.lib.npyio.NpzFile) else ["a single .npy array"]
            absent = [k for k in keys if k not in files]
            if absent:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(absent)} (it has {', '.join(files)}); "
                    "replace it with the Keras mnist.npz"
                )
            arrays = [f[k] for k in keys]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cannot read {path} as the Keras mnist.npz ({exc}); delete it and copy an intact one"
        ) from None
    _check_images(path, arrays[0], arrays[1], (28, 28))
    _check_images(path, arrays[2], arrays[3], (28, 28))
    return _make("mnist", MNIST_CLASS_NAMES, path, *arrays)


def _check_images(source: Path | str, x: np.ndarray, y: np.ndarray, hw: tuple[int, ...]) -> None:
    if x.ndim != 1 + len(hw) or tuple(x.shape[1:]) != hw or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{source} holds images of shape {x.shape} and labels of shape {y.shape}, but the "
            f"format is (N, {', '.join(map(str, hw))}) images with (N,) labels; replace it with an "
            "intact copy from Keras"
        )
    if x.dtype.kind not in "ui" or y.dtype.kind not in "ui":
        raise DataError(
            f"{source} holds {x.dtype} images and {y.dtype} labels, but the format is uint8 "
            "images with integer labels; replace it with an intact copy from Keras"
        )


# -- Fashion-MNIST -----------------------------------------------------------------------------
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzipped IDX file (the MNIST distribution format): big-endian int32 header, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {path} as gzip ({exc}); delete it and copy an intact one"
        ) from None
    # Images: magic, count, rows, cols; labels: magic, count.
    header_ints = 4 if magic == _IDX_IMAGES_MAGIC else 2
    header = np.frombuffer(raw[: 4 * header_ints], dtype=">i4") if len(raw) >= 4 * header_ints \
        else None
    if header is None or header[0] != magic:
        found = "too few bytes" if header is None else f"magic number {int(header[0])}"
        raise DataError(
            f"{path} has {found}, but an IDX file starts with magic number {magic}; delete it and "
            "copy an intact one"
        )
    dims = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path} declares {dims} values but holds {data.size}; the file is truncated, copy an "
            "intact one"
        )
    return data.reshape(dims)


#: where Debian's package dataset-fashion-mnist (Expat) installs the four original files
DEBIAN_DATASETS = Path("/usr/share/datasets")


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST's four IDX files from the Keras cache or, after it, from Debian's package
    ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``; re-gzipped, same bytes
    inside). ``data_dir`` or ``$TOOLCHAIN_DATA_DIR`` replace both."""
    dirs, chosen_by = candidate_dirs(data_dir)
    if data_dir is None and not os.environ.get(DATA_DIR_ENV):
        dirs.append(DEBIAN_DATASETS)
        chosen_by += " and Debian's dataset-fashion-mnist location (apt-get install dataset-fashion-mnist)"
    required = [f"{FASHION_MNIST_DIR}/{f}" for f in FASHION_MNIST_FILES]
    folder = _first_dir_with(required, dirs)
    if folder is None:
        # Name only what is absent from the most complete candidate, so the fix is precise.
        best = max(dirs, key=lambda d: sum((d / r).exists() for r in required))
        missing = [r for r in required if not (best / r).exists()]
        raise _missing_error("fashion_mnist", missing, [best] + [d for d in dirs if d != best],
                             chosen_by)
    base = folder / FASHION_MNIST_DIR
    x_train = _read_idx(base / "train-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC)
    y_train = _read_idx(base / "train-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC)
    x_test = _read_idx(base / "t10k-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC)
    y_test = _read_idx(base / "t10k-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC)
    _check_images(base / "train-*-ubyte.gz", x_train, y_train, (28, 28))
    _check_images(base / "t10k-*-ubyte.gz", x_test, y_test, (28, 28))
    return _make("fashion_mnist", FASHION_MNIST_CLASS_NAMES, base, x_train, y_train, x_test, y_test)


# -- CIFAR-10 ----------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists, nothing that can run code.

    The CIFAR batches are pickles; an unrestricted ``pickle.load`` of a cache file would execute
    whatever a tampered file asks for.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch as Keras's ``cifar.load_batch`` reads it, returned NHWC uint8."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise DataError(
            f"cannot read {source} as a CIFAR-10 batch ({type(exc).__name__}: {exc}); delete it "
            "and copy an intact cifar-10-batches-py"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(
            f"{source} holds a {type(batch).__name__}, not the CIFAR-10 batch dict; copy an "
            "intact cifar-10-batches-py"
        )
    batch = {k.decode("utf8") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(
            f"{source} has keys {sorted(batch)}, but a CIFAR-10 batch needs 'data' and 'labels'; "
            "copy an intact cifar-10-batches-py"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or (
        labels.shape != (len(data),)
    ):
        raise DataError(
            f"{source} holds data {data.dtype}{data.shape} and labels {labels.shape}, but a "
            "CIFAR-10 batch is uint8 (N, 3072) with N labels; copy an intact cifar-10-batches-py"
        )
    # Stored channel-first per image (1024 red, 1024 green, 1024 blue values).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_batches(folder: Path) -> tuple[dict[str, bytes], Path]:
    """Raw bytes of every batch, from the extracted folder or else from the archive.

    The archive is read in one pass: a .tar.gz cannot seek, so reading it per batch would
    decompress it six times.
    """
    extracted = folder / CIFAR10_DIR
    if extracted.is_dir():
        absent = [b for b in CIFAR10_BATCHES if not (extracted / b).is_file()]
        if absent:
            raise DataError(
                f"{extracted} lacks {', '.join(absent)}; copy the complete cifar-10-batches-py "
                f"folder, or delete it and put {CIFAR10_ARCHIVES[0]} beside it"
            )
        return {b: (extracted / b).read_bytes() for b in CIFAR10_BATCHES}, extracted
    archive = next(folder / a for a in CIFAR10_ARCHIVES if (folder / a).is_file())
    wanted = {f"{CIFAR10_DIR}/{b}": b for b in CIFAR10_BATCHES}
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    raw[wanted[member.name]] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(
            f"cannot read {archive} as a .tar.gz ({type(exc).__name__}: {exc}); delete it and "
            "copy an intact one"
        ) from None
    absent = [m for m, b in wanted.items() if b not in raw]
    if absent:
        raise DataError(
            f"{archive} lacks {', '.join(absent)}; delete it and copy the intact CIFAR-10 python "
            "archive"
        )
    return raw, archive


def load_cifar10(data_dir: str | None = None) -> Dataset:
    dirs, chosen_by = candidate_dirs(data_dir)
    folder = next(
        (d for d in dirs if (d / CIFAR10_DIR).is_dir() or any((d / a).is_file()
                                                              for a in CIFAR10_ARCHIVES)),
        None,
    )
    if folder is None:
        raise _missing_error(
            "cifar10", [f"{CIFAR10_DIR}/ (or {' or '.join(CIFAR10_ARCHIVES)})"], dirs, chosen_by
        )
    raw, source = _read_cifar_batches(folder)
    train = [_read_cifar_batch(raw[b], f"{source}/{b}") for b in CIFAR10_BATCHES[:-1]]
    x_test, y_test = _read_cifar_batch(raw[CIFAR10_BATCHES[-1]], f"{source}/test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _make("cifar10", CIFAR10_CLASS_NAMES, source, x_train, y_train, x_test, y_test)
