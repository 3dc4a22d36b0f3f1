"""A tlkit classifier: preprocessing -> backbone -> head, with stable layer names.

    images (float32, 0..255) -> "preprocess" -> "backbone" -> "pooler" -> "output_dropout"
    -> "predictions" (softmax, float32)

Freezing, export and inspection find layers by these names. The pooler is a global average
pooling and is only added when the backbone returns a feature map.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
from keras import layers

from tlkit.backbones import get_backbone
from tlkit.config import _check_number
from tlkit.errors import ConfigError
from tlkit.layers import Preprocess

INPUT_NAME = "images"


def build_classifier(backbone, num_classes, image_size, dropout=None):
    """Builds a classifier for `num_classes` classes on `image_size` x `image_size` RGB images.

    Args:
        backbone: a registered backbone name (see `tlkit.backbones.list_backbones`).
        num_classes: number of classes, at least 2.
        image_size: side of the square input, at least the backbone's `min_size`.
        dropout: head dropout rate; `None` uses the backbone's default.

    Returns:
        A functional `keras.Model` named `"tlkit_<backbone>"` that maps float32 images with
        pixel values 0..255 to class probabilities.

    Example:

    >>> model = build_classifier("lenet5", num_classes=10, image_size=32)
    >>> model.count_params()
    62006
    """
    spec = get_backbone(backbone)
    _check_number("num_classes", num_classes, 2, integer=True)
    _check_number("image_size", image_size, 1, integer=True)
    if image_size < spec.min_size:
        raise ConfigError(
            f"`image_size` must be >= {spec.min_size} for backbone {spec.name!r}. "
            f"Received: image_size={image_size!r}"
        )
    dropout = spec.default_dropout if dropout is None else dropout
    _check_number("dropout", dropout, 0.0, 0.95)

    inputs = keras.Input(shape=(image_size, image_size, 3), name=INPUT_NAME)
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    x = spec.build((image_size, image_size, 3))(x)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="pooler")(x)
    x = layers.Dropout(dropout, name="output_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"tlkit_{spec.name}")


def load_keras_model(path):
    """Loads a tlkit `.keras` file in Keras's safe mode (no arbitrary code is run).

    Args:
        path: path of a `.keras` file written by tlkit.

    Returns:
        The `keras.Model`, uncompiled.
    """
    return keras.models.load_model(path, compile=False, safe_mode=True)
