"""Transfer learning: the backbone registry, weights, staged unfreezing, BatchNorm, rollback."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
from tlkit.backbones import get_backbone, list_backbones, unfreeze_groups
from tlkit.errors import ConfigError, WeightsError
from tlkit.export import export_classifier
from tlkit.models import build_backbone, build_classifier, extend_classifier
from tlkit.api import resolve_config
from tlkit.schedule import ALL, HEAD, Stage, parse_stages, plan_stages
from tlkit.training import ScheduleSettings, run_schedule, set_trainable

PRETRAINED = [n for n in list_backbones() if get_backbone(n).imagenet]
QUIET = ScheduleSettings(verbose=0)


def tiny_dataset(size=32, n=16, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    images[labels == 1, : size // 2] *= 0.2  # a learnable difference
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8), images, labels


def test_registry_has_the_required_backbones():
    required = {"scratch", "lenet5", "vgg16", "resnet50", "mobilenet", "mobilenet_v2",
                "efficientnet_b0", "efficientnetv2_b0", "convnext_tiny"}  # the README's list
    assert required <= set(list_backbones())
    for name in PRETRAINED:
        spec = get_backbone(name)
        assert spec.min_size == 32 and spec.default_size == 224
    assert get_backbone("vgg16").preprocessing == "caffe"
    assert get_backbone("resnet50").preprocessing == "caffe"
    assert get_backbone("efficientnet_b0").preprocessing == "none"
    assert [g for g, _ in get_backbone("vgg16").unfreeze_groups] == [
        "block5", "block4", "block3", "block2", "block1"]
    assert [g for g, _ in get_backbone("resnet50").unfreeze_groups][:4] == [
        "conv5", "conv4", "conv3", "conv2"]


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"`backbone` must be one of \[.*'resnet50'.*\]\. "
                                          r"Received: backbone='resnet51'"):
        get_backbone("resnet51")


@pytest.mark.parametrize("name", list_backbones())
def test_every_weighted_layer_is_in_an_unfreeze_group(name):
    spec = get_backbone(name)
    backbone = build_backbone(name, max(32, spec.min_size), "none")
    grouped = {id(layer) for _, layers in unfreeze_groups(spec, backbone) for layer in layers}
    loose = [layer.name for layer in backbone.layers
             if layer.trainable_weights and id(layer) not in grouped]
    assert loose == []


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_backbone_builds_at_min_size_exports_and_predicts(name, tmp_path):
    model = build_classifier(name, num_classes=3, image_size=32, weights="none")
    export = export_classifier(
        model, ["a", "b", "c"], tmp_path, name, image_size=32, resize="squash")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    probabilities = tlkit.load(export).predict_arrays(images)
    expected = model.predict(images.astype("float32"), verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def _expected_trainable(model, groups, unfrozen):
    """Trainable tensors when `unfrozen` groups train with BatchNorm frozen, plus the head."""
    total = 0
    for name, layers in groups:
        for layer in layers if name in unfrozen else []:
            if not isinstance(layer, keras.layers.BatchNormalization):
                total += sum(1 for w in layer.weights if "moving" not in w.path)
    return total + len(model.get_layer("predictions").weights)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "scratch"])
def test_trainable_weights_per_stage_follow_the_schedule(name):
    spec = get_backbone(name)
    model = build_classifier(name, 2, 32, weights="none")
    backbone = model.get_layer("backbone")
    groups = unfreeze_groups(spec, backbone)
    names = [g for g, _ in groups]
    set_trainable(model, groups, HEAD)
    assert len(model.trainable_weights) == 2  # the predictions kernel and bias only
    for depth in range(1, len(names) + 1):
        unfrozen = set_trainable(model, groups, names[depth - 1])
        assert unfrozen == names[:depth]
        assert len(model.trainable_weights) == _expected_trainable(model, groups, unfrozen)
    set_trainable(model, groups, ALL, freeze_batchnorm=False)
    non_trainable = [w for w in model.weights if "moving" not in w.path]
    assert len(model.trainable_weights) == len(non_trainable)


def test_frozen_batchnorm_keeps_its_statistics_and_train_bn_updates_them():
    dataset, _, _ = tiny_dataset()
    model = build_classifier("mobilenet_v2", 2, 32, weights="none")
    groups = unfreeze_groups(get_backbone("mobilenet_v2"), model.get_layer("backbone"))
    bn = model.get_layer("backbone").get_layer("Conv_1_bn")
    before = [v.numpy() for v in (bn.moving_mean, bn.moving_variance, bn.gamma)]
    run_schedule(model, groups, [Stage("block16", 1, 1e-3)], dataset, dataset, QUIET)
    after = [v.numpy() for v in (bn.moving_mean, bn.moving_variance, bn.gamma)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    conv = model.get_layer("backbone").get_layer("Conv_1")
    kernel = conv.kernel.numpy()
    run_schedule(model, groups, [Stage("block16", 1, 1e-3)], dataset, dataset,
                 ScheduleSettings(freeze_batchnorm=False, verbose=0))
    assert not np.array_equal(bn.moving_mean.numpy(), after[0])
    assert not np.array_equal(conv.kernel.numpy(), kernel)


def test_frozen_batchnorm_runs_in_inference_mode_during_training():
    model = build_classifier("scratch", 2, 32, dropout=0.0)
    groups = unfreeze_groups(get_backbone("scratch"), model.get_layer("backbone"))
    set_trainable(model, groups, ALL, freeze_batchnorm=True)
    for layer in model.get_layer("backbone").layers:
        if "dropout" in layer.name:
            layer.rate = 0.0
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(images, training=True), model(images, training=False),
                               atol=1e-6)
    set_trainable(model, groups, ALL, freeze_batchnorm=False)
    assert not np.allclose(model(images, training=True), model(images, training=False),
                           atol=1e-4)


def test_weights_file_loads_exactly(tmp_path):
    source = build_backbone("vgg16", 32, "none")
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("vgg16", 32, str(path))
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    fresh = build_backbone("vgg16", 32, "none")
    assert any(not np.array_equal(a, b) for a, b in zip(fresh.get_weights(),
                                                        loaded.get_weights()))


def test_weights_file_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone("scratch", 32, str(tmp_path / "missing.weights.h5"))
    small = build_backbone("scratch", 32, "none")
    path = tmp_path / "small.weights.h5"
    small.save_weights(path)
    with pytest.raises(WeightsError, match="number of blocks"):
        build_backbone("scratch", 128, str(path))
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_backbone("lenet5", 32, "imagenet")


def test_failed_imagenet_download_gives_the_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras_home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsError) as info:
        build_backbone("vgg16", 32, "imagenet")
    message = str(info.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras_home" / "models") in message
    assert "`weights='none'`" in message and "`backbone='scratch'`" in message
    assert "--weights" not in message  # flags are the CLI's words


def test_fit_fails_on_download_before_reading_any_image(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "kh"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    folder = image_folder(per_class=4)
    with pytest.raises(WeightsError):
        tlkit.fit(folder, backbone="mobilenet_v2", image_size=32, runs_dir=tmp_path / "runs",
                  export_dir=tmp_path / "sm", verbose=0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, expected", [
    ("head:5@1e-3", [Stage("head", 5, 1e-3)]),
    ("head:5@1e-3, block5:3@1e-4,block4:3@0.00001",
     [Stage("head", 5, 1e-3), Stage("block5", 3, 1e-4), Stage("block4", 3, 1e-5)]),
    ("all:2@0.01", [Stage("all", 2, 0.01)]),
])
def test_parse_stages(text, expected):
    assert list(parse_stages(text, ["block5", "block4"])) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "must be like"),
    ("head", "TARGET:EPOCHS@LEARNING_RATE"),
    ("head:5", "TARGET:EPOCHS@LEARNING_RATE"),
    ("head:five@1e-3", "TARGET:EPOCHS@LEARNING_RATE"),
    ("head:5@fast", "TARGET:EPOCHS@LEARNING_RATE"),
    ("head:5@1e-3,,block5:1@1e-4", "TARGET:EPOCHS@LEARNING_RATE"),
    ("head:0@1e-3", "epochs >= 1"),
    ("head:3@0", "learning rate"),
    ("block9:3@1e-4", "target must be one of"),
])
def test_parse_stages_rejects_malformed(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_stages(text, ["block5", "block4"])


def test_plan_stages():
    groups = ["conv5", "conv4", "conv3"]
    assert plan_stages(groups, False, 7, 1e-3, unfreeze=0) == (Stage(ALL, 7, 1e-3),)
    plan = plan_stages(groups, True, 5, 1e-3, unfreeze=2, fine_tune_epochs=3)
    assert plan == (Stage(HEAD, 5, 1e-3), Stage("conv5", 3, 1e-4), Stage("conv4", 3, 1e-5))
    with pytest.raises(ConfigError, match="unfreeze"):
        plan_stages(groups, True, 5, 1e-3, unfreeze=4)


def test_config_rules_for_weights_and_schedules(image_folder):
    folder = str(image_folder(per_class=3))
    config = resolve_config(tlkit.build_config(data_dir=folder, backbone="resnet50"))
    assert config.model.weights == "imagenet" and config.train.unfreeze == 1
    assert config.data.image_size == 224
    config = resolve_config(tlkit.build_config(data_dir=folder, backbone="resnet50",
                                               weights="none"))
    assert config.train.unfreeze == 0
    with pytest.raises(ConfigError, match="freezing it is meaningless"):
        resolve_config(tlkit.build_config(data_dir=folder, backbone="vgg16", weights="none",
                                          stages="head:2@1e-3"))
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        resolve_config(tlkit.build_config(data_dir=folder, weights="none", unfreeze=1))
    with pytest.raises(ConfigError, match="target must be one of"):
        resolve_config(tlkit.build_config(data_dir=folder, backbone="vgg16",
                                          stages="conv5:2@1e-3"))


def test_a_worse_stage_is_rolled_back():
    dataset, _, _ = tiny_dataset(seed=3)
    stages = [Stage(ALL, 3, 1e-3), Stage(ALL, 1, 10.0)]  # the second one wrecks the model

    def schedule(stages):
        keras.utils.set_random_seed(3)
        model = build_classifier("scratch", 2, 32)
        groups = unfreeze_groups(get_backbone("scratch"), model.get_layer("backbone"))
        return model, run_schedule(model, groups, stages, dataset, dataset, QUIET)

    first_only, first = schedule(stages[:1])
    model, results = schedule(stages)
    assert results[1].rolled_back and not results[0].rolled_back
    best_first = results[0].best["val_loss"]
    assert best_first == pytest.approx(first[0].best["val_loss"], rel=1e-6)  # same stage 1
    assert results[1].best["val_loss"] > best_first
    after = tlkit.training.evaluate(model, dataset)["loss"]
    assert after == pytest.approx(best_first, rel=1e-4)
    for kept, now in zip(first_only.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(now, kept, rtol=1e-5, atol=1e-6)  # stage 1's weights


def test_a_stage_whose_every_val_loss_is_nan_is_rolled_back():
    dataset, _, _ = tiny_dataset(seed=4)
    nan_val = dataset.take(0)  # no validation image: val_loss is NaN every epoch
    model = build_classifier("scratch", 2, 32)
    groups = unfreeze_groups(get_backbone("scratch"), model.get_layer("backbone"))
    before = [np.array(w) for w in model.get_weights()]
    with pytest.warns(RuntimeWarning, match="diverged"):
        (result,) = run_schedule(model, groups, [Stage(ALL, 2, 1e-3)], dataset, nan_val,
                                 QUIET)
    assert result.diverged and result.rolled_back and result.best == {}
    assert len(result.history) == 2 and all(np.isnan(h["val_loss"]) for h in result.history)
    for kept, now in zip(before, model.get_weights()):
        np.testing.assert_array_equal(now, kept)


def test_extend_classifier_keeps_backbone_and_old_rows():
    model = build_classifier("scratch", 2, 32)
    extended = extend_classifier(model, ["cat", "dog"], ["ant", "cat", "dog"])
    old_kernel, old_bias = model.get_layer("predictions").get_weights()
    new_kernel, new_bias = extended.get_layer("predictions").get_weights()
    assert new_kernel.shape[1] == 3
    np.testing.assert_array_equal(new_kernel[:, 1:], old_kernel)
    np.testing.assert_array_equal(new_bias[1:], old_bias)
    assert extended.get_layer("backbone") is model.get_layer("backbone")
    assert extend_classifier(model, ["cat", "dog"], ["cat", "dog"]) is model
    with pytest.raises(ConfigError, match=r"classes \['dog'\]"):
        extend_classifier(model, ["cat", "dog"], ["cat", "emu"])


def test_extend_classifier_to_multi_label_keeps_sigmoid_rows_or_starts_a_new_head():
    sigmoid = build_classifier("scratch", 2, 32, multi_label=True)
    extended = extend_classifier(sigmoid, ["cat", "dog"], ["ant", "cat", "dog"],
                                 multi_label=True)
    assert extended.get_layer("predictions").activation.__name__ == "sigmoid"
    np.testing.assert_array_equal(extended.get_layer("predictions").get_weights()[0][:, 1:],
                                  sigmoid.get_layer("predictions").get_weights()[0])
    assert extend_classifier(sigmoid, ["cat", "dog"], ["cat", "dog"], multi_label=True) \
        is sigmoid
    softmax = build_classifier("scratch", 2, 32)
    relabelled = extend_classifier(softmax, ["cat", "dog"], ["cat", "emu"], multi_label=True)
    assert relabelled.get_layer("predictions").activation.__name__ == "sigmoid"
    assert relabelled.get_layer("backbone") is softmax.get_layer("backbone")
    assert relabelled.output_shape[-1] == 2
    back = extend_classifier(sigmoid, ["cat", "dog"], ["cat", "dog"])  # to one label each
    assert back is not sigmoid and back.get_layer("predictions").activation.__name__ == \
        "softmax"


def test_fit_with_a_pretrained_file_runs_head_then_unfreezing(image_folder, tmp_path):
    folder = image_folder(per_class=6, size=16)
    common = dict(image_size=32, epochs=1, runs_dir=tmp_path / "runs", augment="none",
                  export_dir=tmp_path / "sm", verbose=0, flip="none")
    first = tlkit.fit(folder, **common)
    assert [s["stage"] for s in json.loads((first.run_dir / "schedule.json").read_text())] \
        == ["all"]
    weights = first.run_dir / "backbone.weights.h5"
    assert weights.is_file()
    second = tlkit.fit(folder, weights=str(weights), unfreeze=2, fine_tune_epochs=1, **common)
    schedule = json.loads((second.run_dir / "schedule.json").read_text())
    assert [s["stage"] for s in schedule] == ["head", "block3", "block2"]
    assert [s["trainable_weights"] for s in schedule] == sorted(
        s["trainable_weights"] for s in schedule)
    assert schedule[0]["trainable_weights"] == 2
    assert [h["stage"] for h in second.history] == ["head", "block3", "block2"]


def test_init_from_adds_a_new_class(image_folder, tmp_path):
    common = dict(image_size=32, epochs=1, runs_dir=tmp_path / "runs", augment="none",
                  export_dir=tmp_path / "sm", verbose=0, flip="none")
    first = tlkit.fit(image_folder("two", classes=("a", "b"), per_class=6), **common)
    kernel = first.model.get_layer("predictions").get_weights()[0]
    more = image_folder("three", classes=("a", "b", "c"), per_class=6)
    second = tlkit.fit(more, init_from=str(first.run_dir), unfreeze=0, stages=None,
                       **{**common, "epochs": 1})
    assert second.config.model.backbone == "scratch"
    assert (second.run_dir / "labels.txt").read_text().split() == ["a", "b", "c"]
    assert second.model.output_shape[-1] == 3
    assert tlkit.load(second.export_path).class_names == ["a", "b", "c"]
    assert kernel.shape[1] == 2


def test_default_fit_on_photos_offline_names_the_mobilenet_file(image_folder, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "kh"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    folder = image_folder(per_class=4, size=64)  # big enough for transfer learning
    with pytest.raises(WeightsError) as info:
        tlkit.fit(folder, runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm", verbose=0)
    message = str(info.value)
    assert "mobilenet_1_0_224_tf_no_top.h5" in message
    assert str(tmp_path / "kh" / "models") in message and "`backbone='scratch'`" in message
    assert not (tmp_path / "runs").exists()


def test_init_from_errors_name_the_setting_and_the_value(image_folder, tmp_path):
    folder = image_folder(per_class=4)
    run = tmp_path / "run"
    run.mkdir()
    build_classifier("scratch", 2, 32).save(run / "model.keras")
    options = dict(runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm", verbose=0)

    def refused(match, **settings):
        with pytest.raises(ConfigError, match=match):
            tlkit.fit(folder, **options, **settings)

    refused(r"`init_from` must be a tlkit run folder or its model.keras, with labels.txt",
            init_from=str(run))  # no labels.txt beside the model
    (run / "labels.txt").write_text("a\nb\n")
    refused(r"`backbone` must match the `init_from` model's \('scratch'\). "
            r"Received: backbone='lenet5'", init_from=str(run), backbone="lenet5")
    refused(r"`image_size` must match the `init_from` model's \(32\). Received: "
            r"image_size=64", init_from=str(run), image_size=64)
    refused(r"`init_from` brings its own weights: leave `weights` unset\. Received: "
            r"init_from=.*, weights='imagenet'", init_from=str(run), weights="imagenet")
    (tmp_path / "notes.keras").write_text("not a model")
    refused(r"`init_from` must be a tlkit run folder or its model.keras. Received: "
            r"init_from='.*notes.keras'", init_from=str(tmp_path / "notes.keras"))
    refused(r"`init_from` must be a tlkit run folder", init_from=str(tmp_path / "empty"))
    (run / "labels.txt").write_text("a\nc\n")  # the data has no class 'c' any more
    refused(r"classes \['c'\]", init_from=str(run))
    assert not (tmp_path / "runs").exists()
