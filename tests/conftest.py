"""Shared fixtures: tiny generated image folders, the bundled digits, quiet TensorFlow."""

import fcntl
import gc
import os
import struct
import sys
import zlib

from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' own Keras cache (read by Keras when it is imported): the ImageNet MobileNet files
# the `imagenet_mobilenet` fixture makes go there, never into the user's ~/.keras.
TEST_CACHE = Path(os.environ.get("TLKIT_TEST_CACHE", Path.home() / ".cache" / "tlkit-tests"))
os.environ["KERAS_HOME"] = str(TEST_CACHE / "keras")

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.mobilenet_weights makes the ImageNet weights
DIGITS = REPO / "data" / "digits"


def pytest_unconfigure(config):
    """Each pytest process exits without Python's final collection of everything TensorFlow
    made, as the `tlkit` command does."""
    gc.freeze()


def make_class_image(label, index, size=16, seed=0):
    """A uint8 RGB image whose class shows as a bright bar position plus noise."""
    rng = np.random.default_rng(seed * 100_003 + label * 1009 + index)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    band = size // 4
    start = (label * band) % (size - band + 1)
    image[:, start:start + band, :] = 200 + rng.integers(0, 55, (size, band, 3), dtype=np.uint8)
    return image


def write_image_folder(root, classes=("a", "b"), per_class=10, size=16, fmt="png", seed=0):
    """Writes `per_class` distinct images per class into `root/<class>/`; returns `root`."""
    root = Path(root)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = make_class_image(label, index, size, seed)
            Image.fromarray(image).save(folder / f"{name}_{index:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A factory: `image_folder(classes=..., per_class=..., size=..., fmt=...)` -> folder."""

    def make(name="images", **kwargs):
        return write_image_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def digits_dir():
    """The bundled sample data set."""
    assert DIGITS.is_dir(), "data/digits is missing"
    return DIGITS


DIGITS_RUN = dict(backbone="scratch", image_size=16, epochs=4, test_split=0.2, augment="none",
                  flip="none", verbose=0)  # the settings of `digits_run`


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The scratch CNN trained on the bundled digits at 16 px for 4 epochs, with a 20% test
    split, and exported: `export_path` (`saved_models/digits/1`) and `run_dir` under a
    temporary folder. Shared by the serving and TFLite tests, and by pytest-xdist's workers:
    the first to need it trains it under a lock, the others wait and read it. Tests read
    it and write nothing into it."""
    import tlkit

    if "PYTEST_XDIST_WORKER" not in os.environ:
        base = tmp_path_factory.mktemp("digits_run")
    else:  # every worker's basetemp has the same parent
        base = tmp_path_factory.getbasetemp().parent / "digits_run"
        base.mkdir(exist_ok=True)
    export = base / "saved_models" / "digits" / "1"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (export / "saved_model.pb").is_file():
            result = tlkit.fit(DIGITS, name="digits", export_dir=base / "saved_models",
                               runs_dir=base / "runs", **DIGITS_RUN)
            assert Path(result.export_path) == export
    (run_dir,) = (base / "runs" / "digits").iterdir()
    return SimpleNamespace(export_path=export, run_dir=run_dir)


@pytest.fixture(scope="session")
def digits_export(digits_run):
    """`digits_run`'s export folder."""
    return digits_run.export_path


@pytest.fixture(scope="session")
def imagenet_mobilenet():
    """The KERAS_HOME holding Keras's ImageNet MobileNet v1 files, made from the PyPI sdist
    by benchmarks/mobilenet_weights.py on first use (pip reaches PyPI) and kept in
    TEST_CACHE. A test that needs them fails, never skips, when they cannot be made."""
    from benchmarks.mobilenet_weights import ensure_weight_files

    keras_home = Path(os.environ["KERAS_HOME"])
    ensure_weight_files(keras_home, TEST_CACHE / "sdist")
    return keras_home


def png_chunk(kind, body):
    """One PNG chunk: length, type, body and a valid CRC."""
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_header_only(width, height):
    """A PNG signature and IHDR chunk (valid CRC) claiming a size, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def png_header_claiming(width, height):
    """A complete small PNG file whose IHDR claims `width` x `height` RGB pixels."""
    return (png_header_only(width, height) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))
