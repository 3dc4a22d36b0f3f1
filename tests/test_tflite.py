"""TFLite export: every quantisation mode converts, runs in LiteRT with its mode's dtypes,
shrinks the file, and agrees with the SavedModel on held-out digits."""

import csv
import shutil
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from click.testing import CliRunner

import tlkit
from conftest import write_image_folder
from tlkit.cli import main
from tlkit.data import decode_images
from tlkit.errors import ConfigError, ExportError
from tlkit.export import (CALIBRATION_FILE, export_classifier, find_latest_export,
                          next_version, read_metadata)
from tlkit.images import load_image
from tlkit.models import build_classifier
from tlkit.tflite import QUANTIZE_MODES, export_tflite, read_tflite_metadata

SIZE = 16
AGREEMENT = {"none": 0.99, "dynamic": 0.95, "float16": 0.95, "int8": 0.90}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("tflite")


@pytest.fixture(scope="module")
def result(base, digits_run):
    """The shared digits run (conftest's `digits_run`: the scratch CNN, conv-BN blocks, about
    67k parameters at 16 px), its export copied here: these tests write TFLite files beside
    the versions."""
    export = base / "saved_models" / "digits" / "1"
    shutil.copytree(digits_run.export_path, export)
    model = keras.saving.load_model(digits_run.run_dir / "model.keras")
    return SimpleNamespace(export_path=export, run_dir=digits_run.run_dir, model=model)


def _split_rows(result, name):
    with open(result.run_dir / "splits.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["split"] == name]


@pytest.fixture(scope="module")
def held_out(result):
    """The test split's images, never trained on, decoded as the export expects them."""
    rows = _split_rows(result, "test")
    assert len(rows) >= 200
    return np.stack([load_image(row["file"], SIZE) for row in rows])


@pytest.fixture(scope="module")
def reference(result, held_out):
    """The SavedModel's `predict_images` probabilities."""
    return tlkit.load(result.export_path).predict_arrays(held_out)


@pytest.fixture(scope="module")
def converted(result):
    return {mode: export_tflite(result.export_path, quantize=mode) for mode in QUANTIZE_MODES}


def _tensor_dtypes(path):
    """dtype name -> names of the tensors of that dtype."""
    dtypes = {}
    for details in Interpreter(model_path=str(path)).get_tensor_details():
        dtypes.setdefault(np.dtype(details["dtype"]).name, []).append(details["name"])
    return dtypes


def _run(path, images):
    runner = Interpreter(model_path=str(path)).get_signature_runner("predict_images")
    (details,) = runner.get_input_details().values()
    return runner(images=images.astype(details["dtype"]))


# --- The calibration sample in the export --------------------------------------------------


def test_fit_records_a_stratified_sample_of_the_train_split(result):
    meta = read_metadata(result.export_path)
    with np.load(result.export_path / CALIBRATION_FILE) as saved:
        sample = saved["images"]
    assert sample.dtype == np.uint8 and sample.shape == (100, SIZE, SIZE, 3)
    assert meta["calibration_images"] == 100
    train = _split_rows(result, "train")
    decoded = decode_images([row["file"] for row in train], SIZE, cache="memory", verbose=0)
    label_of = {image.tobytes(): row["class"] for image, row in zip(decoded.cache.array, train)}
    classes = [label_of.get(image.tobytes()) for image in sample]
    assert None not in classes  # every image comes from the train split
    assert sorted(classes) == sorted(meta["class_names"] * 10)  # 10 per class


def test_export_classifier_refuses_calibration_images_of_another_size(tmp_path):
    model = build_classifier("lenet5", 2, 32)
    with pytest.raises(ExportError, match=r"`calibration_images` must be uint8 images "
                       r"\(n, 32, 32, 3\). Received: dtype=uint8, shape=\(4, 16, 16, 3\)"):
        export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32, resize="squash",
                          calibration_images=np.zeros((4, 16, 16, 3), np.uint8))
    assert not (tmp_path / "m" / "1").exists()


# --- Each mode -----------------------------------------------------------------------------


def test_files_land_in_the_tflite_folder_beside_the_versions(result, converted):
    folder = result.export_path.parent / "tflite" / "1"
    assert {mode: path for mode, path in converted.items()} == {
        mode: folder / f"model-{mode}.tflite" for mode in QUANTIZE_MODES}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"model-{m}.{ext}" for m in QUANTIZE_MODES for ext in ("tflite", "json")]
        + ["labels.txt"])
    classes = read_metadata(result.export_path)["class_names"]
    assert (folder / "labels.txt").read_text().splitlines() == classes


def test_the_tflite_folder_is_not_taken_for_a_version(result, converted):
    model_dir = result.export_path.parent
    assert find_latest_export(model_dir.parent) == result.export_path
    assert next_version(model_dir) == 2
    assert tlkit.load(model_dir).path == result.export_path


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_tensor_dtypes_match_the_mode(converted, mode):
    dtypes = _tensor_dtypes(converted[mode])
    runner = Interpreter(model_path=str(converted[mode])).get_signature_runner("predict_images")
    (image_input,) = runner.get_input_details().values()
    outputs = runner.get_output_details()
    assert np.dtype(outputs["probabilities"]["dtype"]) == np.float32
    assert np.dtype(outputs["class_ids"]["dtype"]) == np.int64
    assert list(image_input["shape_signature"]) == [-1, SIZE, SIZE, 3]
    if mode == "int8":
        assert np.dtype(image_input["dtype"]) == np.uint8
        assert image_input["quantization"] == (1.0, 0)  # raw pixels feed directly
        assert len(dtypes["int8"]) >= 10  # weights and activations
        assert dtypes["float32"] == [outputs["probabilities"]["name"]]  # dequantised output
        assert "float16" not in dtypes
        return
    assert np.dtype(image_input["dtype"]) == np.float32
    assert ("int8" in dtypes) == (mode == "dynamic")  # dynamic: int8 weights
    assert ("float16" in dtypes) == (mode == "float16")  # float16: float16 weights
    assert "uint8" not in dtypes


def test_quantised_files_shrink_by_their_factor(result, converted):
    sizes = {mode: path.stat().st_size for mode, path in converted.items()}
    print("sizes (bytes):", sizes)
    weights = 4 * result.model.count_params()
    assert weights < sizes["none"] < 1.1 * weights  # float32 weights plus the graph
    assert sizes["float16"] < sizes["none"] / 1.8
    assert sizes["dynamic"] < sizes["none"] / 3.3
    assert sizes["int8"] < sizes["none"] / 3.3


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_top1_agrees_with_the_savedmodel_on_held_out_digits(converted, held_out, reference,
                                                             mode):
    out = _run(converted[mode], held_out)
    top1 = reference.argmax(axis=1)
    agreement = float(np.mean(out["probabilities"].argmax(axis=1) == top1))
    print(f"{mode}: top-1 agreement {agreement:.4f} on {len(held_out)} held-out digits, "
          f"largest probability difference {np.abs(out['probabilities'] - reference).max():.4f}")
    assert agreement >= AGREEMENT[mode]
    assert np.array_equal(out["class_ids"], out["probabilities"].argmax(axis=1))
    assert [name.decode() for name in out["class_names"]] == [str(i) for i in out["class_ids"]]
    if mode == "none":
        np.testing.assert_allclose(out["probabilities"], reference, atol=1e-4)


def test_the_json_beside_each_file_describes_it(result, converted):
    int8 = read_tflite_metadata(converted["int8"])
    assert int8["quantize"] == "int8" and int8["signature"] == "predict_images"
    assert int8["input"] == {"name": "images", "dtype": "uint8", "shape": [-1, SIZE, SIZE, 3],
                             "quantization": {"scale": 1.0, "zero_point": 0}}
    assert int8["calibration"] == {"source": CALIBRATION_FILE, "images": 100}
    assert int8["class_names"] == [str(i) for i in range(10)]
    assert int8["image_size"] == SIZE and int8["resize"] == "squash"
    assert int8["bytes"] == converted["int8"].stat().st_size
    assert int8["source"]["export"] == str(result.export_path.resolve())
    assert int8["versions"]["tlkit"] == tlkit.__version__
    none = read_tflite_metadata(converted["none"])
    assert none["input"]["dtype"] == "float32" and none["input"]["quantization"] is None
    assert none["calibration"] is None


# --- Errors and other sources --------------------------------------------------------------


def test_bad_arguments_are_refused_first(result, tmp_path):
    with pytest.raises(ConfigError, match=r"`quantize` must be one of \['none', 'dynamic', "
                       r"'float16', 'int8'\]. Received: quantize='int4'"):
        export_tflite(result.export_path, quantize="int4")
    with pytest.raises(ConfigError, match="only used with quantize='int8'. Received: "
                       "quantize='dynamic'"):
        export_tflite(result.export_path, quantize="dynamic", calibration_data=tmp_path)
    with pytest.raises(ConfigError, match="must be a folder of images"):
        export_tflite(result.export_path, quantize="int8",
                      calibration_data=tmp_path / "missing")
    with pytest.raises(ExportError, match="is not a tlkit export"):
        export_tflite(tmp_path, quantize="none")


def test_an_existing_file_is_refused(result, converted):
    path = converted["dynamic"]
    before = path.stat().st_mtime_ns, path.read_bytes()
    with pytest.raises(ExportError, match="already exists and is not overwritten. Pass "
                       "`overwrite=True`"):
        export_tflite(result.export_path, quantize="dynamic")
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


@pytest.fixture(scope="module")
def bare_export(base):
    """An export written without a calibration sample (two classes, 16 px)."""
    model = build_classifier("scratch", 2, 16)
    return export_classifier(model, ["a", "b"], base / "bare", "shapes", image_size=16,
                             resize="pad")


def test_int8_without_a_sample_names_the_export_and_the_alternative(bare_export):
    assert read_metadata(bare_export)["calibration_images"] == 0
    with pytest.raises(ExportError, match=r"has no calibration sample .*"
                       r"the training data as `calibration_data`") as error:
        export_tflite(bare_export, quantize="int8")
    assert str(bare_export) in str(error.value)
    assert not (bare_export.parent / "tflite").exists()


def test_int8_calibrates_on_a_folder_of_images(bare_export, base):
    folder = write_image_folder(base / "calibration", classes=("a", "b"), per_class=6, size=24)
    path = export_tflite(bare_export, quantize="int8", calibration_data=folder)
    info = read_tflite_metadata(path)
    assert info["calibration"] == {"source": str(folder), "images": 12}
    assert info["input"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert info["resize"] == "pad" and info["image_size"] == 16
    out = _run(path, np.stack([load_image(p, 16, "pad") for p in sorted(folder.rglob("*.png"))]))
    assert out["probabilities"].shape == (12, 2)


def test_a_folder_of_another_model_is_refused(bare_export, converted):
    with pytest.raises(ExportError, match="holds the TFLite files of a model with other "
                       "classes"):
        export_tflite(bare_export, quantize="none", output_dir=converted["none"].parent)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_overwrites_and_prints_the_path_and_size(result, converted):
    path = converted["float16"]
    before = path.stat().st_mtime_ns
    run = CliRunner().invoke(main, ["export-tflite", "--model", str(result.export_path.parent),
                                    "--quantize", "float16", "--overwrite"])
    assert run.exit_code == 0, run.output
    printed, size = run.output.splitlines()
    assert printed == str(path) and path.stat().st_mtime_ns > before
    assert size.startswith(f"{path.stat().st_size / 1024:.1f} KiB, ")
    assert "of the SavedModel's variables" in size
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_cli_int8_without_a_sample_fails_cleanly(bare_export, tmp_path):
    run = CliRunner().invoke(main, ["export-tflite", "--model", str(bare_export),
                                    "--quantize", "int8", "--output-dir", str(tmp_path)])
    assert run.exit_code == 1 and isinstance(run.exception, SystemExit)
    assert "as `--calibration-data`" in run.output and "Traceback" not in run.output


def test_cli_offers_the_library_modes():
    (option,) = [p for p in main.commands["export-tflite"].params if p.name == "quantize"]
    assert tuple(option.type.choices) == QUANTIZE_MODES
