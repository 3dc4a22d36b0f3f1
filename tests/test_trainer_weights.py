"""Class-weighted loss and BatchNorm momentum for short epochs."""

import keras
import numpy as np
import tensorflow as tf

from tlkit.api import balanced_class_weights
from tlkit.models import build_classifier
from tlkit.training import Trainer, adapt_batchnorm_momentum


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


def test_batchnorm_momentum_follows_the_epoch_length():
    model = build_classifier("scratch", 2, 16)
    norms = [layer for layer in model.get_layer("backbone").layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for steps, expected in ((2, 0.0), (4, 0.5), (10, 0.8), (500, 0.9)):
        assert adapt_batchnorm_momentum(model, steps) == expected
        assert all(layer.momentum == expected for layer in norms)
