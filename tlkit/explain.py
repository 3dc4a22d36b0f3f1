"""`tlkit explain`: Grad-CAM heatmaps of image files, drawn over the images.

The heatmaps come from an export's `explain_images` signature (`tlkit.gradcam` builds it),
so an export alone is enough; another layer than the export's own needs the run's Keras
model.
"""

from collections import Counter
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlkit.errors import ConfigError
from tlkit.gradcam import make_gradcam
from tlkit.images import load_image
from tlkit.models import load_keras_model
from tlkit.predict import load


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
    run_dir = classifier.metadata.get("run_dir")
    model_file = Path(run_dir or "") / "model.keras"
    if not run_dir or not model_file.is_file():
        raise ConfigError(
            f"`layer` needs the Keras model of the run that made {str(classifier.path)!r}, "
            f"but {str(model_file)!r} is not there. Without `layer`, the export's own "
            f"Grad-CAM layer ({classifier.metadata.get('explain_layer')!r}) is used."
        )
    return load_keras_model(model_file)
