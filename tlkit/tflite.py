"""TFLite: an export's `predict_images` signature as a `.tflite` file for phones and devices.

    export -> TFLiteConverter (signature `predict_images`, quantisation) -> loaded in LiteRT
           -> <export_root>/<name>/tflite/<version>/model-<mode>.tflite, .json, labels.txt

The converted graph is the export's float signature (string decoding is not TFLite-native):
the caller decodes and resizes images with the export's rule (size and resize policy in the
JSON file beside the model) and feeds pixels 0..255. Outputs keep their names:
`probabilities` (float32 `[n, classes]`), `class_ids` (int64 `[n]`) and `class_names`
(string `[n]`, top-1); `labels.txt` lists the classes in output order. A multi-label export
converts to `probabilities` (sigmoid, `[n, classes]`) and `predicted` (bool `[n, classes]`,
at or above each label's threshold, baked into the graph; the thresholds are in the JSON
file too): its `class_names` output joins labels into one string, which TFLite's built-in
ops do not compute.

Quantisation modes (`QUANTIZE_MODES`):

- `none`: float32 throughout, the same predictions as the SavedModel.
- `dynamic`: weights stored as int8 (about 4x smaller), activations computed in float.
- `float16`: weights stored as float16 (about 2x smaller), computed in float32 on CPUs.
- `int8`: full integer: int8 weights and activations, calibrated on sample images (the
  training sample recorded in the export, or a folder of images); the input takes uint8
  pixels 0..255 as they are (input quantisation scale 1, zero point 0), the probabilities
  come out dequantised to float32.

TF Serving ignores the `tflite` folder (its name is not a version number), and so does
`tlkit.export.find_latest_export`.
"""

import datetime
import json
import tempfile
import warnings
from pathlib import Path


import numpy as np
import tensorflow as tf

from tlkit.data import decode_images
from tlkit.errors import ConfigError, DataError, ExportError
from tlkit.export import (CALIBRATION_FILE, CALIBRATION_IMAGES, LABELS_FILE,
                          read_calibration_images, read_metadata, resolve_export)
from tlkit.files import write_atomically
from tlkit.predict import expand_inputs
from tlkit.runtime import __version__
from tlkit.validation import check_choice

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
SIGNATURE = "predict_images"
TFLITE_FOLDER = "tflite"


def export_tflite(model_path=None, *, quantize="none", output_dir=None, calibration_data=None,
                  overwrite=False, export_dir="saved_models"):
    """Converts a tlkit export to a TFLite model file, with its labels and a JSON description.

    Writes `model-<quantize>.tflite`, `model-<quantize>.json` (quantisation, input dtype,
    shape and quantisation parameters, image size, resize policy, class names, source
    export, sizes, versions) and `labels.txt` (one class per line, in output order), each
    atomically. Several modes can share a folder. The converted file is loaded once in the
    LiteRT interpreter (`pip install ai-edge-litert`) to read its input details.

    Args:
        model_path: an export version folder (`saved_models/NAME/VERSION`), or a model folder
            (its highest version); `None` takes the newest export under `export_dir`.
        quantize: one of `QUANTIZE_MODES`: `"none"` (float32), `"dynamic"` (int8 weights),
            `"float16"` (float16 weights) or `"int8"` (full integer, uint8 input).
        output_dir: folder for the files; `None`: `<export_root>/<name>/tflite/<version>/`.
        calibration_data: for `"int8"` only: a folder of images (searched recursively, at
            most 100 used, spread over the sorted files) to calibrate on instead of the
            sample recorded in the export. They are decoded and resized with the export's
            own rule.
        overwrite: replace an existing `model-<quantize>.tflite`.
        export_dir: where to look when `model_path` is None.

    Returns:
        The `pathlib.Path` of the `.tflite` file.

    Raises:
        ConfigError: if an argument is invalid, or ai-edge-litert is not installed.
        ExportError: if `model_path` is not a tlkit export, the file exists and
            `overwrite` is False, `output_dir` holds the files of a model with other
            classes, or int8 has no calibration images.

    Example:

    >>> path = tlkit.export_tflite("saved_models/digits/1", quantize="int8")
    >>> path.name
    'model-int8.tflite'
    """
    check_choice("quantize", quantize, QUANTIZE_MODES)
    if calibration_data is not None:
        if quantize != "int8":
            raise ConfigError("`calibration_data` is only used with quantize='int8'. "
                              f"Received: quantize={quantize!r}")
        if not Path(calibration_data).is_dir():
            raise ConfigError("`calibration_data` must be a folder of images. Received: "
                              f"calibration_data={str(calibration_data)!r}")
    interpreter_class = _litert_interpreter()
    source = resolve_export(model_path, export_dir)
    metadata = read_metadata(source)
    class_names = list(metadata["class_names"])
    folder = Path(output_dir) if output_dir is not None else (
        source.parent / TFLITE_FOLDER / source.name)
    labels = "".join(f"{c}\n" for c in class_names)
    if (folder / LABELS_FILE).is_file() and (folder / LABELS_FILE).read_text() != labels:
        raise ExportError(f"{str(folder)!r} holds the TFLite files of a model with other "
                          f"classes (its {LABELS_FILE} differs). Choose another `output_dir`.")
    target = folder / f"model-{quantize}.tflite"
    if target.exists() and not overwrite:
        raise ExportError(f"{str(target)!r} already exists and is not overwritten. Pass "
                          "`overwrite=True` or another `output_dir`.")
    calibration, calibration_source = None, None
    if quantize == "int8":
        calibration, calibration_source = _calibration(source, metadata, calibration_data)

    multi_label = bool(metadata.get("multi_label"))
    if multi_label:
        with tempfile.TemporaryDirectory() as numeric:
            content = _convert(_numeric_outputs(source, numeric), quantize, calibration)
    else:
        content = _convert(source, quantize, calibration)
    interpreter = interpreter_class(model_content=content)
    description = {
        "format": "tlkit-tflite",
        "quantize": quantize,
        "signature": SIGNATURE,
        "input": _input_description(interpreter),
        "outputs": ({"probabilities": "float32", "predicted": "bool"} if multi_label else
                    {"probabilities": "float32", "class_ids": "int64", "class_names": "string"}),
        **({"multi_label": True, "thresholds": metadata["thresholds"]} if multi_label else {}),
        "class_names": class_names,
        "image_size": int(metadata["image_size"]),
        "resize": metadata["resize"],
        "input_range": [0, 255],
        "calibration": None if calibration is None else {"source": calibration_source,
                                                          "images": len(calibration)},
        "bytes": len(content),
        "source": {"export": str(source.resolve()),
                   "variables_bytes": _folder_bytes(source / "variables")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tlkit": __version__, "tensorflow": tf.__version__},
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda f: f.write(content))
        write_atomically(target.with_suffix(".json"),
                         lambda f: f.write((json.dumps(description, indent=2) + "\n").encode()))
        write_atomically(folder / LABELS_FILE, lambda f: f.write(labels.encode()))
    except OSError as e:
        raise ExportError(f"Cannot write {str(target)!r}: {e}") from None
    return target


def read_tflite_metadata(path):
    """The JSON description written beside a `.tflite` file by `export_tflite`.

    Raises:
        ExportError: if it is missing or unreadable.
    """
    description = Path(path).with_suffix(".json")
    try:
        return json.loads(description.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"Cannot read {str(description)!r}: {e}") from None


def _litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ConfigError("TFLite export needs the LiteRT runtime: pip install ai-edge-litert "
                          "(or tlkit[tflite]).") from None
    return Interpreter


def _calibration(source, metadata, calibration_data):
    """The int8 calibration images and where they come from."""
    if calibration_data is not None:
        return _decode_folder(calibration_data, metadata), str(calibration_data)
    images = read_calibration_images(source)
    if images is None:
        raise ExportError(
            f"Export {str(source)!r} has no calibration sample ({CALIBRATION_FILE}; exports "
            "written by `tlkit.fit` carry one), which int8 quantisation needs. Pass a folder "
            "of images like the training data as `calibration_data`.")
    return images, CALIBRATION_FILE


def _decode_folder(folder, metadata):
    """Up to `CALIBRATION_IMAGES` images of `folder`, spread over its sorted files, decoded
    and resized with the export's rule."""
    files = expand_inputs([folder])
    picks = np.linspace(0, len(files) - 1, min(len(files), CALIBRATION_IMAGES)).round()
    files = [str(files[int(i)]) for i in picks]
    decoded = decode_images(files, int(metadata["image_size"]), metadata["resize"],
                            cache="memory", verbose=0)
    if not decoded.ok.any():
        raise DataError(f"No image of {str(folder)!r} could be decoded for calibration.")
    return decoded.cache.array[decoded.ok]


def _numeric_outputs(source, folder):
    """A SavedModel in `folder` whose `predict_images` is the export's without the
    `class_names` output of a multi-label export (labels joined into one string, which
    TFLite's built-in ops cannot compute); returns `folder`."""
    loaded = tf.saved_model.load(str(source))
    signature = loaded.signatures[SIGNATURE]
    (spec,) = signature.structured_input_signature[1].values()

    def predict_images(images):
        outputs = signature(images=images)
        return {"probabilities": outputs["probabilities"], "predicted": outputs["predicted"]}

    numeric = tf.function(predict_images, input_signature=[spec]).get_concrete_function()
    tf.saved_model.save(loaded, folder, signatures={SIGNATURE: numeric})
    return folder


def _convert(source, quantize, calibration):
    converter = tf.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=[SIGNATURE])
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = _representative_dataset(calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    with warnings.catch_warnings():
        # The converter's calibration step runs the deprecated tf.lite.Interpreter.
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
        return converter.convert()


def _representative_dataset(images):
    """Calibration inputs one image at a time. The first image gets one black and one white
    pixel so the input's range is exactly 0..255: its quantisation is then scale 1, zero
    point 0, and raw uint8 pixels feed the model as they are."""
    images = np.array(images, np.float32)
    images[0, 0, 0], images[0, 0, 1] = 0.0, 255.0
    return lambda: ({"images": image[None]} for image in images)


def _input_description(interpreter):
    (details,) = interpreter.get_signature_runner(SIGNATURE).get_input_details().values()
    scale, zero_point = details["quantization"]
    return {"name": "images", "dtype": np.dtype(details["dtype"]).name,
            "shape": [int(n) for n in details["shape_signature"]],
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)}
            if scale else None}


def _folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
