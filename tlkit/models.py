"""A tlkit classifier: preprocessing -> backbone -> head, with stable layer names.

    images (float32, 0..255) -> "preprocess" -> "backbone" -> "pooler" -> "output_dropout"
    -> "predictions" (softmax, or sigmoid for a multi-label model; float32)

Freezing, export and inspection find layers by these names. The pooler is a global average
pooling and is only added when the backbone returns a feature map.
"""

import json
import os
import re
import weakref
import zipfile
from pathlib import Path


import keras
import numpy as np
import tensorflow as tf
from keras import layers

from tlkit.backbones import get_backbone
from tlkit.errors import ConfigError, WeightsError
from tlkit.layers import Preprocess
from tlkit.validation import check_bool, check_number

INPUT_NAME = "images"


WEIGHTS_SPECIAL = ("imagenet", "none")


def build_backbone(backbone, image_size, weights="none"):
    """Builds a registered backbone with its weights: random, ImageNet or from a file.

    Args:
        backbone: a registered backbone name.
        image_size: side of the square input.
        weights: `"none"` (random initialisation), `"imagenet"` (Keras's download and cache
            in `~/.keras/models`, for backbones that have them) or the path of a weights file
            (a tlkit run's `backbone.weights.h5`, or a Keras application's `_notop.h5`).

    Returns:
        The backbone, a `keras.Model` named `"backbone"`.

    Raises:
        WeightsError: if the weights cannot be downloaded or loaded; the message says which
            file was wanted, where to put it, and the alternatives.
        ConfigError: if `weights="imagenet"` for a backbone that has no ImageNet weights.
    """
    spec = get_backbone(backbone)
    input_shape = (image_size, image_size, 3)
    if weights == "imagenet":
        if not spec.imagenet:
            raise ConfigError(
                f"Backbone {spec.name!r} has no ImageNet weights: use `weights='none'` or a "
                f"weights file. Received: weights={weights!r}"
            )
        try:
            return spec.build(input_shape, "imagenet")
        except Exception as e:  # Keras raises a bare Exception on a failed download
            raise _download_error(spec, e) from None
    model = spec.build(input_shape, None)
    if weights not in WEIGHTS_SPECIAL:
        _load_weights_file(model, spec, weights)
    return model


def _download_error(spec, error):
    message = str(error)
    url = re.search(r"https?://\S+?\.h5", message)
    if url is None:
        return WeightsError(f"Could not build backbone {spec.name!r} with ImageNet weights: "
                            f"{message}")
    url = url.group(0)
    target = Path(_keras_home()) / "models" / url.rsplit("/", 1)[-1]
    return WeightsError(
        f"Could not download the ImageNet weights of backbone {spec.name!r} ({message}).\n"
        f"Keras wanted: {url}\n"
        f"Fix: download that file on a connected machine and put it at {target} (Keras's "
        "cache; it is used from there without a download), or set `weights` to the path of "
        "a weights file, or `weights='none'` to start from random weights (every layer is "
        "then trained), or `backbone='scratch'` for tlkit's from-scratch CNN."
    )


def _keras_home():
    """Where Keras keeps its downloads, decided as Keras does: `$KERAS_HOME`, else `~/.keras`
    (`/tmp/.keras` when the home folder is read-only)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def _load_weights_file(model, spec, path):
    if not os.path.isfile(path):
        raise WeightsError(
            f"`weights` must be 'imagenet', 'none' or an existing weights file. "
            f"Received: weights={path!r} (no such file)"
        )
    try:
        model.load_weights(path)
    except Exception as e:  # Keras raises ValueError, KeyError or h5py errors on mismatch
        raise WeightsError(
            f"Cannot load weights file {path!r} into backbone {spec.name!r} at this image "
            f"size: {e}. The file must come from the same backbone (for the scratch CNN: "
            "the same number of blocks, set by the image size)."
        ) from None


def build_classifier(backbone, num_classes, image_size, dropout=None, weights="none",
                     backbone_model=None, multi_label=False):
    """Builds a classifier for `num_classes` classes on `image_size` x `image_size` RGB images.

    Args:
        backbone: a registered backbone name (see `tlkit.backbones.list_backbones`).
        num_classes: number of classes, at least 2.
        image_size: side of the square input, at least the backbone's `min_size`.
        dropout: head dropout rate; `None` uses the backbone's default.
        weights: backbone weights, see `build_backbone`.
        backbone_model: an already built backbone to use instead of building one.
        multi_label: a sigmoid output layer (one independent probability per class, for
            binary cross-entropy) instead of a softmax; the layer is `predictions` either
            way.

    Returns:
        A functional `keras.Model` named `"tlkit_<backbone>"` that maps float32 images with
        pixel values 0..255 to class probabilities.

    Example:

    >>> model = build_classifier("lenet5", num_classes=10, image_size=32)
    >>> model.count_params()
    62006
    """
    spec = get_backbone(backbone)
    check_number("num_classes", num_classes, 2, integer=True)
    check_number("image_size", image_size, 1, integer=True)
    if image_size < spec.min_size:
        raise ConfigError(
            f"`image_size` must be >= {spec.min_size} for backbone {spec.name!r}. "
            f"Received: image_size={image_size!r}"
        )
    dropout = spec.default_dropout if dropout is None else dropout
    check_number("dropout", dropout, 0.0, 0.95)
    check_bool("multi_label", multi_label)
    if backbone_model is None:
        backbone_model = build_backbone(spec.name, image_size, weights)

    inputs = keras.Input(shape=(image_size, image_size, 3), name=INPUT_NAME)
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    x = backbone_model(x)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="pooler")(x)
    x = layers.Dropout(dropout, name="output_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="sigmoid" if multi_label else "softmax", dtype="float32",
        name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"tlkit_{spec.name}")


def copy_classifier(model, dtype_policy="float32"):
    """A copy of a tlkit classifier with the same weights, built in the current
    `tf.distribute` scope (so its variables belong to that strategy).

    Args:
        model: a tlkit classifier (functional, tlkit and Keras layers only).
        dtype_policy: the Keras dtype policy its layers compute in: `"float32"`,
            `"mixed_bfloat16"` or `"mixed_float16"`. The `predictions` layer stays float32
            whatever the policy, so that the softmax and the loss are computed in float32
            (Keras's mixed-precision rule for the output layer); variables are float32
            under every policy.

    Returns:
        The new `keras.Model`, its layers' `trainable` flags as in `model`.

    Example:

    >>> mixed = copy_classifier(model, "mixed_bfloat16")
    >>> mixed.get_layer("backbone").compute_dtype, mixed.get_layer("predictions").compute_dtype
    ('bfloat16', 'float32')
    """
    copy = keras.Model.from_config(_with_policy(model.get_config(), dtype_policy))
    copy.set_weights(model.get_weights())
    return copy


def _with_policy(config, policy, layer=None):
    """`config` with every dtype policy set to `policy`, except the `predictions` layer's."""
    if isinstance(config, list):
        return [_with_policy(item, policy, layer) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy" and layer != "predictions":
        return {**config, "config": {**config["config"], "name": policy}}
    name = config.get("name")
    layer = name if isinstance(name, str) else layer
    return {key: _with_policy(value, policy, layer) for key, value in config.items()}


def load_keras_model(path):
    """Loads a tlkit `.keras` file in Keras's safe mode (no arbitrary code is run).

    Args:
        path: path of a `.keras` file written by tlkit.

    Returns:
        The `keras.Model`, uncompiled.
    """
    return keras.models.load_model(path, compile=False, safe_mode=True)


def keras_model_file(path):
    """The `.keras` file a path names: `path` itself, or the `model.keras` in a run folder."""
    path = Path(path)
    return path / "model.keras" if path.is_dir() else path


def describe_keras_file(path):
    """Reads the backbone name and input size of a tlkit `.keras` file (or run folder)
    without loading its weights.

    Returns:
        `(backbone name, image_size)`.

    Raises:
        ConfigError: if the file is not a tlkit `.keras` model.
    """
    model_file = keras_model_file(path)
    try:
        with zipfile.ZipFile(model_file) as archive:
            config = json.loads(archive.read("config.json"))["config"]
        backbone = config["name"].removeprefix("tlkit_")
        image_size = int(config["layers"][0]["config"]["batch_shape"][1])
    except (OSError, KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile):
        raise ConfigError(
            "`init_from` must be a tlkit run folder or its model.keras. "
            f"Received: init_from={str(path)!r}"
        ) from None
    get_backbone(backbone)
    return backbone, image_size


def load_for_continuation(path):
    """Loads a tlkit model to continue training: a run folder or its `model.keras`.

    Args:
        path: a run folder (holding `model.keras` and `labels.txt`) or a `.keras` file with
            a `labels.txt` beside it.

    Returns:
        `(model, class_names)`.

    Raises:
        ConfigError: if the path holds no tlkit model or no class list.
    """
    model_file = keras_model_file(path)
    labels_file = model_file.parent / "labels.txt"
    if model_file.suffix != ".keras" or not model_file.is_file() or not labels_file.is_file():
        raise ConfigError(
            "`init_from` must be a tlkit run folder or its model.keras, with labels.txt "
            f"beside it. Received: init_from={str(path)!r}"
        )
    model = load_keras_model(model_file)
    if "backbone" not in [layer.name for layer in model.layers]:
        raise ConfigError(f"`init_from` model {str(model_file)!r} is not a tlkit classifier "
                          "(it has no layer named 'backbone').")
    return model, labels_file.read_text().splitlines()


def extend_classifier(model, old_classes, new_classes, dropout=None, multi_label=False):
    """Adapts a trained classifier to a class list that keeps every old class and may add
    new ones: the backbone and the old head rows are kept, new rows start fresh.

    A head of the other kind (a softmax model continued as multi-label, or a sigmoid one as
    single-label) is not carried over: the backbone is kept and the head starts fresh, so
    the old classes need not all be present then.

    Args:
        model: a tlkit classifier trained on `old_classes`.
        old_classes: its class names, in output order.
        new_classes: the new class names, in output order (a superset of `old_classes`).
        dropout: head dropout rate; `None` keeps the model's.
        multi_label: whether the new head is a sigmoid per class (else a softmax).

    Returns:
        `model` itself when the class lists and the head's kind are equal, else a new
        classifier that shares the backbone layer.

    Raises:
        ConfigError: if an old class is missing from `new_classes` (heads of one kind).
    """
    check_bool("multi_label", multi_label)
    same_kind = is_multi_label(model) == multi_label
    missing = [c for c in old_classes if c not in new_classes]
    if missing and same_kind:
        raise ConfigError(
            f"The data has no folder for classes {missing} that the `init_from` model "
            "predicts. Continue training with every old class present (new ones may be added)."
        )
    if same_kind and list(old_classes) == list(new_classes):
        return model
    spec = get_backbone(model.name.removeprefix("tlkit_"))
    if dropout is None:
        dropout = model.get_layer("output_dropout").rate
    new_model = build_classifier(spec.name, len(new_classes), model.input_shape[1],
                                 dropout, backbone_model=model.get_layer("backbone"),
                                 multi_label=multi_label)
    if not same_kind:
        return new_model
    kernel, bias = model.get_layer("predictions").get_weights()
    new_kernel, new_bias = new_model.get_layer("predictions").get_weights()
    for old_index, name in enumerate(old_classes):
        new_kernel[:, new_classes.index(name)] = kernel[:, old_index]
        new_bias[new_classes.index(name)] = bias[old_index]
    new_model.get_layer("predictions").set_weights([new_kernel, new_bias])
    return new_model


def is_multi_label(model):
    """Whether a tlkit classifier's `predictions` layer is a sigmoid per class."""
    return model.get_layer("predictions").activation.__name__ == "sigmoid"


def predict_probabilities(model, images, batch_size=256):
    """Class probabilities for a uint8 or float array of images, in batches."""
    if not len(images):
        return np.zeros((0, model.output_shape[-1]), np.float32)
    step = traced_function(model, "predict", lambda m, x: m(x, training=False))
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return np.concatenate([step(tf.cast(b, tf.float32)).numpy() for b in dataset])


_COMPILED = weakref.WeakKeyDictionary()


def traced_function(model, kind, fn):
    """One `tf.function` of `fn(model, *args)` per model and `kind`, traced once and kept as
    long as the model lives (the cache holds the model weakly).

    Args:
        model: the `keras.Model` passed to `fn` as its first argument.
        kind: a name for what `fn` does ("predict", "eval"): one function per kind.
        fn: called as `fn(model, *args)` inside the graph.

    Returns:
        A `tf.function` taking `*args`.
    """
    functions = _COMPILED.setdefault(model, {})
    if kind not in functions:
        reference = weakref.ref(model)  # a strong one here would keep the model alive forever
        functions[kind] = tf.function(lambda *args: fn(reference(), *args),
                                      reduce_retracing=True)
    return functions[kind]
