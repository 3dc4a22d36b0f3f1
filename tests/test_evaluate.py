"""tlkit.evaluate: metrics against values worked out by hand, and the evaluation of a tiny
trained export on a folder (every output file, skipped files, unknown classes)."""

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers
from PIL import Image

import tlkit
from conftest import make_class_image, write_image_folder
from tlkit.errors import ConfigError, DataError
from tlkit.evaluate import (CALIBRATION_BINS, OUTPUT_FILES, compute_metrics, evaluate_arrays,
                            evaluate_folder)
from tlkit.images import load_image

# --- compute_metrics on a set worked out by hand ---------------------------------------------
#
# 3 classes, 8 samples; "fox" is never predicted.
#   sample  true  probabilities (cat, dog, fox)  predicted  confidence  true in top 2
#   0       cat   0.70 0.20 0.10                 cat        0.70        yes
#   1       cat   0.50 0.30 0.20                 cat        0.50        yes
#   2       cat   0.28 0.62 0.10                 dog        0.62        yes
#   3       dog   0.10 0.85 0.05                 dog        0.85        yes
#   4       dog   0.20 0.55 0.25                 dog        0.55        yes
#   5       dog   0.50 0.10 0.40                 cat        0.50        no
#   6       fox   0.50 0.10 0.40                 cat        0.50        yes
#   7       fox   0.20 0.70 0.10                 dog        0.70        no
#
# confusion (rows true): cat [2 1 0], dog [1 2 0], fox [1 1 0]
# precision: cat 2/4, dog 2/4, fox 0 (never predicted)
# recall:    cat 2/3, dog 2/3, fox 0/2
# f1:        cat = dog = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7, fox 0
# macro:     precision 1/3, recall 4/9, f1 8/21
# weighted (support 3, 3, 2): precision 3/8, recall 1/2, f1 3/7
# ECE, bins of width 1/15 (upper edge included):
#   (7/15, 8/15]:   0.50 x3, 1 correct -> 3/8 * |1/3 - 0.50| = 0.0625
#   (8/15, 9/15]:   0.55,    correct   -> 1/8 * |1 - 0.55|   = 0.05625
#   (9/15, 10/15]:  0.62,    wrong     -> 1/8 * 0.62         = 0.0775
#   (10/15, 11/15]: 0.70 x2, 1 correct -> 2/8 * |1/2 - 0.70| = 0.05
#   (12/15, 13/15]: 0.85,    correct   -> 1/8 * 0.15         = 0.01875
#   ECE = 0.265

NAMES = ["cat", "dog", "fox"]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
PROBABILITIES = [
    [0.70, 0.20, 0.10],
    [0.50, 0.30, 0.20],
    [0.28, 0.62, 0.10],
    [0.10, 0.85, 0.05],
    [0.20, 0.55, 0.25],
    [0.50, 0.10, 0.40],
    [0.50, 0.10, 0.40],
    [0.20, 0.70, 0.10],
]


@pytest.fixture(scope="module")
def metrics():
    return compute_metrics(Y_TRUE, PROBABILITIES, NAMES)


def test_accuracy_and_confusion_matrix(metrics):
    assert metrics["num_samples"] == 8 and metrics["num_classes"] == 3
    assert metrics["accuracy"] == pytest.approx(4 / 8)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [1, 1, 0]]


def test_top_k_only_up_to_the_number_of_classes(metrics):
    assert metrics["top_k_accuracy"] == pytest.approx({"top_1": 4 / 8, "top_3": 1.0})
    two = compute_metrics(Y_TRUE, PROBABILITIES, NAMES, top_k=2)
    assert two["top_k_accuracy"] == pytest.approx({"top_2": 6 / 8})


def test_per_class_scores(metrics):
    expected = {"cat": (2 / 4, 2 / 3, 4 / 7, 3), "dog": (2 / 4, 2 / 3, 4 / 7, 3),
                "fox": (0.0, 0.0, 0.0, 2)}
    for name, (precision, recall, f1, support) in expected.items():
        scores = metrics["per_class"][name]
        assert scores == pytest.approx({"precision": precision, "recall": recall, "f1": f1,
                                        "support": support}), name


def test_macro_and_weighted_averages(metrics):
    assert metrics["macro_avg"] == pytest.approx(
        {"precision": 1 / 3, "recall": 4 / 9, "f1": 8 / 21, "support": 8})
    assert metrics["weighted_avg"] == pytest.approx(
        {"precision": 3 / 8, "recall": 1 / 2, "f1": 3 / 7, "support": 8})


def test_expected_calibration_error(metrics):
    assert metrics["ece"] == pytest.approx(0.265)
    reliability = metrics["reliability"]
    assert len(reliability["bin_edges"]) == CALIBRATION_BINS + 1
    assert reliability["count"] == [0] * 7 + [3, 1, 1, 2, 0, 1, 0, 0]
    assert reliability["confidence"][7] == pytest.approx(0.5)
    assert reliability["accuracy"][7] == pytest.approx(1 / 3)
    assert reliability["accuracy"][10] == pytest.approx(0.5)
    assert reliability["confidence"][0] is None and reliability["accuracy"][0] is None


def test_expected_calibration_error_tiny_cases():
    # Two bins of one sample: 1/2 * |1 - 0.9| + 1/2 * |0 - 0.75| = 0.425.
    apart = compute_metrics([0, 1], [[0.9, 0.1], [0.75, 0.25]], ["a", "b"])
    assert apart["ece"] == pytest.approx(0.425)
    # One bin of two: confidence 0.945, accuracy 0.5 -> 0.445.
    together = compute_metrics([0, 1], [[0.95, 0.05], [0.94, 0.06]], ["a", "b"])
    assert together["ece"] == pytest.approx(0.445)
    assert together["reliability"]["count"][-1] == 2
    # Always right with full confidence: perfectly calibrated.
    assert compute_metrics([0, 1], [[1.0, 0.0], [0.0, 1.0]], ["a", "b"])["ece"] == 0.0


def test_macro_average_leaves_out_classes_absent_and_never_predicted():
    # "c" has no sample and no prediction; "b" is predicted once but has no sample.
    m = compute_metrics([0, 0, 0], [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0]],
                        ["a", "b", "c"])
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_avg"]["precision"] == pytest.approx(0.5)  # over a and b, not c
    assert m["weighted_avg"]["recall"] == pytest.approx(2 / 3)


def test_metrics_are_json_ready(metrics):
    assert json.loads(json.dumps(metrics)) == metrics


@pytest.mark.parametrize("y_true, probabilities, top_k, message", [
    ([0, 1], [[0.5, 0.5, 0.0]] * 2, 1, r"probabilities.*shape \(n, 2\)"),
    ([0], [[0.5, 0.5]] * 2, 1, r"y_true.*one label per row"),
    ([], np.zeros((0, 2)), 1, r"at least one"),
    ([0, 2], [[0.5, 0.5]] * 2, 1, r"y_true.*\[0, 1\].*2"),
    ([0, 1], [[0.5, 0.5]] * 2, 0, r"top_k.*Received: top_k=0"),
    ([0, 1], [[0.5, 0.5]] * 2, (1, 2.5), r"top_k.*Received: top_k=2.5"),
])
def test_compute_metrics_checks_its_arguments(y_true, probabilities, top_k, message):
    with pytest.raises(ConfigError, match=message):
        compute_metrics(y_true, probabilities, ["a", "b"], top_k=top_k)


# --- evaluate_arrays with a hand-made Keras model ---------------------------------------------


def brightness_model(size=8):
    """A Keras classifier whose class-1 probability rises with the mean pixel value."""
    inputs = keras.Input(shape=(size, size, 3))
    x = layers.GlobalAveragePooling2D()(inputs)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.array([[0.0, 0.02]] * 3, np.float32),
                                  np.array([0.0, -7.65], np.float32)])
    return model  # logit gap 0.06 * (mean - 127.5): mean 0 -> class 0, mean 255 -> class 1


def flat_images(values, size=8):
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in values])


def test_evaluate_arrays_with_a_keras_model(tmp_path):
    images = flat_images([0, 10, 250, 240, 200, 30])
    labels = [0, 1, 1, 0, 0, 1]  # samples 1, 3, 4 and 5 are wrong
    report = evaluate_arrays(brightness_model(), images, labels, ["dark", "light"], top_k=2,
                             output_dir=tmp_path / "eval", worst=2,
                             sources=[f"img{i}.png" for i in range(6)])
    assert report.metrics["accuracy"] == pytest.approx(2 / 6)
    assert report.metrics["top_k_accuracy"] == {"top_2": 1.0}
    # Confidences of the wrong ones: img1 0.9991, img3 0.9988, img5 0.9971, img4 0.9873.
    assert [m.source for m in report.mistakes] == ["img1.png", "img3.png", "img5.png",
                                                   "img4.png"]
    assert report.mistakes[0].to_dict() == {"file": "img1.png", "true": "light",
                                            "predicted": "dark", "confidence": pytest.approx(
                                                1 / (1 + np.exp(-7.05)), abs=1e-5)}
    assert {p.name for p in (tmp_path / "eval").iterdir()} == set(OUTPUT_FILES)
    with open(tmp_path / "eval" / "mistakes.csv") as f:
        assert [row["file"] for row in csv.DictReader(f)] == [m.source for m in report.mistakes]


def test_no_mistakes_writes_an_empty_csv_and_no_grid(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "mistakes.png").write_bytes(b"left over from an earlier evaluation")
    report = evaluate_arrays(brightness_model(), flat_images([0, 255]), [0, 1],
                             ["dark", "light"], output_dir=out)
    assert report.mistakes == [] and report.metrics["accuracy"] == 1.0
    assert (out / "mistakes.csv").read_text().splitlines() == ["file,true,predicted,confidence"]
    assert not (out / "mistakes.png").exists()
    assert report.to_dict()["mistakes"] == []
    swapped = evaluate_arrays(brightness_model(), flat_images([0, 255]), [1, 0],
                              ["dark", "light"])
    assert [m.source for m in swapped.mistakes] == ["array[0]", "array[1]"]


def test_evaluate_arrays_checks_its_arguments():
    model = brightness_model()
    with pytest.raises(ConfigError, match=r"images.*\(n, 8, 8, 3\).*Received: images.shape"):
        evaluate_arrays(model, flat_images([0], size=9), [0], ["a", "b"])
    with pytest.raises(ConfigError, match="sources"):
        evaluate_arrays(model, flat_images([0, 1]), [0, 1], ["a", "b"], sources=["x"])
    with pytest.raises(ConfigError, match="worst"):
        evaluate_arrays(model, flat_images([0]), [0], ["a", "b"], worst=0)
    with pytest.raises(ConfigError, match="labels.*one entry per image"):
        evaluate_arrays(model, flat_images([0, 1]), [0], ["a", "b"])
    with pytest.raises(ConfigError, match="class_names.*2 outputs.*Received: 3 names"):
        evaluate_arrays(model, flat_images([0]), [0], ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"y_true.*\[0, 1\]"):
        evaluate_arrays(model, flat_images([0]), [2], ["a", "b"])
    with pytest.raises(ConfigError, match="model"):
        evaluate_arrays("not a model", flat_images([0]), [0], ["a", "b"])


def test_evaluate_arrays_uses_given_probabilities(monkeypatch):
    def no_forward_pass(*args, **kwargs):
        raise AssertionError("the model was run although its probabilities were given")

    monkeypatch.setattr("tlkit.evaluate.predict_probabilities", no_forward_pass)
    given = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
    report = evaluate_arrays(brightness_model(), flat_images([0, 255, 250]), [0, 1, 1],
                             ["dark", "light"], probabilities=given)
    assert report.metrics["accuracy"] == pytest.approx(2 / 3)
    assert [m.source for m in report.mistakes] == ["array[2]"]
    with pytest.raises(ConfigError, match=r"probabilities.*\(3, 2\).*Received"):
        evaluate_arrays(brightness_model(), flat_images([0, 255, 250]), [0, 1, 1],
                        ["dark", "light"], probabilities=given[:2])


def test_probability_metrics_equal_evaluate_on_the_dataset():
    import tensorflow as tf

    from tlkit.models import predict_probabilities
    from tlkit.training import evaluate, probability_metrics

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (21, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 21).astype(np.int64)
    model = brightness_model()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4).map(
        lambda x, y: (tf.cast(x, tf.float32), y))
    probabilities = predict_probabilities(model, images, 4)
    assert probability_metrics(labels, probabilities, 4) == evaluate(model, dataset)
    assert np.isnan(probability_metrics(labels[:0], probabilities[:0], 4)["loss"])


# --- evaluate_folder on a tiny trained export -------------------------------------------------

CLASSES = ("circle", "square", "star")
SIZE = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def export_path(base):
    folder = write_image_folder(base / "train", classes=CLASSES, per_class=8, size=20)
    result = tlkit.fit(str(folder), image_size=SIZE, epochs=2, batch_size=8,
                       learning_rate=0.01, augment="none", flip="none", verbose=0,
                       export_dir=str(base / "exports"), runs_dir=str(base / "runs"))
    return result.export_path


@pytest.fixture(scope="module")
def eval_dir(base):
    """New images of every class, two deliberately mislabelled, one corrupt file."""
    folder = write_image_folder(base / "eval", classes=CLASSES, per_class=4, size=20, seed=1)
    for index in range(2):  # "star" pictures filed as "circle"
        image = make_class_image(CLASSES.index("star"), 50 + index, 20, seed=1)
        Image.fromarray(image).save(folder / "circle" / f"mislabelled_{index}.png")
    (folder / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def evaluated(export_path, eval_dir, base):
    out = base / "report"
    return evaluate_folder(eval_dir, export_path, top_k=2, output_dir=out), out


def test_evaluate_folder_report(evaluated, export_path, eval_dir):
    report, _ = evaluated
    m = report.metrics
    assert m["class_names"] == list(CLASSES)
    assert m["num_samples"] == 14  # 12 + 2 mislabelled; the corrupt file is skipped
    assert [s["support"] for s in m["per_class"].values()] == [6, 4, 4]
    assert sum(map(sum, m["confusion_matrix"])) == 14
    assert set(m["top_k_accuracy"]) == {"top_2"}
    assert len(report.mistakes) == round(14 * (1 - m["accuracy"]))
    assert report.model == str(export_path) and report.data == str(eval_dir)


def test_evaluate_folder_skips_and_lists_a_corrupt_file(evaluated):
    report, _ = evaluated
    assert [p for p, _ in report.skipped] == [str(Path(report.data, "square", "corrupt.png"))]
    assert report.skipped[0][1]  # the reason
    assert "corrupt.png" in report.to_text()


def test_evaluate_folder_writes_every_output(evaluated):
    report, out = evaluated
    assert report.mistakes, "the mislabelled images guarantee mistakes"
    assert {p.name for p in out.iterdir()} == set(OUTPUT_FILES)
    for name in OUTPUT_FILES:
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                assert image.format == "PNG"
                image.verify()
            with Image.open(out / name) as image:
                assert image.width >= 300 and image.height >= 250, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["skipped"][0]["file"].endswith("corrupt.png")
    with open(out / "mistakes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [m.source for m in report.mistakes]
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    assert all(r["true"] != r["predicted"] for r in rows)


def test_evaluate_folder_equals_evaluate_arrays_on_the_same_pixels(evaluated, export_path):
    report, _ = evaluated
    classifier = tlkit.load(export_path)
    files = _readable_files(report)
    labels = [CLASSES.index(p.parent.name) for p in files]
    images = np.stack([load_image(p, SIZE) for p in files])
    from_arrays = evaluate_arrays(classifier, images, labels, list(CLASSES), top_k=2,
                                  sources=[str(p) for p in files])
    assert _close(from_arrays.metrics, report.metrics)
    assert [m.source for m in from_arrays.mistakes] == [m.source for m in report.mistakes]
    assert from_arrays.model == str(export_path)


def _readable_files(report):
    skipped = {p for p, _ in report.skipped}
    root = Path(report.data)
    return [p for name in CLASSES for p in sorted((root / name).iterdir())
            if str(p) not in skipped]


def _close(a, b):
    """Equal structures, floats within 1e-6."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, abs=1e-6)
    return a == b


def test_to_text(evaluated):
    report, _ = evaluated
    text = report.to_text()
    for expected in ("accuracy", "top-2 accuracy", "ECE (15 bins)", "precision", "recall",
                     "macro avg", "weighted avg", "confusion matrix (rows: true class",
                     "Skipped 1 file"):
        assert expected in text, expected
    for name, row in zip(CLASSES, report.metrics["confusion_matrix"]):
        assert any(line.split() == [name, *map(str, row)] for line in text.splitlines())


def test_evaluate_folder_with_a_subset_of_the_classes(export_path, eval_dir, tmp_path):
    subset = tmp_path / "subset"
    shutil.copytree(eval_dir / "star", subset / "star")
    report = evaluate_folder(subset, export_path)
    assert report.metrics["num_samples"] == 4
    assert [s["support"] for s in report.metrics["per_class"].values()] == [0, 0, 4]


def test_unknown_class_folder_is_a_clear_error(export_path, tmp_path):
    folder = write_image_folder(tmp_path / "other", classes=("circle", "zebra"), per_class=1)
    with pytest.raises(DataError, match="zebra"):
        evaluate_folder(folder, export_path)


def test_evaluate_folder_finds_the_newest_export(export_path, tmp_path):
    folder = write_image_folder(tmp_path / "one", classes=("circle",), per_class=2, size=20)
    report = evaluate_folder(folder, export_dir=export_path.parent.parent, top_k=(1, 3))
    assert report.model == str(export_path)
    assert report.metrics["top_k_accuracy"]["top_3"] == 1.0


def test_evaluate_folder_with_no_readable_image(export_path, tmp_path):
    folder = tmp_path / "broken"
    (folder / "circle").mkdir(parents=True)
    (folder / "circle" / "a.png").write_bytes(b"nothing")
    with pytest.raises(DataError, match="No image .* could be read"):
        evaluate_folder(folder, export_path)


def test_fit_evaluates_each_split_with_one_forward_pass(base, monkeypatch):
    import tlkit.api
    import tlkit.evaluate

    folder = write_image_folder(base / "one_pass", classes=CLASSES, per_class=10, size=20)
    passes = []
    real = tlkit.api.predict_probabilities

    def counted(model, images, batch_size=256):
        passes.append(len(images))
        return real(model, images, batch_size)

    monkeypatch.setattr(tlkit.api, "predict_probabilities", counted)
    monkeypatch.setattr(tlkit.evaluate, "predict_probabilities", counted)
    result = tlkit.fit(str(folder), image_size=SIZE, epochs=1, batch_size=8,
                       augment="none", flip="none", verbose=0, test_split=0.2,
                       export_dir=str(base / "one_pass_exports"),
                       runs_dir=str(base / "one_pass_runs"))
    assert passes == [6, 6]  # val, then test: 20% of 30 images each
    saved = json.loads((result.run_dir / "evaluation_val" / "metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == result.metrics["val"]["accuracy"]
