"""Classifiers: parameter counts, layer names, sizes, errors, training, Preprocess, seeds."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.applications import imagenet_utils

import tlkit
from tlkit.backbones import build_lenet5, get_backbone, list_backbones
from tlkit.errors import ConfigError
from tlkit.layers import PREPROCESSING_MODES, Preprocess
from tlkit.models import build_classifier, load_keras_model
from tlkit.training import Trainer, evaluate

BACKBONE_SIZES = [("scratch", 16), ("lenet5", 32)]


def _random_images(count, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def _dataset(images, labels, batch_size=8):
    return tf.data.Dataset.from_tensor_slices(
        (images, np.asarray(labels, np.int64))).batch(batch_size)


# --- Architecture -----------------------------------------------------------------------


def test_lenet5_classifier_has_62006_parameters_on_rgb():
    assert build_classifier("lenet5", 10, 32).count_params() == 62_006


def test_lenet5_with_a_10_unit_dense_has_the_textbook_61706_parameters():
    inputs = keras.Input((32, 32, 1))
    outputs = keras.layers.Dense(10)(build_lenet5((32, 32, 1))(inputs))
    assert keras.Model(inputs, outputs).count_params() == 61_706


def test_scratch_cnn_grows_with_image_size_and_outputs_a_softmax():
    blocks = []
    for size in (16, 32, 64, 128):
        model = build_classifier("scratch", 3, size)
        backbone = model.get_layer("backbone")
        blocks.append(sum(layer.name.endswith("_pool") for layer in backbone.layers))
        assert backbone.output.shape[1:3] == (4, 4), size
        probabilities = np.asarray(model(_random_images(2, size), training=False))
        assert probabilities.shape == (2, 3)
        assert np.all(probabilities >= 0)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert blocks == sorted(set(blocks)), blocks
    assert blocks[0] >= 2


@pytest.mark.parametrize("backbone, size", BACKBONE_SIZES)
def test_named_layers_exist(backbone, size):
    model = build_classifier(backbone, 4, size)
    names = [layer.name for layer in model.layers]
    for name in ("preprocess", "backbone", "output_dropout", "predictions"):
        assert name in names
    assert ("pooler" in names) == (backbone == "scratch")
    assert model.get_layer("predictions").units == 4
    assert model.get_layer("predictions").activation is keras.activations.softmax
    assert model.get_layer("preprocess").mode == get_backbone(backbone).preprocessing
    assert model.get_layer("output_dropout").rate == get_backbone(backbone).default_dropout
    assert model.name == f"tlkit_{backbone}"


def test_dropout_argument_sets_the_output_dropout_rate():
    assert build_classifier("scratch", 2, 16, dropout=0.5).get_layer("output_dropout").rate == 0.5


def test_unknown_backbone_lists_the_known_names_in_keras_style():
    with pytest.raises(ConfigError) as info:
        build_classifier("x", 10, 32)
    assert str(info.value) == (
        f"`backbone` must be one of {list_backbones()}. Received: backbone='x'"
    )
    assert {"scratch", "lenet5"} <= set(list_backbones())


@pytest.mark.parametrize("backbone, size", [("scratch", 8), ("scratch", 15), ("lenet5", 31)])
def test_image_size_below_the_minimum_is_refused(backbone, size):
    with pytest.raises(ConfigError) as info:
        build_classifier(backbone, 10, size)
    assert f"Received: image_size={size}" in str(info.value)


@pytest.mark.parametrize("num_classes", [1, 2.5])
def test_fewer_than_two_classes_is_refused(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        build_classifier("scratch", num_classes, 16)


# --- Training -------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, size", BACKBONE_SIZES)
def test_one_training_step_changes_every_trainable_weight(backbone, size):
    keras.utils.set_random_seed(1)
    model = build_classifier(backbone, 2, size)
    images, labels = _random_images(8, size), [0, 1] * 4
    before = [v.numpy().copy() for v in model.trainable_variables]
    result = Trainer(model, verbose=0).train_stage(
        _dataset(images, labels), _dataset(images, labels), epochs=1, learning_rate=1e-3)
    assert len(result.history) == 1 and result.best_epoch == 1
    after = [v.numpy() for v in model.trainable_variables]
    unchanged = [v.path for v, b, a in zip(model.trainable_variables, before, after)
                 if np.array_equal(b, a)]
    assert not unchanged


def test_early_stopping_restores_the_best_epoch_weights():
    keras.utils.set_random_seed(2)
    model = build_classifier("lenet5", 2, 32)
    images = _random_images(16, 32, seed=3)
    labels = np.array([0, 1] * 8)
    train_ds = _dataset(images, labels)
    val_ds = _dataset(images, 1 - labels)  # learning the training labels worsens these
    result = Trainer(model, verbose=0).train_stage(
        train_ds, val_ds, epochs=8, learning_rate=1e-2, patience=1)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.stopped_early
    assert len(result.history) < 8
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    assert len(result.history) == result.best_epoch + 1  # patience=1: one epoch after best
    restored = evaluate(model, val_ds)["loss"]
    assert restored == pytest.approx(val_losses[result.best_epoch - 1], abs=1e-6)
    assert restored != pytest.approx(val_losses[-1], abs=1e-6)
    assert result.best["val_loss"] == val_losses[result.best_epoch - 1]


# --- Preprocess -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocess_matches_keras_imagenet_preprocessing(mode):
    images = _random_images(2, 4, seed=5)
    expected = imagenet_utils.preprocess_input(images.copy(), mode=mode)
    actual = np.asarray(Preprocess(mode)(images))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_preprocess_values_by_mode():
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    caffe = np.asarray(Preprocess("caffe")(pixel))[0, 0, 0]
    np.testing.assert_allclose(caffe, [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-4)
    extremes = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(np.asarray(Preprocess("unit")(extremes))[0, 0, 0],
                               [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(Preprocess("tf")(extremes))[0, 0, 0],
                               [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(Preprocess("none")(pixel)), pixel)
    torch = np.asarray(Preprocess("torch")(pixel))[0, 0, 0]
    np.testing.assert_allclose(torch, [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                                       (30 / 255 - 0.406) / 0.225], atol=1e-5)


def test_preprocess_accepts_uint8_and_rejects_unknown_modes():
    pixel = np.array([[[[255, 0, 51]]]], np.uint8)
    np.testing.assert_allclose(np.asarray(Preprocess("unit")(pixel))[0, 0, 0],
                               [1.0, 0.0, 0.2], atol=1e-6)
    with pytest.raises(ValueError, match="Received: mode='bgr'"):
        Preprocess("bgr")


@pytest.mark.parametrize("backbone, size", BACKBONE_SIZES)
def test_classifier_round_trips_through_a_keras_file(tmp_path, backbone, size):
    model = build_classifier(backbone, 3, size)
    path = tmp_path / "x.keras"
    model.save(path)
    loaded = load_keras_model(path)
    images = _random_images(3, size, seed=6)
    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)),
                                  np.asarray(model(images, training=False)))
    assert isinstance(loaded.get_layer("preprocess"), Preprocess)


@pytest.mark.parametrize("mode", PREPROCESSING_MODES)
def test_preprocess_modes_round_trip_in_safe_mode(tmp_path, mode):
    inputs = keras.Input((4, 4, 3))
    x = Preprocess(mode, name="preprocess")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "x.keras")
    loaded = load_keras_model(tmp_path / "x.keras")
    layer = loaded.get_layer("preprocess")
    assert isinstance(layer, Preprocess) and layer.mode == mode
    images = _random_images(2, 4, seed=7)
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(model(images)))


# --- Seeded runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("seeded")
    return write_image_folder(base / "shapes", classes=("a", "b", "c"), per_class=8, size=20)


def _fit(data_dir, tag, seed, **options):
    base = data_dir.parent / tag
    return tlkit.fit(str(data_dir), image_size=16, epochs=2, batch_size=4, seed=seed,
                     export_dir=str(base / "exports"), runs_dir=str(base / "runs"), verbose=0,
                     **options)


def _assert_same_runs(first, second):
    assert len(first.history) == len(second.history) == 2
    for a, b in zip(first.history, second.history):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def unaugmented_runs(shapes_dir):
    options = dict(augment="none", flip="none")
    return [_fit(shapes_dir, tag, seed, **options)
            for tag, seed in (("first", 123), ("second", 123), ("other", 124))]


def test_seeded_fits_repeat_exactly(unaugmented_runs):
    first, second, _ = unaugmented_runs
    _assert_same_runs(first, second)


def test_another_seed_gives_another_run(unaugmented_runs):
    first, _, other = unaugmented_runs
    assert [h["loss"] for h in first.history] != pytest.approx(
        [h["loss"] for h in other.history], abs=1e-6)


def test_seeded_fits_with_augmentation_repeat_exactly(shapes_dir):
    from tlkit.augment import build_augmenter
    from tlkit.data import ImageCache, Split, make_dataset

    # The training pipeline on its own, several times: one pair of fits can match by chance.
    pixels = np.random.default_rng(0).integers(0, 256, (18, 16, 16, 3), dtype=np.uint8)
    cache = ImageCache(len(pixels), 16, "memory")
    cache.array[:] = pixels
    split = Split("train", cache, np.arange(18), np.arange(18) % 3, [""] * 18)
    epochs = []
    for _ in range(5):
        keras.utils.set_random_seed(123)
        augmenter = build_augmenter("standard", "horizontal", seed=123)
        dataset = make_dataset(split, 4, shuffle=True, seed=123, augmenter=augmenter)
        epochs.append(np.concatenate([x.numpy() for _ in range(2) for x, _ in dataset]))
    for other in epochs[1:]:
        np.testing.assert_array_equal(other, epochs[0])

    _assert_same_runs(_fit(shapes_dir, "aug1", 123), _fit(shapes_dir, "aug2", 123))
