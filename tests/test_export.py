"""Export and run folder of a small `tlkit.fit` run, and the SavedModel used without tlkit."""

import csv
import hashlib
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkit
from conftest import write_image_folder
from tlkit.api import resolve_config
from tlkit.config import FitConfig
from tlkit.errors import ExportError
from tlkit.images import load_image
from tlkit.models import load_keras_model

CLASSES = ("circle", "square", "star")
SIZE = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def data_dir(base):
    return write_image_folder(base / "shapes", classes=CLASSES, per_class=8, size=20)


def _fit(data_dir, base, **options):
    settings = dict(image_size=SIZE, epochs=2, batch_size=8, learning_rate=0.01,
                    augment="none", flip="none", export_dir=str(base / "exports"),
                    runs_dir=str(base / "runs"), verbose=0)
    return tlkit.fit(str(data_dir), **{**settings, **options})


@pytest.fixture(scope="module")
def first(data_dir, base):
    return _fit(data_dir, base)


@pytest.fixture(scope="module")
def second(first, data_dir, base):
    return _fit(data_dir, base, seed=7)


@pytest.fixture(scope="module")
def probe_files(base):
    """PNG and JPEG files of other sizes than the model input (so both paths resize)."""
    pngs = write_image_folder(base / "probe_png", classes=CLASSES, per_class=2, size=24)
    jpegs = write_image_folder(base / "probe_jpg", classes=CLASSES, per_class=2, size=28,
                               fmt="jpg")
    wide = base / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 32, 3), np.uint8)).save(wide)
    return {"png": sorted(pngs.rglob("*.png")) + [wide], "jpeg": sorted(jpegs.rglob("*.jpg"))}


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                         hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- Export folder -------------------------------------------------------------------------


def test_export_folder_is_export_dir_name_version_1(first, base):
    assert first.export_path == base / "exports" / "shapes" / "1"
    assert (first.export_path / "saved_model.pb").is_file()
    assert (first.export_path / "variables").is_dir()


def test_labels_txt_has_one_class_per_line_in_order(first):
    text = (first.export_path / "assets" / "labels.txt").read_text()
    assert text.splitlines() == list(CLASSES)


def test_metadata_describes_the_model(first):
    meta = json.loads((first.export_path / "assets" / "tlkit.json").read_text())
    assert meta["backbone"] == "scratch"
    assert meta["image_size"] == SIZE
    assert meta["resize"] == "squash"
    assert meta["class_names"] == list(CLASSES)
    assert meta["metrics"]["val"] == pytest.approx(first.metrics["val"])
    assert set(meta["metrics"]["val"]) == {"loss", "accuracy"}
    assert meta["versions"]["tlkit"] == tlkit.__version__
    assert meta["versions"]["tensorflow"] == tf.__version__
    assert meta["versions"]["keras"] == keras.__version__
    assert meta["name"] == "shapes" and meta["version"] == 1


def test_second_fit_to_the_same_name_is_version_2(first, second, base):
    assert second.export_path == base / "exports" / "shapes" / "2"
    assert first.export_path.is_dir()
    meta = json.loads((second.export_path / "assets" / "tlkit.json").read_text())
    assert meta["version"] == 2
    assert not [p for p in (base / "exports" / "shapes").iterdir() if p.name.startswith(".")]


def test_an_existing_version_is_refused_and_left_untouched(first, second, data_dir, base):
    before = _snapshot(first.export_path)
    with pytest.raises(ExportError, match="already exists"):
        _fit(data_dir, base, version=1, epochs=1)
    assert _snapshot(first.export_path) == before
    names = sorted(p.name for p in (base / "exports" / "shapes").iterdir())
    assert names == ["1", "2"]


def test_export_classifier_refuses_an_existing_version_directly(first, base):
    from tlkit.export import export_classifier

    before = _snapshot(first.export_path)
    with pytest.raises(ExportError, match="already exists"):
        export_classifier(first.model, list(CLASSES), str(base / "exports"), "shapes",
                          image_size=SIZE, resize="squash", version=1)
    assert _snapshot(first.export_path) == before


# --- The SavedModel without tlkit ------------------------------------------------------------

SUBPROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    export, pixels_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    loaded = tf.saved_model.load(export)
    serving = loaded.signatures["serving_default"]
    by_images = loaded.signatures["predict_images"]

    def specs(signature):
        return {k: [s.dtype.name, s.shape.as_list()]
                for k, s in signature.structured_input_signature[1].items()}

    def plain(outputs):
        return {k: {"dtype": v.dtype.name, "shape": v.shape.as_list(),
                    "types": sorted({type(x).__name__ for x in v.numpy().tolist()}),
                    "value": [x.decode() if isinstance(x, bytes) else x
                              for x in v.numpy().tolist()]}
                for k, v in outputs.items()}

    data = tf.constant([open(f, "rb").read() for f in files])
    size = by_images.structured_input_signature[1]["images"].shape[1]
    raw = tf.io.decode_raw(tf.io.read_file(pixels_file), tf.uint8)
    pixels = tf.cast(tf.reshape(raw, [-1, size, size, 3]), tf.float32)
    print(json.dumps({
        "tlkit_imported": any(m == "tlkit" or m.startswith("tlkit.") for m in sys.modules),
        "inputs": {"serving_default": specs(serving), "predict_images": specs(by_images)},
        "serving_default": plain(serving(image_bytes=data)),
        "predict_images": plain(by_images(images=pixels)),
    }))
""")


@pytest.fixture(scope="module")
def served(first, probe_files, base):
    files = probe_files["png"] + probe_files["jpeg"]
    pixels_file = base / "pixels.u8"
    pixels_file.write_bytes(np.stack([load_image(f, SIZE) for f in files]).tobytes())
    process = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(first.export_path), str(pixels_file),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return files, json.loads(process.stdout.strip().splitlines()[-1])


def _api_probabilities(classifier, files):
    predictions = classifier.predict(files, top_k=len(classifier.class_names))
    assert not [p.error for p in predictions if p.error]
    return np.array([[dict(zip(p.labels, p.probabilities))[name]
                      for name in classifier.class_names] for p in predictions])


def test_subprocess_does_not_import_tlkit(served):
    assert served[1]["tlkit_imported"] is False


def test_signature_inputs(served):
    inputs = served[1]["inputs"]
    assert inputs["serving_default"] == {"image_bytes": ["string", [None]]}
    assert inputs["predict_images"] == {"images": ["float32", [None, SIZE, SIZE, 3]]}


@pytest.mark.parametrize("signature", ["serving_default", "predict_images"])
def test_signature_outputs(served, signature):
    files, out = served
    outputs = out[signature]
    assert set(outputs) == {"probabilities", "class_ids", "class_names"}
    probabilities = outputs["probabilities"]
    assert probabilities["dtype"] == "float32"
    assert probabilities["shape"] == [len(files), len(CLASSES)]
    assert outputs["class_ids"]["dtype"] == "int64"
    assert outputs["class_names"]["dtype"] == "string"
    assert outputs["class_names"]["types"] == ["bytes"]
    assert outputs["class_ids"]["types"] == ["int"]
    values = np.array(probabilities["value"])
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)
    assert outputs["class_ids"]["value"] == values.argmax(axis=1).tolist()
    assert outputs["class_names"]["value"] == [CLASSES[i] for i in outputs["class_ids"]["value"]]


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_serving_bytes_match_the_python_api(served, probe_files, first, kind):
    files, out = served
    rows = [files.index(f) for f in probe_files[kind]]
    exported = np.array(out["serving_default"]["probabilities"]["value"])[rows]
    api = _api_probabilities(tlkit.load(first.export_path), probe_files[kind])
    assert np.ptp(api, axis=0).max() > 1e-3, "the model does not tell these images apart"
    assert np.abs(exported - api).max() < 1e-5


def test_predict_images_matches_the_python_api(served, first):
    files, out = served
    exported = np.array(out["predict_images"]["probabilities"]["value"])
    api = _api_probabilities(tlkit.load(first.export_path), files)
    assert np.abs(exported - api).max() < 1e-5


# --- Run folder ---------------------------------------------------------------------------------


def test_run_folder_holds_the_outputs(first):
    names = {p.name for p in first.run_dir.iterdir()}
    assert {"config.json", "history.json", "history.csv", "curves.png", "model.keras",
            "splits.csv", "data.json"} <= names


def test_run_config_loads_equal_to_the_result_config(first):
    loaded = FitConfig.load(first.run_dir / "config.json")
    assert resolve_config(loaded) == first.config
    assert loaded.data.image_size == SIZE and loaded.export.name == "shapes"
    # the machine's choices are read back as asked, for a re-run to make its own
    assert (loaded.train.jit, loaded.train.distribute, loaded.model.weights) == ("auto",) * 3


def test_history_json_and_csv_match_the_result(first):
    history = json.loads((first.run_dir / "history.json").read_text())
    assert len(history) == len(first.history) == 2
    with open(first.run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history)
    for row, saved, kept in zip(rows, history, first.history):
        assert int(row["epoch"]) == saved["epoch"] == kept["epoch"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert saved[key] == pytest.approx(kept[key])
            assert float(row[key]) == pytest.approx(kept[key])


def test_curves_png_is_a_valid_image(first):
    with Image.open(first.run_dir / "curves.png") as image:
        image.verify()
    with Image.open(first.run_dir / "curves.png") as image:
        assert image.format == "PNG"
        assert image.width > 200


def test_model_keras_reproduces_the_trained_model(first):
    loaded = load_keras_model(first.run_dir / "model.keras")
    images = np.random.default_rng(2).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(images, training=False)),
                               np.asarray(first.model(images, training=False)), atol=1e-6)


def test_splits_csv_lists_every_image_once(first, data_dir):
    with open(first.run_dir / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in data_dir.rglob("*.png"))
    assert {r["split"] for r in rows} == {"train", "val"}
    for row in rows:
        assert row["class"] == row["file"].split("/")[-2]


def test_data_json_reports_classes_and_counts(first):
    report = json.loads((first.run_dir / "data.json").read_text())
    assert report["class_names"] == list(CLASSES)
    assert sum(map(sum, report["counts"].values())) == 8 * len(CLASSES)
    assert report["skipped"] == []


# --- What the SavedModel stores ---------------------------------------------------------------


def test_each_variable_is_stored_once(first):
    reader = tf.train.load_checkpoint(str(first.export_path / "variables" / "variables"))
    dtypes = reader.get_variable_to_dtype_map()
    stored = {name: shape for name, shape in reader.get_variable_to_shape_map().items()
              if name.endswith("VARIABLE_VALUE")}
    assert len(stored) == len(first.model.variables)
    stored_bytes = sum(int(np.prod(shape)) * dtypes[name].size for name, shape in stored.items())
    assert stored_bytes == sum(np.asarray(v).nbytes for v in first.model.variables)


def test_the_signatures_share_one_forward_graph(first):
    """Every convolution of the backbone appears once in the SavedModel's graphs, however
    many signatures run it."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((first.export_path / "saved_model.pb").read_bytes())
    library = saved.meta_graphs[0].graph_def.library
    convolutions = sum(node.op == "Conv2D" for function in library.function
                       for node in function.node_def)
    layers = [layer for layer in first.model.get_layer("backbone").layers
              if isinstance(layer, keras.layers.Conv2D)]
    assert len(layers) > 1 and convolutions == len(layers)
