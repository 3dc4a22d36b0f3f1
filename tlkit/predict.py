"""Prediction from an export: load once, decode files with the training contract, batch.

`load(path)` returns a `Classifier`. Its `predict` sends JPEG, PNG, GIF, BMP and WebP files
in batches through the export's own `serving_default` signature, whose in-graph decoding is
bit-exact with the training loader's (`tlkit.images`); any other format (TIFF, ...) is decoded
with Pillow and resized by the same rule, then goes through `predict_images`. A file that
cannot be read gets an error entry; the others are still predicted.

For a multi-label export (`Classifier.multi_label`), each `Prediction` also lists in
`predicted` every label whose probability reaches its threshold (the export's, in its
metadata and its graph), most probable first; `labels` stays the top-k by probability.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np
import tensorflow as tf

from tlkit.data import image_extensions
from tlkit.errors import DataError, ExportError, ImageError
from tlkit.export import read_metadata, resolve_export
from tlkit.images import SERVING_FORMATS, load_image
from tlkit.validation import check_number


@dataclass
class Prediction:
    """The top-k classes for one input, or the error that prevented it."""

    source: str  # file path, or "array[i]" for in-memory images
    labels: list = field(default_factory=list)  # top-k class names, most probable first
    probabilities: list = field(default_factory=list)  # their probabilities
    error: str | None = None  # why this input could not be predicted
    predicted: list | None = None  # multi-label: [label, probability] above threshold

    @property
    def label(self):
        """The top-1 class name (None on error)."""
        return self.labels[0] if self.labels else None

    def to_dict(self):
        """JSON-ready form."""
        values = {"file": self.source, "labels": self.labels,
                  "probabilities": [round(p, 6) for p in self.probabilities],
                  "error": self.error}
        if self.predicted is not None:
            values["predicted"] = [[label, round(p, 6)] for label, p in self.predicted]
        return values


class Classifier:
    """A tlkit export loaded for prediction. Use `tlkit.load(path)` to make one.

    Attributes:
        path: the export folder.
        metadata: its `tlkit.json` contents.
        class_names: class name per output index.
        image_size: input side in pixels.
        resize: resize policy.
        multi_label: whether the export is multi-label (sigmoid outputs).
        thresholds: a multi-label export's threshold per class (else None).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.class_names = list(self.metadata["class_names"])
        self.image_size = int(self.metadata["image_size"])
        self.resize = self.metadata["resize"]
        self.multi_label = bool(self.metadata.get("multi_label", False))
        self.thresholds = (np.asarray(self.metadata["thresholds"], np.float32).tolist()
                           if self.multi_label else None)
        self._saved = tf.saved_model.load(str(self.path))
        self._predict_images = self._saved.signatures["predict_images"]
        self._serve = self._saved.signatures["serving_default"]

    def signature(self, name):
        """One of the export's signatures, by name (see `tlkit.export`).

        Raises:
            ExportError: if the export has no such signature (an older tlkit export).
        """
        if name not in self._saved.signatures:
            raise ExportError(f"Export {str(self.path)!r} has no {name!r} signature (it has "
                              f"{sorted(self._saved.signatures)}). Export it again with this "
                              "tlkit version.")
        return self._saved.signatures[name]

    def predict_arrays(self, images, batch_size=64):
        """Probabilities for images already at the model's size.

        Args:
            images: array `(n, size, size, 3)`, pixel values 0..255.
            batch_size: images per forward pass.

        Returns:
            float32 array `(n, num_classes)`.
        """
        images = np.asarray(images, np.float32)
        out = [self._predict_images(images=tf.constant(images[i:i + batch_size]))
               ["probabilities"].numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, inputs, top_k=3, batch_size=64, workers=0):
        """Predicts the top-k classes (and, multi-label, the labels above threshold) for
        image files and folders.

        Args:
            inputs: a path or a list of paths; a folder contributes every image file below
                it (sorted, hidden files skipped).
            top_k: number of classes per prediction (at most the number of classes).
            batch_size: images per forward pass.
            workers: decoding threads; 0: one per CPU core.

        Returns:
            A list of `Prediction`, in input order; unreadable files carry `error`.

        Raises:
            DataError: if a folder holds no image files.
        """
        check_number("top_k", top_k, 1, integer=True)
        check_number("batch_size", batch_size, 1, integer=True)
        top_k = min(top_k, len(self.class_names))
        files = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
        results = [Prediction(str(f)) for f in files]
        thresholds = np.asarray(self.thresholds, np.float32) if self.multi_label else None

        # One batch's worth of files decodes faster with Pillow: the first call of
        # serving_default (TensorFlow optimising its decoding graph) costs about 0.5 s, and
        # the two cost the same per file (measured in fresh processes for 1-104 JPEGs of
        # 400-1200 px, 16 and 160 px models; benchmarks/cold_start.py times one photo).
        in_graph = len(files) > batch_size
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for start in range(0, len(files), batch_size):
                batch = files[start:start + batch_size]
                for offset, row in enumerate(self._batch_probabilities(batch, pool, in_graph)):
                    result = results[start + offset]
                    if isinstance(row, str):
                        result.error = row
                        continue
                    order = np.argsort(-row, kind="stable")
                    result.labels = [self.class_names[j] for j in order[:top_k]]
                    result.probabilities = [float(row[j]) for j in order[:top_k]]
                    if self.multi_label:
                        above = row >= thresholds
                        result.predicted = [[self.class_names[j], float(row[j])]
                                            for j in order if above[j]]
        return results

    def _batch_probabilities(self, files, pool, in_graph=True):
        """Probabilities (or an error reason) per file. With `in_graph`, JPEG, PNG, GIF, BMP
        and WebP bytes go through the export's own `serving_default` in one call (its
        decoding is bit-exact with Pillow's, and batched); other formats, every file of a
        batch the graph refuses, and every file without `in_graph`, are decoded with Pillow
        (in `pool`'s threads), which also names what is wrong."""
        rows = [None] * len(files)
        graph = []
        if in_graph:
            blobs = list(pool.map(_read_bytes, files))
            graph = [i for i, blob in enumerate(blobs)
                     if isinstance(blob, bytes) and blob.startswith(SERVING_FORMATS)]
        if graph:
            try:
                out = self._serve(image_bytes=tf.constant([blobs[i] for i in graph]))
                for i, row in zip(graph, out["probabilities"].numpy()):
                    rows[i] = row
            except tf.errors.InvalidArgumentError:
                pass  # a file the graph cannot take: decode the batch file by file below

        def decode(index):
            try:
                return load_image(files[index], self.image_size, self.resize)
            except ImageError as e:
                return e.reason

        rest = [i for i, row in enumerate(rows) if row is None]
        decoded = dict(zip(rest, pool.map(decode, rest)))
        good = [i for i in rest if not isinstance(decoded[i], str)]
        if good:
            for i, row in zip(good, self.predict_arrays(np.stack([decoded[i] for i in good]))):
                rows[i] = row
        return [decoded[i] if row is None else row for i, row in enumerate(rows)]


def _read_bytes(path):
    """A file's bytes, or None when it cannot be read (Pillow then says why)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def expand_inputs(paths):
    """Expands files and folders into a list of image files (folders: recursive, sorted).

    A path that is not a folder is kept as it is, so a missing or unreadable file becomes an
    error entry of its own instead of stopping the others.

    Raises:
        DataError: if a folder has no image files.
    """
    extensions = image_extensions()
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in extensions
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"Folder {str(path)!r} has no image files to predict.")
            files += found
        else:
            files.append(path)
    return files


def load(path=None, export_dir="saved_models"):
    """Loads a tlkit export for prediction.

    Args:
        path: an export version folder (`saved_models/NAME/VERSION`), or a model folder
            (`saved_models/NAME`, its highest version); `None` takes the newest export under
            `export_dir`.
        export_dir: where to look when `path` is None.

    Returns:
        A `Classifier`.

    Example:

    >>> classifier = tlkit.load("saved_models/digits/1")
    >>> classifier.predict("photo.png", top_k=3)[0].label
    """
    return Classifier(resolve_export(path, export_dir))
