"""`Classifier.predict` gives the same answers whatever its batch size, equal to
`predict_arrays` on the decoded files, in input order even with a corrupt file among them."""

import numpy as np
import pytest

import tlkit
from conftest import write_image_folder
from tlkit.images import load_image

CLASSES = ("a", "b")
SIZE = 16
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("batching")


@pytest.fixture(scope="module")
def classifier(base):
    data_dir = write_image_folder(base / "train", classes=CLASSES, per_class=10, size=20)
    result = tlkit.fit(str(data_dir), image_size=SIZE, epochs=1, augment="none", flip="none",
                       verbose=0, export_dir=str(base / "exports"), runs_dir=str(base / "runs"))
    return tlkit.load(result.export_path)


@pytest.fixture(scope="module")
def inputs(base):
    """20 PNG and JPEG files of other sizes than the model input, with a corrupt file at
    position 10; returns (all inputs, the position of the corrupt one)."""
    pngs = write_image_folder(base / "png", classes=CLASSES, per_class=5, size=24, seed=1)
    jpegs = write_image_folder(base / "jpg", classes=CLASSES, per_class=5, size=28, fmt="jpg",
                               seed=2)
    good = sorted(pngs.rglob("*.png")) + sorted(jpegs.rglob("*.jpg"))
    corrupt = base / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 a JPEG header and then nothing")
    middle = len(good) // 2
    return good[:middle] + [corrupt] + good[middle:], middle


def probabilities(predictions, class_names):
    """Full probability rows (in class order) from predictions made with top_k = classes."""
    rows = []
    for p in predictions:
        by_name = dict(zip(p.labels, p.probabilities))
        rows.append([by_name[name] for name in class_names])
    return np.array(rows)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_predictions(classifier, inputs, batch_size):
    files, bad = inputs
    k = len(classifier.class_names)
    small = classifier.predict(files, top_k=k, batch_size=batch_size)
    large = classifier.predict(files, top_k=k, batch_size=64)
    keep = [i for i in range(len(files)) if i != bad]
    np.testing.assert_allclose(probabilities([small[i] for i in keep], classifier.class_names),
                               probabilities([large[i] for i in keep], classifier.class_names),
                               rtol=0, atol=TOLERANCE)
    assert [p.labels for p in small] == [p.labels for p in large]


def test_predict_equals_predict_arrays_on_loaded_images(classifier, inputs):
    files, bad = inputs
    good = [f for i, f in enumerate(files) if i != bad]
    images = np.stack([load_image(f, classifier.image_size, classifier.resize) for f in good])
    expected = classifier.predict_arrays(images)
    predictions = classifier.predict(good, top_k=len(classifier.class_names), batch_size=1)
    np.testing.assert_allclose(probabilities(predictions, classifier.class_names), expected,
                               rtol=0, atol=TOLERANCE)
    assert [p.label for p in predictions] == [classifier.class_names[i]
                                              for i in expected.argmax(axis=1)]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_results_follow_input_order_around_a_corrupt_file(classifier, inputs, batch_size):
    files, bad = inputs
    predictions = classifier.predict(files, top_k=1, batch_size=batch_size)
    assert [p.source for p in predictions] == [str(f) for f in files]
    assert predictions[bad].error and not predictions[bad].labels
    assert all(p.error is None and p.label in CLASSES
               for i, p in enumerate(predictions) if i != bad)
    alone = [classifier.predict(f, top_k=1)[0].label for f in (files[bad - 1], files[bad + 1])]
    assert [predictions[bad - 1].label, predictions[bad + 1].label] == alone
