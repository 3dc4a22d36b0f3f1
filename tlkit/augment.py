"""Training-time augmentation: Keras preprocessing layers in named presets.

The augmentation model runs in the training input pipeline only, on batches of float pixels
0..255, so validation, evaluation and the exported model never see it. Each preset is one row
of `PRESETS`; the flip direction is a separate setting because it depends on the data (flip
cats, never digits or text).
"""



import keras
from keras import layers

from tlkit.config import AUGMENT_PRESETS, FLIP_MODES
from tlkit.validation import check_choice

PRESETS = {
    "none": None,
    "light": dict(rotation=0.03, zoom=0.05, translation=0.05, contrast=0.0, brightness=0.0),
    "standard": dict(rotation=0.06, zoom=0.1, translation=0.1, contrast=0.1, brightness=0.1),
    "heavy": dict(rotation=0.12, zoom=0.2, translation=0.15, contrast=0.3, brightness=0.3),
}
"""Strength of each transform per preset. rotation: fraction of a full turn; zoom and
translation: fraction of the image side; contrast and brightness: fraction of the range."""

_TRANSFORMS = {
    "rotation": lambda s, seed: layers.RandomRotation(s, fill_mode="constant", seed=seed),
    "zoom": lambda s, seed: layers.RandomZoom(s, fill_mode="constant", seed=seed),
    "translation": lambda s, seed: layers.RandomTranslation(s, s, fill_mode="constant", seed=seed),
    "contrast": lambda s, seed: layers.RandomContrast(s, value_range=(0, 255), seed=seed),
    "brightness": lambda s, seed: layers.RandomBrightness(s, value_range=(0, 255), seed=seed),
}


def build_augmenter(preset="standard", flip="horizontal", seed=None):
    """Builds the augmentation model for a preset.

    Args:
        preset: one of `tlkit.config.AUGMENT_PRESETS`.
        flip: one of `tlkit.config.FLIP_MODES`.
        seed: seed of the random transforms, for repeatable runs.

    Returns:
        A `keras.Sequential` named `"augmentation"` that maps float images 0..255 to
        augmented images 0..255 when called with `training=True`, or `None` when there is
        nothing to do (`preset="none"` and `flip="none"`).

    Example:

    >>> augmenter = build_augmenter("light", flip="none", seed=1)
    >>> [layer.name for layer in augmenter.layers]
    ['rotation', 'zoom', 'translation']
    """
    check_choice("augment", preset, AUGMENT_PRESETS)
    check_choice("flip", flip, FLIP_MODES)
    strength = PRESETS[preset] or {}
    stack = [] if flip == "none" else [layers.RandomFlip(flip, seed=seed, name="flip")]
    for offset, (name, make) in enumerate(_TRANSFORMS.items(), start=1):
        if strength.get(name):
            layer = make(strength[name], None if seed is None else seed + offset)
            layer.name = name
            stack.append(layer)
    if not stack:
        return None
    return keras.Sequential(stack, name="augmentation")
