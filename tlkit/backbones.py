"""The backbone registry: one table from a name to everything tlkit knows about a network.

A backbone is the feature extractor of a classifier: it takes preprocessed images and returns
a feature map (or vector); `tlkit.models` adds the preprocessing in front and the head on top.
Each `BackboneSpec` says how to build it, what input size it expects by default and at least,
which preprocessing it needs and its default head dropout. Backbones are looked up by name
with `get_backbone`, never chosen by an if/elif ladder; `register_backbone` adds one.
"""

import re
import warnings
from dataclasses import dataclass
from typing import Callable


import keras
from keras import layers

from tlkit.errors import ConfigError
from tlkit.layers import PREPROCESSING_MODES


@dataclass(frozen=True)
class BackboneSpec:
    """Everything tlkit needs to know about one backbone."""

    name: str  # registry key, as typed on the command line
    build: Callable[..., keras.Model]  # build(input_shape, weights) -> Model named "backbone"
    default_size: int  # image side used when `image_size="auto"`
    min_size: int  # smallest image side the network accepts
    preprocessing: str  # one of tlkit.layers.PREPROCESSING_MODES
    default_dropout: float  # head dropout when `dropout="auto"`
    description: str  # one line for `--help` and listings
    unfreeze_groups: tuple = ()  # (group name, layer-name regex) pairs, from the top down
    imagenet: bool = False  # `build` can load ImageNet weights (weights="imagenet")

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


def build_scratch_cnn(input_shape, weights=None, base_filters=32, block_dropout=0.1):
    """A VGG-style CNN trained from scratch, sized by the image size.

    Each block is two conv-BN-ReLU layers, a 2x2 max pooling and dropout; the number of
    blocks (`scratch_blocks`) halves the image until it is about 4 pixels across, and the
    filters double per block from `base_filters`, up to 256.

    Args:
        input_shape: `(height, width, channels)`.
        weights: must be None (random initialisation); files load through `load_weights`.
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


def build_lenet5(input_shape=(32, 32, 1), weights=None):
    """LeNet-5 (LeCun et al., 1998) up to its 84-unit F6 layer.

    C1: 6 5x5 convolutions (tanh) -> S2: 2x2 average pooling -> C3: 16 5x5 convolutions ->
    S4: 2x2 average pooling -> C5: 120 5x5 convolutions (1x1 output at 32x32) -> F6: 84 units.
    With tlkit's 10-way `predictions` layer on top it has the textbook 61,706 parameters on a
    32x32x1 input (62,006 on RGB). C3 here connects every S2 map, as most modern versions do.

    Args:
        input_shape: `(height, width, channels)`, at least 32x32.
        weights: must be None (random initialisation); files load through `load_weights`.

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
        unfreeze_groups=tuple((f"block{i}", rf"^block{i}_") for i in range(5, 0, -1)),
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
        unfreeze_groups=(("f6", "^f6$"), ("c5", "^c5"), ("c3", "^c3$"), ("c1", "^c1$")),
    )
)


def describe_backbones():
    """Returns `(name, description)` pairs for every registered backbone."""
    return [(name, _REGISTRY[name].description) for name in list_backbones()]



# --- Pretrained networks from keras.applications ----------------------------------------------


def _application(constructor, **extra):
    """A `build` function for a keras.applications constructor, without its top."""

    def build(input_shape, weights=None):
        with warnings.catch_warnings():
            # Convolution weights fit any input size; Keras warns when it has no file for
            # the size asked (MobileNet's 128-224 px) and loads its 224 px file.
            warnings.filterwarnings("ignore", message=".*will be loaded as the default")
            model = constructor(include_top=False, weights=weights, input_shape=input_shape,
                                **extra)
        model.name = "backbone"
        return model

    build.__name__ = f"build_{constructor.__name__.lower()}"
    build.__doc__ = f"`keras.applications.{constructor.__name__}` without its classifier top."
    return build


def _numbered(prefix, numbers, first_extra="", last_extra=""):
    """Groups `prefix<N>` from the top; the top group also takes `first_extra` layers and the
    bottom one `last_extra` layers (stems and final convolutions)."""
    groups = []
    for position, number in enumerate(numbers):
        pattern = f"{prefix}{number}"
        if position == 0 and first_extra:
            pattern = f"{pattern}|{first_extra}"
        if position == len(numbers) - 1 and last_extra:
            pattern = f"{pattern}|{last_extra}"
        groups.append((f"{prefix.strip('^_')}{number}", f"^({pattern})"))
    return tuple(groups)


def _mobilenet_groups():
    """MobileNet v1's 13 depthwise-separable blocks from the top: the two 1024-channel
    blocks one by one, then pairs (the six 512-channel blocks in three), and the stem with
    block 1 last. Each block owns its `conv_dw_N`, `conv_pw_N` and `conv_pad_N` layers."""
    spans = ((13,), (12,), (10, 11), (8, 9), (6, 7), (4, 5), (2, 3))
    groups = [(f"block{span[0]}", rf"^conv_(dw|pw|pad)_({'|'.join(map(str, span))})(_|$)")
              for span in spans]
    return tuple(groups) + (("stem", r"^(conv1|conv_(dw|pw)_1)(_|$)"),)


_APPLICATIONS = (
    dict(name="vgg16", constructor=keras.applications.VGG16, preprocessing="caffe",
         groups=_numbered("block", range(5, 0, -1)),
         description="VGG16 (ImageNet), 14.7M parameters without its top"),
    dict(name="resnet50", constructor=keras.applications.ResNet50, preprocessing="caffe",
         groups=_numbered("conv", range(5, 0, -1), last_extra="pool1_"),
         description="ResNet50 (ImageNet), 23.6M parameters without its top"),
    dict(name="mobilenet", constructor=keras.applications.MobileNet, preprocessing="tf",
         groups=_mobilenet_groups(),
         description="MobileNet v1 (ImageNet), 3.2M parameters, depthwise separable, fast on CPUs"),
    dict(name="mobilenet_v2", constructor=keras.applications.MobileNetV2, preprocessing="tf",
         groups=(("block16", "^(block_16_|Conv_1|out_relu)"), ("block13", "^block_1[345]_"),
                 ("block10", "^block_1[012]_"), ("block6", "^block_[6789]_"),
                 ("block3", "^block_[345]_"), ("block1", "^block_[12]_"),
                 ("stem", "^(Conv1|bn_Conv1|expanded_conv)")),
         description="MobileNetV2 (ImageNet), 2.3M parameters, fast on CPUs and phones"),
    dict(name="efficientnet_b0", constructor=keras.applications.EfficientNetB0,
         preprocessing="none", groups=_numbered("block", range(7, 0, -1), "top_", "stem_"),
         description="EfficientNetB0 (ImageNet), 4.0M parameters, normalises inside"),
    dict(name="efficientnetv2_b0", constructor=keras.applications.EfficientNetV2B0,
         preprocessing="none", groups=_numbered("block", range(6, 0, -1), "top_", "stem_"),
         description="EfficientNetV2B0 (ImageNet), 5.9M parameters, normalises inside"),
    dict(name="convnext_tiny", constructor=keras.applications.ConvNeXtTiny,
         preprocessing="none",
         groups=(("stage3", r".*(stage_3|downsampling_block_2|^layer_normalization)"),
                 ("stage2", r".*(stage_2|downsampling_block_1)"),
                 ("stage1", r".*(stage_1|downsampling_block_0)"),
                 ("stage0", r".*(stage_0|_stem)")),
         description="ConvNeXt-Tiny (ImageNet), 27.8M parameters, normalises inside"),
)

for _app in _APPLICATIONS:
    register_backbone(
        BackboneSpec(
            name=_app["name"],
            build=_application(_app["constructor"]),
            default_size=224,
            min_size=32,
            preprocessing=_app["preprocessing"],
            default_dropout=0.2,
            description=_app["description"],
            unfreeze_groups=_app["groups"],
            imagenet=True,
        )
    )


def unfreeze_groups(spec, backbone):
    """The backbone's layers in unfreeze groups, from the top down.

    A layer belongs to the first group whose pattern matches its name; groups that match no
    layer (for example block5 of a 3-block scratch CNN) are left out. Layers in no group
    (inputs, fixed rescaling) are never unfrozen by a staged schedule.

    Args:
        spec: the backbone's `BackboneSpec`.
        backbone: the built backbone model.

    Returns:
        A list of `(group name, [layers])`, top group first.
    """
    members = {name: [] for name, _ in spec.unfreeze_groups}
    patterns = [(name, re.compile(pattern)) for name, pattern in spec.unfreeze_groups]
    for layer in backbone.layers:
        group = next((name for name, p in patterns if p.match(layer.name)), None)
        if group is not None:
            members[group].append(layer)
    return [(name, members[name]) for name, _ in spec.unfreeze_groups if members[name]]
