"""Export: a trained classifier as a versioned TensorFlow SavedModel that needs no tlkit.

Layout (TF Serving's): `<export_dir>/<name>/<version>/` holding `saved_model.pb`,
`variables/` and `assets/` with `labels.txt` (one class per line, in index order) and
`tlkit.json` (metadata: backbone, image size, resize policy, class names, metrics, versions).
An export written by `tlkit fit` also carries `assets.extra/calibration.npz`: up to 100 training
images (uint8 `(n, size, size, 3)` under the key `images`, taken from each class in turn), the
sample `tlkit.tflite` calibrates int8 quantisation on. `assets.extra/` is TF Serving's folder
for files that are not part of the graph; loading the SavedModel ignores it.

Signatures:

- `serving_default`: `image_bytes` (tf.string [None], encoded JPEG/PNG/GIF/BMP/WebP) ->
  `probabilities` (float32 [None, classes]), `class_ids` (int64 [None]), `class_names`
  (tf.string [None], top-1). Decoding, resizing and preprocessing run inside the graph with
  the same rule as training (`tlkit.images`).
- `predict_images`: `images` (float32 [None, H, W, 3], pixels 0..255, already resized) ->
  the same outputs.

A multi-label export (`thresholds` given; `tlkit.json` has `"multi_label": true` and
`"thresholds"`, one float per class) has other outputs in both signatures:
`probabilities` (float32 [None, classes], each label's own sigmoid probability),
`predicted` (bool [None, classes], probability >= the label's threshold, the thresholds being
constants in the graph) and `class_names` (tf.string [None]: the labels predicted, in class
order, joined by `;`, the separator label files use; "" when none is). One string per image
keeps every output a dense tensor, which TF Serving's REST and gRPC encode as they are; a
client that wants a list splits on `;` (a multi-label class name cannot hold one).
The `explain` signatures take `class_ids` as for a single-label export.

A version is written to a hidden temporary folder beside its destination, reloaded and checked
against the in-memory model, and only then renamed into place: a crash leaves no half-written
version behind, and an existing version is never overwritten.
"""

import datetime
import json
import os
import platform
import shutil
import uuid
from pathlib import Path


import keras
import numpy as np
import tensorflow as tf

from tlkit.errors import ConfigError, ExportError
from tlkit.gradcam import make_gradcam
from tlkit.images import DEFAULT_MAX_PIXELS, decode_bytes, resize_image
from tlkit.runtime import __version__
from tlkit.validation import check_thresholds

METADATA_FILE = "tlkit.json"
LABELS_FILE = "labels.txt"
MODEL_CARD_FILE = "MODEL_CARD.md"
CALIBRATION_FILE = "assets.extra/calibration.npz"
CALIBRATION_IMAGES = 100
FORMAT_VERSION = 1
VERIFY_TOLERANCE = 1e-5


def export_classifier(model, class_names, export_dir, name, *, image_size, resize,
                      version=None, metadata=None, verify_images=None,
                      verify_probabilities=None, model_card=None, calibration_images=None,
                      overwrite=False, thresholds=None):
    """Writes `model` as `<export_dir>/<name>/<version>/`, atomically, and returns that path.

    Args:
        model: a tlkit classifier (float32 images 0..255 -> probabilities).
        class_names: class name per output index.
        export_dir: export root folder (created if missing).
        name: model name, the folder above the versions.
        image_size: the model's input side.
        resize: the resize policy applied by the serving graph.
        version: integer version; `None` takes the next free one. An existing version is
            refused.
        metadata: extra JSON-ready metadata (backbone, metrics, ...) for `tlkit.json`.
        verify_images: a few uint8 images `(n, size, size, 3)` used to check the written
            export against `model`; `None` checks with one mid-grey image.
        verify_probabilities: `model`'s probabilities for `verify_images` when they are
            already computed (for example by the evaluation); `None`: `model` predicts them.
        model_card: markdown text written as `assets/MODEL_CARD.md`.
        calibration_images: uint8 images `(n, size, size, 3)` from the training data, written
            as `assets.extra/calibration.npz` for int8 quantisation (`tlkit.tflite`).
        overwrite: replace an existing `version` (the new one is complete and verified
            before the old one is moved aside and deleted).
        thresholds: for a multi-label model (sigmoid outputs), the decision threshold of
            each class (`tlkit.evaluate.choose_thresholds`), baked into the graph and saved
            in the metadata; `None`: a single-label (softmax) export.

    Returns:
        The `pathlib.Path` of the new version folder.

    Raises:
        ExportError: if the version exists, the folder cannot be written, or the written
            export does not reproduce the model's predictions.
    """
    class_names = [str(c) for c in class_names]
    if len(class_names) != model.output_shape[-1]:
        raise ExportError(
            f"`class_names` must have one name per model output ({model.output_shape[-1]}). "
            f"Received: {len(class_names)} names"
        )
    if calibration_images is not None:
        calibration_images = _check_calibration_images(calibration_images, image_size)
    if thresholds is not None:
        thresholds = _check_thresholds(thresholds, class_names)
    parent = Path(export_dir) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"Cannot create export folder {str(parent)!r}: {e.strerror}. "
                          "Choose another `export_dir`.") from None
    version = next_version(parent) if version is None else int(version)
    target = parent / str(version)
    if not overwrite:
        check_version_free(export_dir, name, version)
    staging = parent / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    calibration_count = 0 if calibration_images is None else len(calibration_images)
    try:
        _write(model, class_names, staging, image_size, resize,
               {**(metadata or {}), "name": name, "version": version,
                "calibration_images": calibration_count,
                **({"multi_label": True, "thresholds": thresholds} if thresholds else {})},
               thresholds)
        if calibration_count:
            (staging / CALIBRATION_FILE).parent.mkdir()
            np.savez_compressed(staging / CALIBRATION_FILE, images=calibration_images)
        if model_card:
            (staging / "assets" / MODEL_CARD_FILE).write_text(model_card)
        if verify_images is None:
            verify_images = np.full((1, image_size, image_size, 3), 128, np.uint8)
        verify_export(staging, model, verify_images, verify_probabilities, thresholds)
        _publish(staging, target)
    except OSError as e:
        raise ExportError(f"Cannot write export {str(target)!r}: {e}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_thresholds(thresholds, class_names):
    """`thresholds` as float32-exact floats, one in [0, 1] per class, or `ExportError`."""
    try:
        values = check_thresholds(thresholds, len(class_names))
    except ConfigError as e:
        raise ExportError(str(e)) from None
    separated = [c for c in class_names if ";" in c]
    if separated:
        raise ExportError(f"A multi-label export joins its labels with ';', so a class name "
                          f"cannot hold one. Received: class names {separated}")
    return values


def _check_calibration_images(images, image_size):
    """`images` as a uint8 array `(n >= 1, size, size, 3)`, or raises `ExportError`."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (image_size, image_size, 3) \
            or not len(images):
        raise ExportError(f"`calibration_images` must be uint8 images (n, {image_size}, "
                          f"{image_size}, 3). Received: dtype={images.dtype}, "
                          f"shape={images.shape}")
    return images


def read_calibration_images(path):
    """The calibration sample an export carries (uint8 `(n, size, size, 3)`), or None.

    Raises:
        ExportError: if `assets.extra/calibration.npz` exists but cannot be read.
    """
    calibration = Path(path) / CALIBRATION_FILE
    if not calibration.is_file():
        return None
    try:
        with np.load(calibration, allow_pickle=False) as saved:
            return saved["images"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"Cannot read {str(calibration)!r}: {e}") from None


def _publish(staging, target):
    """Renames a finished export into place; an existing one is first moved aside (hidden)
    and deleted only once the new one is in place."""
    retired = None
    if target.exists():
        retired = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, retired)
    os.rename(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def check_version_free(export_dir, name, version):
    """Raises `ExportError` if `<export_dir>/<name>/<version>` exists (never overwritten)."""
    target = Path(export_dir) / name / str(version)
    if version is not None and target.exists():
        raise ExportError(
            f"Export version {str(target)!r} already exists and is not overwritten. Choose "
            "another `version`, leave it unset for the next free one, or pass `overwrite`."
        )


def next_version(model_dir):
    """The next free integer version under `model_dir` (1 if there is none)."""
    versions = [int(p.name) for p in Path(model_dir).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def _outputs(probabilities, class_names, thresholds=None):
    if thresholds is not None:
        predicted = probabilities >= tf.constant(thresholds, tf.float32)
        chosen = tf.where(predicted, tf.constant([";" + c for c in class_names]), "")
        joined = tf.strings.reduce_join(chosen, axis=-1)
        return {"probabilities": probabilities, "predicted": predicted,
                "class_names": tf.strings.regex_replace(joined, "^;", "")}
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
    return {
        "probabilities": probabilities,
        "class_ids": class_ids,
        "class_names": tf.gather(tf.constant(class_names), class_ids),
    }


def _write(model, class_names, path, image_size, resize, metadata, thresholds=None):
    size = int(image_size)
    signatures, explain_layer = _signatures(model, class_names, size, resize, thresholds)
    # The root holds each variable once: the TensorFlow variables the signatures read (a
    # Keras model tracked beside them would store every weight a second time).
    root = tf.Module()
    root.variables_used = [variable.value for variable in model.variables]
    # Custom gradients (the swish of EfficientNet's blocks, inside the Grad-CAM graph) are
    # not saved: the signatures already hold every gradient they compute, and tracing them
    # again for a caller's own differentiation took 8 of an EfficientNetV2-B0 export's 25 s.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(root, str(path), signatures=signatures, options=options)
    assets = path / "assets"
    assets.mkdir(exist_ok=True)
    (assets / LABELS_FILE).write_text("".join(f"{c}\n" for c in class_names))
    full = {
        "format": "tlkit-savedmodel",
        "format_version": FORMAT_VERSION,
        "class_names": class_names,
        "image_size": size,
        "resize": resize,
        "input_range": [0, 255],
        "max_pixels": DEFAULT_MAX_PIXELS,
        "signatures": {"serving_default": "image_bytes", "predict_images": "images",
                       **({"explain": "image_bytes, class_ids",
                           "explain_images": "images, class_ids"} if explain_layer else {})},
        "explain_layer": explain_layer,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tlkit": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "python": platform.python_version()},
        **metadata,
    }
    (assets / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n")


def _signatures(model, class_names, size, resize, thresholds=None):
    """The export's signatures as concrete functions, and the Grad-CAM layer (None when the
    model has no feature map to explain with).

    Each graph is traced once: the decoding, the backbone's forward pass and the Grad-CAM
    gradient; `serving_default` and `explain` call the functions of `predict_images` and
    `explain_images`, which share the backbone's, so the SavedModel holds each graph once.
    """
    images = tf.TensorSpec([None, size, size, 3], tf.float32, name="images")
    image_bytes = tf.TensorSpec([None], tf.string, name="image_bytes")
    preprocess, backbone = model.get_layer("preprocess"), model.get_layer("backbone")
    head = model.layers[model.layers.index(backbone) + 1:]
    forward = _trace(lambda images: backbone(preprocess(images), training=False), images)

    def predict(images):
        x = forward(images)
        for layer in head:
            x = layer(x, training=False)
        return _outputs(x, class_names, thresholds)

    decode = _trace(lambda image_bytes: _decode_batch(image_bytes, size, resize), image_bytes)
    predict_images = _trace(predict, images)
    signatures = {
        "predict_images": predict_images,
        "serving_default": _trace(lambda image_bytes: predict_images(decode(image_bytes)),
                                  image_bytes),
    }
    try:
        gradcam, layer = make_gradcam(model, forward=forward)
    except ConfigError:
        return signatures, None
    class_ids = tf.TensorSpec([None], tf.int64, name="class_ids")
    explain_images = _trace(gradcam, images, class_ids)
    signatures["explain_images"] = explain_images
    signatures["explain"] = _trace(
        lambda image_bytes, class_ids: explain_images(decode(image_bytes), class_ids),
        image_bytes, class_ids)
    return signatures, layer


def _trace(fn, *specs):
    """`fn` traced once for `specs`: a concrete function."""
    return tf.function(fn, input_signature=list(specs), autograph=False).get_concrete_function()


def _decode_batch(image_bytes, size, resize):
    """Encoded images -> float32 `(n, size, size, 3)` with the training contract."""

    def one(data):
        return tf.cast(resize_image(decode_bytes(data, image_size=size), size, resize),
                       tf.float32)

    return tf.map_fn(one, image_bytes,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def verify_export(path, model, images, expected=None, thresholds=None):
    """Reloads an export and checks its `predict_images` output against `model`.

    Args:
        path: the export folder.
        model: the in-memory Keras model it was written from.
        images: uint8 images `(n, size, size, 3)` to compare on.
        expected: `model`'s probabilities for `images` if already computed; `None`:
            computed here.
        thresholds: a multi-label export's thresholds: its `predicted` and `class_names`
            outputs must then be the exported probabilities against them.

    Raises:
        ExportError: if the largest difference in probabilities exceeds 1e-5, or a
            multi-label export's decisions do not follow its probabilities and thresholds.
    """
    loaded = tf.saved_model.load(str(path))
    batch = tf.constant(np.asarray(images), tf.float32)
    outputs = loaded.signatures["predict_images"](images=batch)
    exported = outputs["probabilities"].numpy()
    if thresholds is not None:
        predicted = exported >= np.asarray(thresholds, np.float32)
        names = read_metadata(path)["class_names"]
        joined = [";".join(n for n, on in zip(names, row) if on) for row in predicted]
        if not np.array_equal(outputs["predicted"].numpy(), predicted) or \
                [v.decode() for v in outputs["class_names"].numpy()] != joined:
            raise ExportError(f"The export in {str(path)!r} does not apply its thresholds "
                              "to its probabilities. Nothing was written.")
    if expected is None:
        expected = model(batch, training=False)
    expected = np.asarray(expected)
    if expected.shape != exported.shape:
        raise ExportError(f"`verify_probabilities` must have shape {exported.shape}, one row "
                          f"per verify image. Received: shape={expected.shape}")
    difference = float(np.max(np.abs(exported - expected)))
    if difference > VERIFY_TOLERANCE:
        raise ExportError(
            f"The export in {str(path)!r} does not reproduce the model: probabilities differ "
            f"by {difference:.2e} (> {VERIFY_TOLERANCE}). Nothing was written."
        )


def read_metadata(path):
    """Reads the `tlkit.json` metadata of an export folder.

    Raises:
        ExportError: if `path` is not a tlkit export.
    """
    path = Path(path)
    meta_file = path / "assets" / METADATA_FILE
    if not (path / "saved_model.pb").is_file() or not meta_file.is_file():
        raise ExportError(
            f"{str(path)!r} is not a tlkit export (expected saved_model.pb and "
            f"assets/{METADATA_FILE}). Pass the version folder, e.g. saved_models/NAME/1."
        )
    try:
        return json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"Cannot read {str(meta_file)!r}: {e}") from None


def find_latest_export(export_dir="saved_models"):
    """The most recently written tlkit export below `export_dir`, or raises `ExportError`."""
    candidates = [meta.parent.parent for meta in Path(export_dir).glob(f"*/*/assets/{METADATA_FILE}")
                  if meta.parent.parent.name.isdigit()]
    if not candidates:
        raise ExportError(
            f"No tlkit export found under {str(export_dir)!r}. Train one with `tlkit.fit` "
            "or pass `model`, the path of an export."
        )
    return max(candidates, key=lambda p: (p / "saved_model.pb").stat().st_mtime)


def resolve_export(path=None, export_dir="saved_models"):
    """The export version folder meant by `path`.

    Args:
        path: a version folder (`saved_models/NAME/VERSION`), a model folder
            (`saved_models/NAME`: its highest version), or `None`: the newest export under
            `export_dir`.
        export_dir: where to look when `path` is None.

    Returns:
        A `pathlib.Path`.
    """
    if path is None:
        return find_latest_export(export_dir)
    path = Path(path)
    versions = [p for p in path.glob("*") if p.name.isdigit() and (p / "saved_model.pb").exists()]
    if not (path / "saved_model.pb").exists() and versions:
        return max(versions, key=lambda p: int(p.name))
    return path
