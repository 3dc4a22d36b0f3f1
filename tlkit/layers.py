"""Serializable layers tlkit puts inside its models.

They are registered with Keras, so a tlkit `.keras` file loads with `safe_mode=True` (no
Lambda layers) once `tlkit` is imported.
"""



import keras
from keras import ops

PREPROCESSING_MODES = ("unit", "caffe", "tf", "torch", "none")
"""How pixel values 0..255 become a backbone's input:

- `unit`: scale to 0..1 (the from-scratch models).
- `caffe`: RGB -> BGR, then subtract the ImageNet mean per channel, no scaling (VGG16,
  ResNet50).
- `tf`: scale to -1..1 (MobileNetV2, Xception, InceptionV3).
- `torch`: scale to 0..1, then normalise with the ImageNet mean and standard deviation.
- `none`: pass through (backbones that normalise inside, such as EfficientNet and ConvNeXt).
"""

_IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
_IMAGENET_MEAN_UNIT = (0.485, 0.456, 0.406)
_IMAGENET_STD_UNIT = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="tlkit")
class Preprocess(keras.layers.Layer):
    """Maps pixel values 0..255 to a backbone's expected input (see `PREPROCESSING_MODES`).

    Args:
        mode: one of `PREPROCESSING_MODES`.
        **kwargs: base layer arguments such as `name`.

    Example:

    >>> Preprocess("unit")(keras.ops.full((1, 2, 2, 3), 255.0)).numpy().max()
    1.0
    """

    def __init__(self, mode="unit", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"`mode` must be one of {list(PREPROCESSING_MODES)}. Received: mode={mode!r}"
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = ops.flip(x, axis=-1)
            return bgr - ops.convert_to_tensor(_IMAGENET_MEAN_RGB[::-1], dtype=x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_UNIT, dtype=x.dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD_UNIT, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
