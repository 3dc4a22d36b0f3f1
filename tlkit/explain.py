"""Grad-CAM: which part of an image made the model say what it said.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by the
average gradient of the class score with respect to it, sums the weighted channels and keeps
the positive part. tlkit computes it with one function, `gradcam`, used both inside the
export (the `explain` and `explain_images` signatures, so any TensorFlow service can ask for
a heatmap) and in Python. The default layer is the backbone's last layer whose output is a
spatial map larger than 1x1.
"""

from collections import Counter
from pathlib import Path

import keras
import numpy as np
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
        (the explained class) and `probabilities`.
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
            probabilities = tf.nn.softmax(logits)
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


def overlay(image, heatmap, alpha=0.45):
    """Blends a 0..1 heatmap (jet colours) over a uint8 RGB image of the same size."""
    import matplotlib

    colours = matplotlib.colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def save_overlay(image, heatmap, path, title):
    """Writes the image, the heatmap over it, and a title as a PNG; returns `path`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axes = figure.subplots(1, 2)
    for axis, picture, label in zip(axes, (image, overlay(image, heatmap)),
                                    ("image", "Grad-CAM")):
        axis.imshow(picture, interpolation="nearest" if image.shape[0] < 64 else "bilinear")
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def explain_files(files, model=None, export_dir="saved_models", class_name=None,
                  layer=None, output_dir="explanations"):
    """Grad-CAM heatmaps for image files, computed by an export's `explain_images` signature.

    Args:
        files: image paths (decoded with the training contract, `tlkit.images`).
        model: export folder; `None`: the newest under `export_dir`.
        export_dir: where to look when `model` is None.
        class_name: explain this class instead of the top one.
        layer: a backbone layer other than the export's own Grad-CAM layer; this needs the
            export's run folder (its `model.keras`), named in the export's metadata.
        output_dir: where the PNGs go: `<stem>_gradcam.png`, or
            `<folder>_<stem>_gradcam.png` for files that share a stem (`a/1.png`,
            `b/1.png`), with the file's position appended if that still collides.

    Returns:
        A list of dicts: file, png, class, probability.

    Raises:
        ConfigError: if `class_name` is not one of the model's classes, or `layer` is not a
            spatial backbone layer.
    """
    from tlkit.images import load_image
    from tlkit.predict import load

    classifier = load(model, export_dir)
    if class_name is not None and class_name not in classifier.class_names:
        raise ConfigError(f"`class_name` must be one of {classifier.class_names}. "
                          f"Received: class_name={class_name!r}")
    if layer is None or layer == classifier.metadata.get("explain_layer"):
        explain = classifier.signature("explain_images")
    else:
        explain = tf.function(make_gradcam(_run_model(classifier), layer)[0])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    class_id = -1 if class_name is None else classifier.class_names.index(class_name)
    files = [Path(file) for file in files]
    results = []
    for file, name in zip(files, _output_names(files)):
        image = load_image(file, classifier.image_size, classifier.resize)
        out = explain(images=tf.constant(image[None], tf.float32),
                      class_ids=tf.constant([class_id], tf.int64))
        chosen = int(out["class_ids"][0])
        probability = float(out["probabilities"][0, chosen])
        label = classifier.class_names[chosen]
        png = save_overlay(image, out["heatmaps"][0].numpy(),
                           output_dir / f"{name}_gradcam.png",
                           f"{file.name}: {label} ({probability:.1%})")
        results.append({"file": str(file), "png": str(png), "class": label,
                        "probability": probability})
    return results


def _output_names(files):
    """A distinct name per file: its stem, its folder's name first where stems collide."""
    stems = Counter(file.stem for file in files)
    names = [file.stem if stems[file.stem] == 1 else f"{file.parent.name}_{file.stem}"
             for file in files]
    counts = Counter(names)
    return [f"{name}_{index}" if counts[name] > 1 else name
            for index, name in enumerate(names, start=1)]


def _run_model(classifier):
    """The Keras model of the run that produced an export (for a custom Grad-CAM layer)."""
    from tlkit.models import load_keras_model

    run_dir = classifier.metadata.get("run_dir")
    model_file = Path(run_dir or "") / "model.keras"
    if not run_dir or not model_file.is_file():
        raise ConfigError(
            f"`layer` needs the Keras model of the run that made {str(classifier.path)!r}, "
            f"but {str(model_file)!r} is not there. Without `layer`, the export's own "
            f"Grad-CAM layer ({classifier.metadata.get('explain_layer')!r}) is used."
        )
    return load_keras_model(model_file)
