"""Grad-CAM: which part of an image made the model say what it said.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by the
average gradient of the class score with respect to it, sums the weighted channels and keeps
the positive part. tlkit computes it with one function, `make_gradcam`, used both inside the
export (the `explain` and `explain_images` signatures, so any TensorFlow service can ask for
a heatmap) and in Python (`tlkit.explain`). The default layer is the backbone's last layer
whose output is a spatial map larger than 1x1.
"""

import keras
import tensorflow as tf

from tlkit.errors import ConfigError


def spatial_layers(model):
    """Names of the backbone layers whose output is a feature map larger than 1x1, in order."""
    names = []
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = layer.output.shape
        if len(shape) == 4 and (shape[1] or 0) * (shape[2] or 0) > 1:
            names.append(layer.name)
    return names


def default_layer(model):
    """The layer Grad-CAM uses by default: the last backbone feature map larger than 1x1.

    Raises:
        ConfigError: if the backbone has no such layer.
    """
    names = spatial_layers(model)
    if not names:
        raise ConfigError("The backbone has no feature map larger than 1x1 for Grad-CAM; "
                          "use a larger image size.")
    return names[-1]


def make_gradcam(model, layer=None, forward=None):
    """Builds the Grad-CAM function of a tlkit classifier.

    Args:
        model: a tlkit classifier (layers `preprocess`, `backbone`, head layers).
        layer: name of a backbone layer with a spatial output; `None`: `default_layer`.
        forward: a function from float32 images (0..255) to the backbone's output, used
            when `layer` is the backbone's last layer; `None`: the model's `preprocess` and
            `backbone` layers. The export passes the traced forward pass of its
            `predict_images` signature, so both signatures share one graph.

    Returns:
        `(fn, layer_name)` where `fn(images, class_ids)` takes float32 images
        `(n, size, size, 3)` with pixels 0..255 and int64 class ids (`-1` for the top class)
        and returns a dict with `heatmaps` (float32 `(n, size, size)`, 0..1), `class_ids`
        (the explained class) and `probabilities` (the model's own: softmax, or sigmoid
        for a multi-label model).
    """
    layer = layer or default_layer(model)
    if layer not in spatial_layers(model):
        raise ConfigError(f"`layer` must be one of {spatial_layers(model)}. "
                          f"Received: layer={layer!r}")
    backbone = model.get_layer("backbone")
    preprocess = model.get_layer("preprocess")
    head = [model.get_layer(name) for name in ("pooler", "output_dropout")
            if name in [lyr.name for lyr in model.layers]]
    predictions = model.get_layer("predictions")
    # A multi-label head's probabilities are a sigmoid per label, a single-label one's the
    # softmax; Grad-CAM follows the logit of the explained class either way.
    activate = tf.nn.sigmoid if predictions.activation.__name__ == "sigmoid" else tf.nn.softmax
    size = model.input_shape[1]
    # `before` runs outside the gradient tape, `after` inside it, from `before`'s output to
    # (feature map, backbone output).
    if layer == backbone.layers[-1].name:  # the feature map is the backbone's output
        before = forward or (lambda images: backbone(preprocess(images), training=False))

        def after(output):
            return output, output
    else:
        before, features = preprocess, _feature_model(backbone, layer)

        def after(inputs):
            return features(inputs, training=False)

    def fn(images, class_ids):
        inputs = before(images)
        with tf.GradientTape() as tape:
            feature_map, output = after(inputs)
            tape.watch(feature_map)
            x = output
            for layer_ in head:
                x = layer_(x, training=False)
            logits = tf.matmul(x, predictions.kernel) + predictions.bias
            probabilities = activate(logits)
            top = tf.argmax(logits, axis=-1)
            chosen = tf.where(class_ids < 0, top, class_ids)
            score = tf.gather(logits, chosen, batch_dims=1)
        gradients = tape.gradient(score, feature_map)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))
        cam = cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-12)
        heatmaps = tf.image.resize(cam[..., None], [size, size], method="bilinear")[..., 0]
        return {"heatmaps": heatmaps, "class_ids": chosen, "probabilities": probabilities}

    return fn, layer


def _feature_model(backbone, layer):
    """A model from the backbone's input to `(layer's output, backbone's output)`."""
    if isinstance(backbone, keras.Sequential):
        # A Sequential rebuilt from a file may hold several graphs; call its layers afresh.
        x = inputs = keras.Input(backbone.input_shape[1:])
        for layer_ in backbone.layers:
            x = layer_(x)
            if layer_.name == layer:
                feature_map = x
        return keras.Model(inputs, [feature_map, x])
    return keras.Model(backbone.inputs, [backbone.get_layer(layer).output, *backbone.outputs])
