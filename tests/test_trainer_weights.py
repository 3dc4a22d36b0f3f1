"""Class-weighted loss and BatchNorm momentum for short epochs."""

import keras
import numpy as np
import tensorflow as tf

from tlkit.api import balanced_class_weights, balanced_label_weights
from tlkit.models import build_classifier
from conftest import write_image_folder
from tlkit.training import Trainer, adapt_batchnorm_momentum, run_schedule


def test_balanced_class_weights_weigh_rare_classes_more():
    weights = balanced_class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    np.testing.assert_allclose(weights, [6 / (4 * 3), 6 / (4 * 1), 6 / (4 * 2), 6 / 4])


def _same_input(labels):
    images = np.ones((len(labels), 4), "float32")
    return tf.data.Dataset.from_tensor_slices((images, np.asarray(labels))).batch(16)


def _probability_of_class_1(sample_weights, val_share):
    """Trains on one input labelled 0 half the time and 1 the other half: the best
    unweighted answer is 50/50, and weighting class 1 by w moves it to w / (1 + w). The
    validation labels are 1 for `val_share` of them, so the kept best epoch agrees."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    train = _same_input(np.tile([0, 1], 32))
    val = _same_input([1] * int(100 * val_share) + [0] * int(100 * (1 - val_share)))
    Trainer(model, verbose=0).train_stage(train, val, epochs=60, learning_rate=0.05,
                                          patience=60, sample_weights=sample_weights)
    return float(model(np.ones((1, 4), "float32"))[0, 1])


def test_class_weights_scale_each_example_of_the_loss():
    assert abs(_probability_of_class_1(None, 0.5) - 0.5) < 0.05
    assert abs(_probability_of_class_1(np.array([1.0, 9.0], "float32"), 0.9) - 0.9) < 0.05


def test_balanced_label_weights_weigh_each_labels_rare_state_more():
    matrix = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], np.float32)  # a: 1 of 4, b: 2 of 4
    np.testing.assert_allclose(balanced_label_weights(matrix),
                               [[4 / (2 * 3), 4 / (2 * 2)], [4 / (2 * 1), 4 / (2 * 2)]])


def _presence_probabilities(sample_weights, val_shares):
    """A sigmoid layer on one input whose two labels are each present half the time: the
    unweighted best answer is 0.5 for both, and weights (absent w0, present w1) move a
    label's to w1 / (w0 + w1). In the validation labels label j is present for
    `val_shares[j]` of them, so the kept best epoch agrees."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(inputs))
    train = _same_input(np.tile(np.array([[1, 0], [0, 1]], np.float32), (32, 1)))
    val = _same_input(np.stack([np.arange(100) < 100 * share for share in val_shares],
                               axis=1).astype(np.float32))
    Trainer(model, verbose=0).train_stage(train, val, epochs=80, learning_rate=0.05,
                                          patience=80, sample_weights=sample_weights)
    return model(np.ones((1, 4), "float32")).numpy()[0]


def test_multi_label_weights_scale_each_labels_present_and_absent_terms():
    np.testing.assert_allclose(_presence_probabilities(None, (0.5, 0.5)), [0.5, 0.5],
                               atol=0.03)
    weights = np.array([[1.0, 3.0], [4.0, 1.0]], np.float32)  # a present x4, b absent x3
    np.testing.assert_allclose(_presence_probabilities(weights, (0.8, 0.25)), [0.8, 0.25],
                               atol=0.03)


def test_batchnorm_momentum_follows_the_epoch_length():
    model = build_classifier("scratch", 2, 16)
    norms = [layer for layer in model.get_layer("backbone").layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for steps, expected in ((2, 0.0), (4, 0.5), (10, 0.8), (500, 0.9)):
        assert adapt_batchnorm_momentum(model, steps) == expected
        assert all(layer.momentum == expected for layer in norms)


def test_fit_with_class_weight_auto_weighs_the_loss_by_its_training_split(image_folder,
                                                                          tmp_path,
                                                                          monkeypatch):
    import csv

    import tlkit
    from tlkit import api

    folder = image_folder(per_class=4)
    write_image_folder(folder, classes=("a",), per_class=12, seed=1)  # 12 a, 4 b
    given = []

    def spy(model, groups, stages, train_ds, val_ds, settings, *args, **kwargs):
        given.append(settings.sample_weights)
        return run_schedule(model, groups, stages, train_ds, val_ds, settings, *args, **kwargs)

    monkeypatch.setattr(api, "run_schedule", spy)
    for class_weight in ("auto", "none"):
        result = tlkit.fit(folder, class_weight=class_weight, backbone="scratch",
                           image_size=16, epochs=1, augment="none", flip="none", verbose=0,
                           runs_dir=tmp_path / "runs", export_dir=tmp_path / class_weight)
    with open(result.run_dir / "splits.csv", newline="") as f:
        train = [row["class"] for row in csv.DictReader(f) if row["split"] == "train"]
    counts = np.array([train.count("a"), train.count("b")])
    assert counts[0] > 2 * counts[1]
    np.testing.assert_allclose(given[0], len(train) / (2 * counts), rtol=1e-6)
    assert given[1] is None
