"""The backbone registry: one table from a name to everything tlkit knows about a network.

A backbone is the feature extractor of a classifier: it takes preprocessed images and returns
a feature map (or vector); `tlkit.models` adds the preprocessing in front and the head on top.
Each `BackboneSpec` says how to build it, what input size it expects by default and at least,
which preprocessing it needs and its default head dropout. Backbones are looked up by name
with `get_backbone`, never chosen by an if/elif ladder; `register_backbone` adds one.
"""

import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
from keras import layers

from tlkit.errors import ConfigError
from tlkit.layers import PREPROCESSING_MODES


@dataclass(frozen=True)
class BackboneSpec:
    """Everything tlkit needs to know about one backbone."""

    name: str  # registry key, as typed on the command line
    build: Callable[..., keras.Model]  # build(input_shape) -> keras.Model named "backbone"
    default_size: int  # image side used when `image_size="auto"`
    min_size: int  # smallest image side the network accepts
    preprocessing: str  # one of tlkit.layers.PREPROCESSING_MODES
    default_dropout: float  # head dropout when `dropout="auto"`
    description: str  # one line for `--help` and listings

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(
                f"`preprocessing` must be one of {list(PREPROCESSING_MODES)}. "
                f"Received: preprocessing={self.preprocessing!r}"
            )


_REGISTRY = {}


def register_backbone(spec):
    """Adds a `BackboneSpec` to the registry; refuses to replace an existing name.

    Args:
        spec: the `BackboneSpec` to add.

    Returns:
        The spec, so the call can be used as an expression.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones():
    """Returns the registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name):
    """Returns the `BackboneSpec` registered under `name`.

    Raises:
        ConfigError: if no backbone has that name; the message lists those that exist.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"`backbone` must be one of {list_backbones()}. Received: backbone={name!r}"
        ) from None


# --- From-scratch networks -------------------------------------------------------------------


def scratch_blocks(image_size):
    """Number of conv blocks of the scratch CNN: halve the image until it is about 4 pixels
    across, with 2 to 5 blocks."""
    blocks, side = 0, image_size
    while side >= 8 and blocks < 5:
        side //= 2
        blocks += 1
    return max(blocks, 2)


def build_scratch_cnn(input_shape, base_filters=32, block_dropout=0.1):
    """A VGG-style CNN trained from scratch, sized by the image size.

    Each block is two conv-BN-ReLU layers, a 2x2 max pooling and dropout; the number of
    blocks (`scratch_blocks`) halves the image until it is about 4 pixels across, and the
    filters double per block from `base_filters`, up to 256.

    Args:
        input_shape: `(height, width, channels)`.
        base_filters: filters of the first block.
        block_dropout: dropout rate after each block.

    Returns:
        A `keras.Sequential` named `"backbone"` that outputs the last feature map.
    """
    stack = [keras.Input(shape=input_shape)]
    for block in range(1, scratch_blocks(min(input_shape[:2])) + 1):
        filters = min(base_filters * 2 ** (block - 1), 256)
        for conv in (1, 2):
            prefix = f"block{block}_conv{conv}"
            stack += [
                layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix),
                layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn"),
                layers.ReLU(name=f"{prefix}_relu"),
            ]
        stack += [
            layers.MaxPooling2D(2, name=f"block{block}_pool"),
            layers.Dropout(block_dropout, name=f"block{block}_dropout"),
        ]
    return keras.Sequential(stack, name="backbone")


def build_lenet5(input_shape=(32, 32, 1)):
    """LeNet-5 (LeCun et al., 1998) up to its 84-unit F6 layer.

    C1: 6 5x5 convolutions (tanh) -> S2: 2x2 average pooling -> C3: 16 5x5 convolutions ->
    S4: 2x2 average pooling -> C5: 120 5x5 convolutions (1x1 output at 32x32) -> F6: 84 units.
    With tlkit's 10-way `predictions` layer on top it has the textbook 61,706 parameters on a
    32x32x1 input (62,006 on RGB). C3 here connects every S2 map, as most modern versions do.

    Args:
        input_shape: `(height, width, channels)`, at least 32x32.

    Returns:
        A `keras.Sequential` named `"backbone"` that outputs the 84 F6 activations.
    """
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(6, 5, activation="tanh", name="c1"),
            layers.AveragePooling2D(2, name="s2"),
            layers.Conv2D(16, 5, activation="tanh", name="c3"),
            layers.AveragePooling2D(2, name="s4"),
            layers.Conv2D(120, 5, activation="tanh", name="c5"),
            layers.GlobalAveragePooling2D(name="c5_pool"),
            layers.Dense(84, activation="tanh", name="f6"),
        ],
        name="backbone",
    )


register_backbone(
    BackboneSpec(
        name="scratch",
        build=build_scratch_cnn,
        default_size=32,
        min_size=16,
        preprocessing="unit",
        default_dropout=0.3,
        description="VGG-style conv-BN-ReLU-pool CNN trained from scratch, sized by the image",
    )
)
register_backbone(
    BackboneSpec(
        name="lenet5",
        build=build_lenet5,
        default_size=32,
        min_size=32,
        preprocessing="unit",
        default_dropout=0.0,
        description="LeNet-5 (LeCun 1998): tanh convolutions and average pooling",
    )
)


def describe_backbones():
    """Returns `(name, description)` pairs for every registered backbone."""
    return [(name, _REGISTRY[name].description) for name in list_backbones()]

