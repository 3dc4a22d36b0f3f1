"""Cached backbone features: train a head on a frozen backbone without re-running it.

While the backbone is frozen, its pooled output for an image never changes, yet the usual
way to train a head (a frozen backbone inside `fit`) recomputes it every epoch: almost all
of the time goes there. tlkit computes the features once per image, `views` times with
training augmentation when augmentation is on (so the head still sees augmented images:
each epoch draws one of the views per image), trains the head on them, and since the head
layers are the model's own layers, the full model holds the trained head at once, for the
unfrozen stages and the export.

Features are cached on disk under the user cache folder (`~/.cache/tlkit/features`), keyed
by everything they depend on: the files' content, the backbone's weights, image size, resize
policy, preprocessing, augmentation, views and seed. Changing the head, dropout or learning
rate reuses them. The folder is capped in size (oldest entries go first); `tlkit cache info`
and `tlkit cache clear` manage it.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tlkit.data import default_cache_dir
from tlkit.files import write_atomically

FORMAT = 1
DEFAULT_MAX_BYTES = 5 * 1024**3


def feature_extractor(model):
    """The part of a tlkit classifier that a frozen stage never changes: images -> pooled
    features (preprocess, backbone in inference mode, pooler)."""
    inputs = keras.Input(model.input_shape[1:])
    x = model.get_layer("preprocess")(inputs)
    x = model.get_layer("backbone")(x, training=False)
    if "pooler" in [layer.name for layer in model.layers]:
        x = model.get_layer("pooler")(x)
    return keras.Model(inputs, x, name="feature_extractor")


def head_model(model):
    """The trainable rest: pooled features -> `output_dropout` -> `predictions`. It shares
    its layers with `model`, so training it trains the model's own head."""
    size = model.get_layer("predictions").kernel.shape[0]
    inputs = keras.Input((size,), name="features")
    x = model.get_layer("output_dropout")(inputs)
    return keras.Model(inputs, model.get_layer("predictions")(x), name="head")


def weights_digest(layer):
    """SHA-1 of a layer's weight values: identifies the backbone whatever its source."""
    sha1 = hashlib.sha1()
    for weight in layer.get_weights():
        sha1.update(np.ascontiguousarray(weight).tobytes())
    return sha1.hexdigest()


def feature_key(files_digests, **settings):
    """The cache key of a set of features: the files' content digests (in order) and every
    setting the features depend on."""
    payload = json.dumps({"format": FORMAT, "files": list(files_digests), **settings},
                         sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def compute_features(extractor, images, augmenter=None, views=1, batch_size=64, verbose=1):
    """Runs the extractor over uint8 images, `views` times through `augmenter`.

    Args:
        extractor: `feature_extractor(model)`.
        images: uint8 array `(n, size, size, 3)`.
        augmenter: augmentation model applied with `training=True`, or None.
        views: number of (augmented) views per image; 1 without an augmenter.
        batch_size: images per forward pass.
        verbose: 0 silent, else a progress bar.

    Returns:
        float32 array `(views, n, features)`.
    """
    views = views if augmenter is not None else 1
    total = views * len(images)
    progbar = keras.utils.Progbar(total, unit_name="image") if verbose and total else None

    @tf.function(reduce_retracing=True)
    def forward(batch):
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        return extractor(batch, training=False)

    out, done = [], 0
    for view in range(views):
        rows = []
        for start in range(0, len(images), batch_size):
            batch = tf.constant(images[start:start + batch_size], tf.float32)
            rows.append(forward(batch).numpy())
            done += len(batch)
            if progbar is not None:
                progbar.update(done)
        out.append(np.concatenate(rows) if rows else
                   np.zeros((0, extractor.output_shape[-1]), np.float32))
    return np.stack(out).astype(np.float32)


class FeatureCache:
    """A size-capped folder of feature arrays, one `.npy` file per key.

    Args:
        folder: where the files go; None: `<user cache>/tlkit/features`.
        max_bytes: size cap; the least recently used entries are removed past it.
    """

    def __init__(self, folder=None, max_bytes=DEFAULT_MAX_BYTES):
        self.folder = Path(folder) if folder else default_cache_dir() / "features"
        self.max_bytes = int(max_bytes)

    def _path(self, key):
        return self.folder / f"{key}.npy"

    def get(self, key):
        """The array stored under `key`, or None (a corrupt file counts as missing)."""
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        os.utime(path)  # recently used
        return array

    def put(self, key, array):
        """Stores `array` atomically, then trims the folder to the size cap."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self._path(key), lambda f: np.save(f, array, allow_pickle=False))
        self.trim(keep=key)

    def entries(self):
        """`(path, bytes, last used)` of every entry, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(p, p.stat().st_size, p.stat().st_mtime) for p in self.folder.glob("*.npy")]
        return sorted(found, key=lambda item: item[2])

    def trim(self, keep=None):
        """Removes the least recently used entries until the folder fits the cap."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == self._path(keep):
                continue
            path.unlink(missing_ok=True)
            total -= size

    def info(self):
        """A dict: folder, entries, bytes, cap, oldest and newest use."""
        entries = self.entries()
        return {"folder": str(self.folder), "entries": len(entries),
                "bytes": sum(size for _, size, _ in entries), "max_bytes": self.max_bytes,
                "oldest": time.ctime(entries[0][2]) if entries else None,
                "newest": time.ctime(entries[-1][2]) if entries else None}

    def clear(self):
        """Deletes every entry; returns how many bytes were freed."""
        freed = 0
        for path, size, _ in self.entries():
            path.unlink(missing_ok=True)
            freed += size
        return freed


@dataclass
class SplitFeatures:
    """Features of one split: `(views, n, features)` and the labels."""

    features: np.ndarray
    labels: np.ndarray
    from_cache: bool


def split_features(model, split, digests, cache, settings, augmenter=None, views=1,
                   batch_size=64, verbose=1, seed=None):
    """Features of a split, from the cache when they are there, else computed and stored.

    Args:
        model: the tlkit classifier (its backbone frozen).
        split: a `tlkit.data.Split`.
        digests: content digest of each file of the split, in order.
        cache: a `FeatureCache`, or None to compute without caching.
        settings: dict of everything else the features depend on (see `feature_key`).
        augmenter: augmentation model for the views; give it its own seed, so computing
            features (or finding them cached) leaves the training augmenter's state alone.
        views, batch_size, verbose: see `compute_features`.
        seed: the augmenter's seed (part of the cache key).

    Returns:
        `SplitFeatures`.
    """
    views = views if augmenter is not None else 1
    backbone_id = weights_digest(model.get_layer("backbone"))
    key = feature_key(digests, backbone=backbone_id, views=views, seed=seed,
                      augmented=augmenter is not None, **settings)
    stored = cache.get(key) if cache is not None else None
    if stored is not None and stored.shape[:2] == (views, len(split)):
        return SplitFeatures(stored, split.labels, True)
    features = compute_features(feature_extractor(model), split.images, augmenter, views,
                                batch_size, verbose)
    if cache is not None:
        cache.put(key, features)
    return SplitFeatures(features, split.labels, False)


def feature_dataset(split_features, batch_size, shuffle=False, seed=None):
    """Batches of `(features, labels)`; with several views, each epoch draws one view per
    image at random (seeded), so the head sees a different augmentation every epoch."""
    features = tf.constant(split_features.features)
    views, count = split_features.features.shape[:2]
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip(
        tf.data.Dataset.from_tensor_slices((tf.range(count), split_features.labels)), draws)
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)

    def pick(item, draw):
        index, label = item
        return features[tf.cast(draw % views, tf.int32), index], label

    return dataset.map(pick).batch(batch_size).prefetch(tf.data.AUTOTUNE)
