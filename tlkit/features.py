"""Cached backbone features: train on a frozen backbone without re-running it.

While the backbone is frozen, its pooled output for an image never changes, yet the usual
way to train a head (a frozen backbone inside `fit`) recomputes it every epoch: almost all
of the time goes there. tlkit computes the features once per image, `views` times with
training augmentation when augmentation is on (so the head still sees augmented images:
each epoch draws one of the views per image), trains the head on them, and since the head
layers are the model's own layers, the full model holds the trained head at once, for the
unfrozen stages and the export.

An unfreezing stage is the same idea one cut lower: the layers below the unfrozen groups
stay frozen (BatchNorm in inference mode), so their output for an image is fixed too.
`frozen_cut` finds the tensor between the frozen and the trained layers, `feature_extractor`
computes it once per view, and `head_model` trains the layers above it, the pooler and the
head. An epoch then costs the unfrozen groups' forward and backward pass, not the
backbone's. The views are the head stage's (same augmenter seed), so both stages see the
same augmented images.

Features are cached on disk under the user cache folder (`~/.cache/tlkit/features`), keyed
by everything they depend on: the files' content, the backbone's weights, the cut, image
size, resize policy, preprocessing, augmentation, views, seed, and the engine and precision
that computed them. Changing the head, dropout or learning rate reuses them.

`FeatureEngine` runs the extractor on the fastest engine the machine and the installed
packages offer: OpenVINO in bfloat16 (`pip install openvino`, used when its CPU plugin has
BF16, e.g. AMX or AVX512_BF16 CPUs) or TensorFlow in float32. Before OpenVINO is used, its
features of a sample are compared with TensorFlow's float32 ones (cosine similarity at least
`ENGINE_MIN_COSINE` on every image) and both are timed on it; it is used only if it agrees
and is faster, else TensorFlow float32 computes them. The folder is capped in size (oldest entries go first); `tlkit cache info`
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
from tlkit.errors import ConfigError
from tlkit.files import write_atomically
from tlkit.runtime import cpu_flags
from tlkit.validation import check_number

FORMAT = 1
DEFAULT_MAX_BYTES = 5 * 1024**3

ENGINES = ("auto", "tensorflow", "openvino")
"""`FeatureEngine` choices: `auto` picks OpenVINO bfloat16 when available, agreeing and
faster on a sample, else TensorFlow float32."""

ENGINE_MIN_COSINE = 0.9999
"""Least cosine similarity between a candidate engine's features and TensorFlow float32's,
on every image of the sample, for the candidate to be used."""

ENGINE_SAMPLE = 32
"""Images the candidate engine is checked and timed on."""

ENGINE_MIN_SECONDS = {"amx": 8.0, "other": 30.0}
"""`auto` tries OpenVINO only when TensorFlow float32 would take at least this long for the
features to compute (estimated on the sample), by whether the CPU has AMX (`amx_bf16` in
/proc/cpuinfo's flags): converting and checking the model costs seconds, which a shorter job
does not win back. Measured (`benchmarks/feature_engine.py`, ResNet50, 2 cores): with AMX,
OpenVINO bfloat16 is 5.6-6x TensorFlow float32 and the set-up about 5 s, so a job of 8 s of
TensorFlow work already runs about 1.5x faster; without AMX (AVX512_BF16 only) it was 1.4x
and the conversion 5 s, so only a job of about 30 s gains."""


def engine_min_seconds():
    """`ENGINE_MIN_SECONDS` for this machine's CPU."""
    return ENGINE_MIN_SECONDS["amx" if "amx_bf16" in cpu_flags() else "other"]


ACTIVATIONS_MAX_BYTES = 1024**3
"""Most bytes of cached activations an unfreezing stage holds in memory (training and
validation, every view); a stage whose activations would be larger trains on images."""


def feature_extractor(model, cut=None):
    """The part of a tlkit classifier that a stage never changes, run in inference mode.

    Args:
        model: a tlkit classifier.
        cut: None: images -> pooled features (preprocess, the whole backbone, pooler), for a
            stage that trains only the head; or the name of a backbone layer (`frozen_cut`):
            images -> that layer's output, for a stage that trains the layers above it.

    Returns:
        A Keras model.
    """
    inputs = keras.Input(model.input_shape[1:])
    x = model.get_layer("preprocess")(inputs)
    backbone = model.get_layer("backbone")
    if cut is not None:
        lower, _ = _split(backbone, cut)
        return keras.Model(inputs, lower(x, training=False), name="feature_extractor")
    x = backbone(x, training=False)
    if "pooler" in [layer.name for layer in model.layers]:
        x = model.get_layer("pooler")(x)
    return keras.Model(inputs, x, name="feature_extractor")


def head_model(model, cut=None):
    """The trainable rest of a stage: what `feature_extractor(model, cut)` gives ->
    (the backbone's layers above `cut` ->) pooler -> `output_dropout` -> `predictions`. It
    shares its layers with `model`, so training it trains the model's own layers."""
    if cut is None:
        inputs = keras.Input((model.get_layer("predictions").kernel.shape[0],),
                             name="features")
        x = inputs
    else:
        lower, upper = _split(model.get_layer("backbone"), cut)
        inputs = keras.Input(lower.output.shape[1:], name="activations")
        x = upper(inputs)
        if "pooler" in [layer.name for layer in model.layers]:
            x = model.get_layer("pooler")(x)
    x = model.get_layer("output_dropout")(x)
    return keras.Model(inputs, model.get_layer("predictions")(x), name="head")


def _split(backbone, cut):
    """The backbone's layers up to `cut` and those above it, as two models sharing them."""
    if isinstance(backbone, keras.Sequential):
        index = [layer.name for layer in backbone.layers].index(cut) + 1
        return (_chain(backbone.input_shape[1:], backbone.layers[:index], "lower"),
                _chain(backbone.layers[index].input.shape[1:], backbone.layers[index:],
                       "upper"))
    boundary = backbone.get_layer(cut).output
    return (keras.Model(backbone.input, boundary, name="lower"),
            keras.Model(boundary, backbone.output, name="upper"))


def _chain(input_shape, layers, name):
    x = inputs = keras.Input(input_shape)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name=name)


def frozen_cut(model):
    """The backbone layer whose output is the one tensor between the layers a stage leaves
    frozen and those it trains, or None.

    A layer is frozen for the stage when it has no trainable weights and every input it
    reads is frozen too (BatchNorm layers that stay in inference mode inside an unfrozen
    group read a trained layer's output, so they are not). None when the whole backbone is
    frozen (the head stage: `feature_extractor(model)`), when its first layer trains, or when
    several tensors cross from the frozen layers to the trained ones (the stage then trains
    on images).
    """
    backbone = model.get_layer("backbone")
    if isinstance(backbone, keras.Sequential):  # a chain: the layer before the first to train
        first = next((i for i, layer in enumerate(backbone.layers)
                      if layer.trainable_weights), None)
        return None if not first else backbone.layers[first - 1].name
    frozen = {id(t): None for t in _as_list(backbone.input)}  # tensor -> the layer making it
    crossing = {}
    for layer in backbone.operations:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        inputs = _as_list(layer.input)
        if not layer.trainable_weights and all(id(t) in frozen for t in inputs):
            frozen.update((id(t), layer) for t in _as_list(layer.output))
        else:
            crossing.update((id(t), frozen[id(t)]) for t in inputs if id(t) in frozen)
    if len(crossing) != 1:
        return None
    producer = next(iter(crossing.values()))
    return None if producer is None else producer.name


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def activation_bytes(model, cut, images):
    """Bytes of `feature_extractor(model, cut)`'s float32 output for `images` images."""
    lower, _ = _split(model.get_layer("backbone"), cut)
    return int(np.prod(lower.output.shape[1:])) * 4 * images


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


class FeatureEngine:
    """Computes a frozen classifier's pooled features on TensorFlow (float32) or OpenVINO
    (bfloat16), chosen once, on first use, by `engine`.

    Args:
        model: the tlkit classifier (its backbone frozen).
        engine: one of `ENGINES`: `auto` (OpenVINO bfloat16 if it is installed, its CPU has
            BF16, and on a sample its features agree with TensorFlow float32's and come
            faster; else TensorFlow float32), `tensorflow` (float32), or `openvino` (checked
            the same way, TensorFlow float32 when the check fails).
        verbose: print the choice and its measurements.
        cut: what it computes: see `feature_extractor`.
        min_cosine: least cosine similarity between a candidate's features and TensorFlow
            float32's, on every image of the sample, for the candidate to be used.

    Attributes (set by `choose`): `name` and `precision` of the engine in use, and `check`,
    a dict of the sample's measurements (None when there was no candidate to measure):
    `tensorflow_images_per_second`, and for a candidate tried `engine`, `precision`,
    `cosine` (the least over the sample) and `images_per_second`, or `error`.
    """

    def __init__(self, model, engine="auto", verbose=0, cut=None, min_cosine=ENGINE_MIN_COSINE):
        if engine not in ENGINES:
            raise ConfigError(f"`engine` must be one of {ENGINES}. Received: engine={engine!r}")
        check_number("min_cosine", min_cosine, -1.0, 1.0)
        self.min_cosine = float(min_cosine)
        self.extractor = feature_extractor(model, cut)
        self.requested = engine
        self.verbose = verbose
        self.name, self.precision, self.check = None, None, None
        # Traced once for any batch size: the sample, full batches and the last one.
        self._tensorflow = tf.function(
            lambda batch: self.extractor(batch, training=False),
            input_signature=[tf.TensorSpec([None, *self.extractor.input_shape[1:]],
                                           tf.float32)])
        self._forward = None

    def candidates(self):
        """`(engine, precision)` pairs this engine may compute with, preferred first."""
        if self.name is not None:
            return [(self.name, self.precision)]
        tensorflow = ("tensorflow", "float32")
        if self.requested == "tensorflow" or not _openvino_has_bf16():
            return [tensorflow]
        return [("openvino", "bfloat16"), tensorflow]

    def choose(self, images, count):
        """Picks the engine (once) for `count` feature vectors, checking a candidate on the
        first `ENGINE_SAMPLE` of `images` (uint8 or float32 pixels)."""
        if self.name is not None:
            return
        candidates = self.candidates()
        self.name, self.precision, self._forward = "tensorflow", "float32", self._run_tensorflow
        if len(candidates) == 1 or not len(images):
            return
        sample = np.asarray(images[:ENGINE_SAMPLE], np.float32)
        reference, tensorflow_seconds = _timed_twice(self._run_tensorflow, sample)
        self.check = {"tensorflow_images_per_second": len(sample) / tensorflow_seconds}
        if self.requested == "auto" and \
                tensorflow_seconds / len(sample) * count < engine_min_seconds():
            return
        try:
            candidate = _openvino_forward(self.extractor, sample.shape[1:])
            features, candidate_seconds = _timed_twice(candidate, sample)
        except Exception as e:  # any failure of the optional engine means TensorFlow
            self.check["error"] = f"{type(e).__name__}: {e}"
            return
        cosine = float(np.min(_cosines(features, reference)))
        self.check.update(engine="openvino", precision="bfloat16", cosine=cosine,
                          images_per_second=len(sample) / candidate_seconds)
        if cosine >= self.min_cosine and candidate_seconds < tensorflow_seconds:
            self.name, self.precision, self._forward = "openvino", "bfloat16", candidate
        if self.verbose:
            print(f"[features] {self.name} {self.precision}: OpenVINO bfloat16 "
                  f"{self.check['images_per_second']:.1f} img/s, cosine {cosine:.6f}; "
                  f"TensorFlow float32 {self.check['tensorflow_images_per_second']:.1f} img/s")

    def __call__(self, batch):
        """Features of a float32 batch (a tensor or array) as a numpy array; `choose` first
        (TensorFlow float32 if it was not called)."""
        if self._forward is None:
            self.choose([], 0)
        return self._forward(batch)

    def _run_tensorflow(self, batch):
        return self._tensorflow(tf.convert_to_tensor(batch, tf.float32)).numpy()


def _openvino_has_bf16():
    try:
        import openvino
    except ImportError:
        return False
    try:
        return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def _openvino_forward(extractor, image_shape):
    """The extractor converted to OpenVINO and compiled for the CPU in bfloat16."""
    import openvino

    traced = tf.function(lambda batch: extractor(batch, training=False)).get_concrete_function(
        tf.TensorSpec([None, *image_shape], tf.float32))
    compiled = openvino.Core().compile_model(openvino.convert_model(traced), "CPU",
                                             {"INFERENCE_PRECISION_HINT": "bf16"})
    request, output = compiled.create_infer_request(), compiled.output(0)

    def forward(batch):
        return np.asarray(request.infer([np.asarray(batch, np.float32)])[output], np.float32)

    return forward


def _timed_twice(forward, batch):
    """`forward(batch)` and the seconds of its second run (the first warms it up)."""
    forward(batch)
    started = time.perf_counter()
    out = forward(batch)
    return out, time.perf_counter() - started


def _cosines(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


def compute_features(engine, images, augmenter=None, views=1, batch_size=64, verbose=1):
    """Runs the extractor over uint8 images, `views` times through `augmenter`.

    Args:
        engine: a `FeatureEngine`.
        images: uint8 array `(n, size, size, 3)`.
        augmenter: augmentation model applied with `training=True`, or None.
        views: number of (augmented) views per image; 1 without an augmenter.
        batch_size: images per forward pass.
        verbose: 0 silent, else a progress bar.

    Returns:
        float32 array `(views, n, *feature shape)`.
    """
    views = views if augmenter is not None else 1
    total = views * len(images)
    progbar = keras.utils.Progbar(total, unit_name="image") if verbose and total else None

    engine.choose(images, total)

    @tf.function(reduce_retracing=True)
    def augment(batch):
        return augmenter(batch, training=True)

    out, done = [], 0
    for view in range(views):
        rows = []
        for start in range(0, len(images), batch_size):
            batch = tf.constant(images[start:start + batch_size], tf.float32)
            rows.append(engine(augment(batch) if augmenter is not None else batch))
            done += len(batch)
            if progbar is not None:
                progbar.update(done)
        out.append(np.concatenate(rows) if rows else
                   np.zeros((0, *engine.extractor.output_shape[1:]), np.float32))
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
    computed_by: tuple = ("tensorflow", "float32")  # (engine, precision) that computed them


def split_features(model, split, digests, cache, settings, augmenter=None, views=1,
                   batch_size=64, verbose=1, seed=None, engine=None):
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
        engine: the `FeatureEngine` of `model` to compute with (share one between the splits
            of a run: it chooses once); None: TensorFlow float32. Its engine and precision
            are part of the cache key; features cached by any engine it may use are reused.

    Returns:
        `SplitFeatures`.
    """
    views = views if augmenter is not None else 1
    engine = engine or FeatureEngine(model, "tensorflow")
    backbone_id = weights_digest(model.get_layer("backbone"))

    def key(name, precision):
        return feature_key(digests, backbone=backbone_id, views=views, seed=seed,
                           augmented=augmenter is not None, engine=name, precision=precision,
                           **settings)

    for candidate in engine.candidates() if cache is not None else []:
        stored = cache.get(key(*candidate))
        if stored is not None and stored.shape[:2] == (views, len(split)):
            return SplitFeatures(stored, split.labels, True, candidate)
    features = compute_features(engine, split.images, augmenter, views, batch_size, verbose)
    if cache is not None:
        cache.put(key(engine.name, engine.precision), features)
    return SplitFeatures(features, split.labels, False, (engine.name, engine.precision))


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
