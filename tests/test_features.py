"""Cached backbone features: the same head as the full model, and a cache that knows when
it is stale."""

import json
from pathlib import Path

import numpy as np
import pytest

import tlkit
from tlkit.augment import build_augmenter
from tlkit.data import ImageCache, Split
from tlkit.backbones import get_backbone, unfreeze_groups
from tlkit.features import (FeatureCache, feature_dataset, feature_extractor, frozen_cut,
                            head_model, split_features)
from tlkit.models import build_classifier
from tlkit.training import set_trainable

SETTINGS = dict(backbone_name="lenet5", image_size=32, resize="squash", preprocessing="unit",
                augment="none", flip="none")


def make_split(count=12, size=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)
    cache = ImageCache(count, size, "memory")
    cache.array[:] = pixels
    labels = np.arange(count) % 2
    return Split("train", cache, np.arange(count), labels, [f"f{i}" for i in range(count)],
                 [f"digest{i}" for i in range(count)])


def test_head_on_cached_features_equals_the_full_model():
    model = build_classifier("resnet50", 3, 32, weights="none")
    split = make_split()
    features = split_features(model, split, split.digests, None, SETTINGS, verbose=0)
    from_features = head_model(model).predict(features.features[0], verbose=0)
    full = model.predict(split.images.astype("float32"), verbose=0)
    np.testing.assert_allclose(from_features, full, atol=1e-5)
    assert head_model(model).get_layer("predictions") is model.get_layer("predictions")


def test_training_the_head_trains_the_models_own_head():
    model = build_classifier("lenet5", 2, 32)
    head = head_model(model)
    kernel = model.get_layer("predictions").kernel.numpy().copy()
    head.compile("adam", "sparse_categorical_crossentropy")
    head.fit(np.ones((4, 84), "float32"), np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    assert not np.array_equal(model.get_layer("predictions").kernel.numpy(), kernel)


@pytest.mark.parametrize("backbone, target, cut", [
    ("mobilenet", "block13", "conv_pw_12_relu"),
    ("mobilenet", "block12", "conv_pad_12"),  # the padding has no weights: it stays below
    ("resnet50", "conv5", "conv4_block6_out"),  # the residual branches join above the cut
])
def test_unfreezing_stage_trains_on_the_activations_below_its_groups(backbone, target, cut):
    model = build_classifier(backbone, 3, 32, weights="none")
    groups = unfreeze_groups(get_backbone(backbone), model.get_layer("backbone"))
    set_trainable(model, groups, target)
    assert frozen_cut(model) == cut
    images = make_split(6).images.astype("float32")
    activations = feature_extractor(model, cut).predict(images, verbose=0)
    upper = head_model(model, cut)
    np.testing.assert_allclose(upper.predict(activations, verbose=0),
                               model.predict(images, verbose=0), atol=1e-5)
    trained = {id(v) for v in upper.trainable_variables}
    assert trained == {id(v) for v in model.trainable_variables}


@pytest.mark.parametrize("target", ["head", "all"])
def test_no_cut_when_the_whole_backbone_is_frozen_or_trains(target):
    model = build_classifier("mobilenet", 3, 32, weights="none")
    set_trainable(model, unfreeze_groups(get_backbone("mobilenet"), model.get_layer("backbone")),
                  target)
    assert frozen_cut(model) is None


def test_cache_hits_and_every_key_change_invalidates(tmp_path):
    model = build_classifier("lenet5", 2, 32)
    split = make_split()
    cache = FeatureCache(tmp_path / "features")
    augmenter = build_augmenter("light", "horizontal", seed=3)
    common = dict(augmenter=augmenter, views=2, verbose=0, seed=3)
    first = split_features(model, split, split.digests, cache, SETTINGS, **common)
    assert not first.from_cache and first.features.shape == (2, 12, 84)
    again = split_features(model, split, split.digests, cache, SETTINGS, **common)
    assert again.from_cache
    np.testing.assert_array_equal(again.features, first.features)

    changed_settings = [{**SETTINGS, key: value} for key, value in (
        ("image_size", 40), ("resize", "pad"), ("preprocessing", "tf"), ("augment", "heavy"),
        ("flip", "vertical"), ("backbone_name", "scratch"))]
    for settings in changed_settings:
        assert not split_features(model, split, split.digests, cache, settings,
                                  **common).from_cache, settings
    for change in (dict(views=3), dict(seed=4), dict(augmenter=None, views=1)):
        options = {**common, **change}
        assert not split_features(model, split, split.digests, cache, SETTINGS,
                                  **options).from_cache, change
    edited = [*split.digests[:-1], "another file content"]
    assert not split_features(model, split, edited, cache, SETTINGS, **common).from_cache
    layer = model.get_layer("backbone").get_layer("c1")
    layer.kernel.assign(layer.kernel + 0.01)  # other backbone weights
    assert not split_features(model, split, split.digests, cache, SETTINGS, **common).from_cache


def test_cache_cap_info_and_clear(tmp_path):
    cache = FeatureCache(tmp_path / "features", max_bytes=3000)
    for index in range(4):
        cache.put(f"key{index}", np.zeros(200, np.float32))  # ~928 bytes each
    info = cache.info()
    assert info["bytes"] <= 3000 and info["entries"] == 3
    assert cache.get("key0") is None and cache.get("key3") is not None
    assert cache.clear() == info["bytes"] and cache.info()["entries"] == 0


def test_feature_dataset_draws_one_view_per_image_each_epoch():
    features = np.stack([np.full((6, 2), view, np.float32) for view in range(3)])
    labels = np.arange(6)
    from tlkit.features import SplitFeatures

    dataset = feature_dataset(SplitFeatures(features, labels, False), 4, shuffle=True, seed=1)
    seen_views = set()
    for _ in range(4):
        rows = [(x.numpy(), y.numpy()) for x, y in dataset]
        epoch_labels = np.concatenate([y for _, y in rows])
        assert sorted(epoch_labels) == list(range(6))  # each image once per epoch
        seen_views |= {float(v) for x, _ in rows for v in x[:, 0]}
    assert seen_views == {0.0, 1.0, 2.0}


def test_fit_uses_cached_features_for_the_head_stage_and_reuses_them(image_folder, tmp_path):
    folder = image_folder(per_class=8, size=16)
    common = dict(image_size=32, epochs=2, augment="light", flip="none", verbose=0,
                  runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm",
                  cache_dir=tmp_path / "cache")
    first = tlkit.fit(folder, backbone="lenet5", **common)
    weights = str(first.run_dir / "backbone.weights.h5")
    staged = dict(backbone="lenet5", weights=weights, unfreeze=1, fine_tune_epochs=1,
                  cached_views=2, fine_tune_cache=True, **common)
    a = tlkit.fit(folder, **staged)
    stored = list((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(stored) == 4  # train (2 views) and validation, for the head and for f6
    shapes = sorted(np.load(path).shape for path in stored)
    assert [shape[:2] for shape in shapes] == [(1, 4), (1, 4), (2, 12), (2, 12)]
    assert shapes[0][2:] != shapes[1][2:]  # pooled features and the activations below f6
    b = tlkit.fit(folder, **staged, dropout=0.5)  # a different head reuses the features
    assert sorted((tmp_path / "cache" / "features").glob("*.npy")) == sorted(stored)
    assert [h["stage"] for h in a.history] == ["head", "head", "f6"]  # fine_tune_epochs=1
    classifier = tlkit.load(a.export_path)
    images = np.stack([tlkit.images.load_image(f, 32) for f in sorted(folder.rglob("*.png"))])
    np.testing.assert_allclose(classifier.predict_arrays(images),
                               a.model.predict(images.astype("float32"), verbose=0), atol=1e-5)
    assert b.export_path != a.export_path




def test_head_only_fit_evaluates_validation_on_its_features_like_the_full_model(
        image_folder, tmp_path, monkeypatch):
    import csv

    import tlkit.api
    from tlkit.models import build_backbone, predict_probabilities

    folder = image_folder(per_class=10, size=16)
    weights = tmp_path / "backbone.weights.h5"
    build_backbone("lenet5", 32, "none").save_weights(weights)
    inputs = []

    def recording(model, images, batch_size=256):  # the real function, its inputs recorded
        inputs.append(tuple(np.shape(images)[1:]))
        return predict_probabilities(model, images, batch_size)

    monkeypatch.setattr(tlkit.api, "predict_probabilities", recording)
    common = dict(backbone="lenet5", weights=str(weights), image_size=32, augment="none",
                  flip="none", verbose=0, runs_dir=tmp_path / "runs",
                  export_dir=tmp_path / "sm", cache_dir=tmp_path / "cache", test_split=0.2)
    result = tlkit.fit(folder, epochs=3, unfreeze=0, **common)
    width = result.model.get_layer("predictions").kernel.shape[0]
    assert inputs == [(width,), (32, 32, 3)]  # val: the head on its features; test: images

    with open(result.run_dir / "splits.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "val"]
    images = np.stack([tlkit.images.load_image(Path(folder).parent / row["file"], 32)
                       for row in rows])
    classes = tlkit.load(result.export_path).class_names
    labels = np.array([classes.index(row["class"]) for row in rows])
    full = result.model.predict(images.astype("float32"), verbose=0)  # the whole model
    loss = float(np.mean(-np.log(full[np.arange(len(labels)), labels])))
    assert result.metrics["val"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert result.metrics["val"]["accuracy"] == np.mean(full.argmax(axis=1) == labels)

    # A kept unfreezing stage changed the backbone: the validation images go through it.
    inputs.clear()
    staged = tlkit.fit(folder, stages="head:1@1e-3,f6:2@1e-2", patience=5, name="unfrozen",
                       **common)
    schedule = json.loads((staged.run_dir / "schedule.json").read_text())
    kept = not schedule[1]["rolled_back"]
    assert inputs[0] == ((32, 32, 3) if kept else (width,)), schedule


def test_no_feature_cache_flag_trains_a_pretrained_head_on_the_full_model(image_folder,
                                                                           tmp_path):
    from click.testing import CliRunner

    from tlkit.cli import main
    from tlkit.models import build_backbone

    folder = image_folder(per_class=6, size=16)
    weights = tmp_path / "backbone.weights.h5"
    build_backbone("lenet5", 32, "none").save_weights(weights)  # pretrained: from a file
    args = ["fit", str(folder), "--backbone", "lenet5", "--weights", str(weights),
            "--image-size", "32", "--epochs", "1", "--unfreeze", "0", "--augment", "none",
            "--flip", "none", "--runs-dir", str(tmp_path / "runs"), "-q"]
    for flag, cached in (("--no-feature-cache", False), ("--feature-cache", True)):
        cache = tmp_path / flag.lstrip("-")
        result = CliRunner().invoke(main, [*args, flag, "--cache-dir", str(cache),
                                           "--export-dir", str(cache / "sm")])
        assert result.exit_code == 0, result.output
        assert bool(list(cache.glob("features/*.npy"))) is cached, flag


def test_cache_command_info_and_clear(tmp_path):
    from click.testing import CliRunner

    from tlkit.cli import main

    FeatureCache(tmp_path / "features").put("k", np.zeros(1000, np.float32))
    runner = CliRunner()
    info = runner.invoke(main, ["cache", "info", "--cache-dir", str(tmp_path)])
    assert info.exit_code == 0 and "entries  1" in info.stdout
    cleared = runner.invoke(main, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0 and "Freed" in cleared.stdout
    assert not list((tmp_path / "features").glob("*.npy"))


# --- The engine that computes the features -----------------------------------------------------


def test_tensorflow_engine_is_float32_and_keys_the_cache(tmp_path):
    from tlkit.features import FeatureEngine

    model = build_classifier("lenet5", 2, 32)
    split = make_split()
    engine = FeatureEngine(model, "tensorflow")
    assert engine.candidates() == [("tensorflow", "float32")]
    cache = FeatureCache(tmp_path / "features")
    first = split_features(model, split, split.digests, cache, SETTINGS, verbose=0,
                           engine=engine)
    assert (engine.name, engine.precision) == ("tensorflow", "float32")
    assert split_features(model, split, split.digests, cache, SETTINGS, verbose=0).from_cache
    np.testing.assert_array_equal(
        first.features, split_features(model, split, split.digests, None, SETTINGS,
                                       verbose=0).features)
    with pytest.raises(tlkit.TlkitError, match="engine.*Received: engine='gpu'"):
        FeatureEngine(model, "gpu")


def test_openvino_engine_is_checked_against_tensorflow_float32(tmp_path):
    from tlkit.features import ENGINE_MIN_COSINE, FeatureEngine

    model = build_classifier("resnet50", 2, 32, weights="none")
    split = make_split(count=40)
    engine = FeatureEngine(model, "openvino")
    if engine.candidates() == [("tensorflow", "float32")]:
        pytest.skip("OpenVINO's CPU plugin has no BF16 on this machine")
    cache = FeatureCache(tmp_path / "features")
    computed = split_features(model, split, split.digests, cache, SETTINGS, verbose=0,
                              engine=engine)
    check = engine.check
    assert check["engine"] == "openvino" and check["cosine"] >= ENGINE_MIN_COSINE, check
    faster = check["images_per_second"] > check["tensorflow_images_per_second"]
    assert engine.name == ("openvino" if faster else "tensorflow")
    reference = split_features(model, split, split.digests, None, SETTINGS, verbose=0)
    a, b = computed.features[0], reference.features[0]
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= ENGINE_MIN_COSINE
    # Features cached by one engine are not taken for another's.
    again = split_features(model, split, split.digests, cache, SETTINGS, verbose=0)
    assert again.from_cache == (engine.name == "tensorflow")


def test_openvino_below_the_least_cosine_is_refused_for_tensorflow_float32():
    from tlkit.features import FeatureEngine

    model = build_classifier("resnet50", 2, 32, weights="none")
    split = make_split(count=40)
    engine = FeatureEngine(model, "openvino", min_cosine=1.0)  # bfloat16 is never exact
    if engine.candidates() == [("tensorflow", "float32")]:
        pytest.skip("OpenVINO's CPU plugin has no BF16 on this machine")
    computed = split_features(model, split, split.digests, None, SETTINGS, verbose=0,
                              engine=engine)
    assert engine.check["engine"] == "openvino" and engine.check["cosine"] < 1.0, engine.check
    assert (engine.name, engine.precision) == ("tensorflow", "float32")
    reference = split_features(model, split, split.digests, None, SETTINGS, verbose=0)
    np.testing.assert_array_equal(computed.features, reference.features)
    with pytest.raises(tlkit.TlkitError, match=r"min_cosine.*Received: min_cosine=2"):
        FeatureEngine(model, min_cosine=2)

