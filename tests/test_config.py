"""Settings: validation of every field, routing of flat options, `resolve_config`, save/load."""

import dataclasses
import json

import pytest

from tlkit.api import resolve_config
from tlkit.backbones import get_backbone
from tlkit.config import FitConfig, build_config
from tlkit.errors import ConfigError, TlkitError


def _data_dir(tmp_path):
    folder = tmp_path / "flowers"
    folder.mkdir(exist_ok=True)
    return str(folder)


# --- Validation: each bad value names the setting and the value received --------------------

INVALID = [
    pytest.param({"val_split": 1.5}, ["`val_split`", "Received: val_split=1.5"],
                 id="val_split-above-range"),
    pytest.param({"val_split": -0.1}, ["`val_split`", "Received: val_split=-0.1"],
                 id="val_split-negative"),
    pytest.param({"val_split": 0.5, "test_split": 0.5},
                 ["val_split + test_split", "val_split=0.5", "test_split=0.5"],
                 id="val_plus_test_not_below_1"),
    pytest.param({"val_split": 0.0}, ["`val_split`", "val_split=0.0", "val_dir=None"],
                 id="val_split-0-without-val_dir"),
    pytest.param({"resize": "x"}, ["`resize`", "Received: resize='x'"], id="resize"),
    pytest.param({"batch_size": 0}, ["`batch_size`", "Received: batch_size=0"],
                 id="batch_size"),
    pytest.param({"epochs": 0}, ["`epochs`", "Received: epochs=0"], id="epochs"),
    pytest.param({"learning_rate": 0.0}, ["`learning_rate`", "Received: learning_rate=0.0"],
                 id="learning_rate"),
    pytest.param({"augment": "x"}, ["`augment`", "Received: augment='x'"], id="augment"),
    pytest.param({"flip": "x"}, ["`flip`", "Received: flip='x'"], id="flip"),
    pytest.param({"name": "a/b"}, ["`name`", "Received: name='a/b'"], id="name-with-slash"),
    pytest.param({"version": 0}, ["`version`", "Received: version=0"], id="version"),
    pytest.param({"dropout": 1.5}, ["`dropout`", "Received: dropout=1.5"], id="dropout"),
    pytest.param({"seed": -1}, ["`seed`", "Received: seed=-1"], id="seed"),
    pytest.param({"epochs": True}, ["`epochs`", "Received: epochs=True"], id="epochs-bool"),
]


@pytest.mark.parametrize("options, fragments", INVALID)
def test_invalid_setting_raises_config_error_naming_it(tmp_path, options, fragments):
    with pytest.raises(ConfigError) as info:
        build_config(data_dir=_data_dir(tmp_path), **options)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_config_error_is_a_tlkit_error_and_a_value_error(tmp_path):
    with pytest.raises(TlkitError):
        build_config(data_dir=_data_dir(tmp_path), epochs=0)
    with pytest.raises(ValueError):
        build_config(data_dir=_data_dir(tmp_path), epochs=0)


def test_boundary_values_are_accepted(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path), val_split=0.9, test_split=0.0,
                          dropout=0.0, epochs=1, batch_size=1, learning_rate=1e-6, seed=0,
                          version=1, name="model_1")
    assert (config.data.val_split, config.model.dropout, config.seed) == (0.9, 0.0, 0)
    with_val_dir = build_config(data_dir=_data_dir(tmp_path), val_split=0.0,
                                val_dir=str(tmp_path))
    assert with_val_dir.data.val_split == 0.0
    assert with_val_dir.data.val_dir == str(tmp_path)


# --- build_config: flat options to sections ------------------------------------------------


ROUTES = {
    "data": {"val_split": 0.25, "test_split": 0.1, "resize": "crop", "image_size": 48,
             "batch_size": 8, "cache": "memory", "workers": 2},
    "model": {"backbone": "lenet5", "dropout": 0.2, "augment": "light", "flip": "none"},
    "train": {"epochs": 3, "learning_rate": 0.01, "patience": 2, "verbose": 0},
    "export": {"export_dir": "exports", "name": "net", "version": 4, "runs_dir": "my_runs"},
}


def test_build_config_routes_each_option_to_its_section(tmp_path):
    flat = {key: value for options in ROUTES.values() for key, value in options.items()}
    config = build_config(data_dir=_data_dir(tmp_path), seed=7, **flat)
    for section, options in ROUTES.items():
        values = dataclasses.asdict(getattr(config, section))
        assert {key: values[key] for key in options} == options, section
    assert config.data.data_dir == _data_dir(tmp_path)
    assert config.seed == 7


def test_build_config_ignores_none_and_overrides_a_base(tmp_path):
    base = build_config(data_dir=_data_dir(tmp_path), epochs=3, backbone="lenet5", seed=5)
    config = build_config(base, epochs=1, batch_size=None, data_dir=None)
    assert config.train.epochs == 1
    assert config.data.batch_size == base.data.batch_size
    assert config.model.backbone == "lenet5"
    assert config.seed == 5
    assert config.data.data_dir == base.data.data_dir
    assert base.train.epochs == 3


def test_build_config_rejects_unknown_options(tmp_path):
    with pytest.raises(ConfigError, match="colour"):
        build_config(data_dir=_data_dir(tmp_path), colour="red")


def test_build_config_requires_data_dir():
    with pytest.raises(ConfigError, match="data_dir"):
        build_config(epochs=1)


# --- FitConfig.from_dict --------------------------------------------------------------------


def test_from_dict_rejects_unknown_top_level_keys(tmp_path):
    with pytest.raises(ConfigError, match="extra"):
        FitConfig.from_dict({"data": {"data_dir": _data_dir(tmp_path)}, "extra": 1})


def test_from_dict_rejects_unknown_keys_in_a_section(tmp_path):
    with pytest.raises(ConfigError, match="colour"):
        FitConfig.from_dict({"data": {"data_dir": _data_dir(tmp_path)},
                             "model": {"backbone": "scratch", "colour": "red"}})


def test_from_dict_requires_a_data_section():
    with pytest.raises(ConfigError, match="data"):
        FitConfig.from_dict({"train": {"epochs": 1}})


def test_from_dict_without_data_dir_raises_config_error():
    with pytest.raises(ConfigError, match="data_dir"):
        FitConfig.from_dict({"data": {"val_split": 0.1}})


def test_from_dict_validates_values(tmp_path):
    with pytest.raises(ConfigError, match="Received: seed=-3"):
        FitConfig.from_dict({"data": {"data_dir": _data_dir(tmp_path)}, "seed": -3})


def test_an_unknown_backbone_is_refused_when_the_config_is_resolved(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path), backbone="x")
    with pytest.raises(ConfigError, match="`backbone` must be one of .* Received: backbone='x'"):
        resolve_config(config)
    with pytest.raises(ConfigError, match="Received: backbone=3"):
        build_config(data_dir=_data_dir(tmp_path), backbone=3)


# --- resolve_config ---------------------------------------------------------------------------


def test_resolve_fills_image_size_dropout_and_name(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path))
    assert config.data.image_size == "auto"
    assert config.export.name == "auto"
    resolved = resolve_config(config)
    assert resolved.data.image_size == 32
    assert resolved.model.dropout == get_backbone("scratch").default_dropout
    assert resolved.export.name == "flowers"
    assert config.data.image_size == "auto"
    assert resolve_config(resolved) == resolved


def test_resolve_name_of_a_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(_data_dir(tmp_path))
    assert resolve_config(build_config(data_dir=".")).export.name == "flowers"
    assert resolve_config(build_config(data_dir=_data_dir(tmp_path) + "/")).export.name == "flowers"


def test_resolve_keeps_explicit_values(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path), image_size=40, name="mine",
                          dropout=0.1)
    resolved = resolve_config(config)
    assert (resolved.data.image_size, resolved.export.name, resolved.model.dropout) == (
        40, "mine", 0.1)


def test_resolve_refuses_an_image_size_below_the_backbone_minimum(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path), backbone="lenet5", image_size=16)
    with pytest.raises(ConfigError) as info:
        resolve_config(config)
    assert "`image_size`" in str(info.value)
    assert "Received: image_size=16" in str(info.value)


# --- save / load --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    config = build_config(data_dir=_data_dir(tmp_path), val_dir=str(tmp_path), val_split=0.0,
                          backbone="lenet5", epochs=2, learning_rate=3e-4, flip="none",
                          name="net", version=3, seed=11)
    for original in (config, resolve_config(config)):
        path = tmp_path / "config.json"
        original.save(path)
        assert json.loads(path.read_text()) == original.to_dict()
        assert FitConfig.load(path) == original


def test_a_saved_run_keeps_the_machine_dependent_settings_as_asked(tmp_path):
    asked = build_config(data_dir=_data_dir(tmp_path), backbone="mobilenet", jit="auto",
                         distribute="auto", epochs=4)
    resolved = resolve_config(asked)
    on_a_gpu = dataclasses.replace(  # what the same request resolves to on a GPU machine
        resolved, train=dataclasses.replace(resolved.train, jit="on", distribute="mirrored"))
    path = tmp_path / "config.json"
    on_a_gpu.save(path, requested=asked)
    saved = json.loads(path.read_text())
    assert saved["train"]["jit"] == "on" and saved["model"]["weights"] == "imagenet"
    assert saved["requested"] == {"model": {"weights": "auto", "dropout": "auto"},
                                  "train": {"unfreeze": "auto", "distribute": "auto",
                                            "jit": "auto"}}
    loaded = FitConfig.load(path)
    assert (loaded.train.jit, loaded.train.distribute, loaded.model.weights) == ("auto",) * 3
    assert loaded.train.epochs == 4 and loaded.model.backbone == "mobilenet"
    assert resolve_config(loaded) == resolved  # this machine's own resolution
    rerun = resolve_config(build_config(loaded, backbone="lenet5"))  # resolved for lenet5 now
    assert (rerun.model.weights, rerun.train.unfreeze) == ("none", 0)
    assert rerun.model.dropout == get_backbone("lenet5").default_dropout
    saved["requested"]["train"]["colour"] = "red"
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="colour"):
        FitConfig.load(path)


def test_load_of_a_broken_file_raises_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        FitConfig.load(path)
    with pytest.raises(ConfigError, match="missing.json"):
        FitConfig.load(tmp_path / "missing.json")


def test_path_valued_settings_save_and_load(tmp_path):
    config = build_config(data_dir=tmp_path / "flowers", val_dir=tmp_path / "val",
                          export_dir=tmp_path / "exports", runs_dir=tmp_path / "runs")
    config.save(tmp_path / "config.json")
    loaded = FitConfig.load(tmp_path / "config.json")
    assert loaded.export.export_dir == str(tmp_path / "exports")
    assert loaded.export.runs_dir == str(tmp_path / "runs")
    assert loaded.data.data_dir == str(tmp_path / "flowers")
    assert loaded.data.val_dir == str(tmp_path / "val")
    assert loaded == config


def test_auto_backbone_and_image_size_follow_the_data():
    from tlkit.data import DataSurvey

    config = build_config(data_dir="photos")
    notes = []
    photos = resolve_config(config, DataSurvey(images_per_class=40, image_side=480), notes)
    assert (photos.model.backbone, photos.model.weights) == ("mobilenet", "imagenet")
    assert photos.data.image_size == get_backbone("mobilenet").default_size
    assert notes and "480 px" in notes[0]
    small = resolve_config(config, DataSurvey(images_per_class=40, image_side=28), notes := [])
    assert (small.model.backbone, small.data.image_size) == ("mobilenet", 96)
    assert any("96 px" in note for note in notes)
    assert resolve_config(config, DataSurvey(40, 150)).data.image_size == 160
    tiny = resolve_config(config, DataSurvey(images_per_class=40, image_side=8), notes := [])
    assert (tiny.model.backbone, tiny.data.image_size) == ("scratch", 16)  # not upsampled 4x
    assert "scratch" in notes[0] and any("16 px" in note for note in notes)
    scratch = build_config(data_dir="photos", backbone="scratch")
    assert resolve_config(scratch, DataSurvey(40, 20)).data.image_size == 32  # next 16 up
    assert resolve_config(scratch, DataSurvey(40, 480)).data.image_size == 32  # its default
    lenet = build_config(data_dir="photos", backbone="lenet5")
    assert resolve_config(lenet, DataSurvey(40, 8)).data.image_size == 32  # its smallest
    # Given settings win over the survey; no survey keeps the scratch CNN.
    given = build_config(data_dir="photos", backbone="scratch", image_size=48)
    assert resolve_config(given, DataSurvey(40, 480)).data.image_size == 48
    assert resolve_config(config).model.backbone == "scratch"


def test_survey_counts_the_smallest_class_and_reads_sizes_from_headers(tmp_path):
    from PIL import Image

    from tlkit.data import survey_folder

    for name, count, size in (("a", 3, (40, 30)), ("b", 5, (64, 50))):
        (tmp_path / name).mkdir()
        for index in range(count):
            Image.new("RGB", size).save(tmp_path / name / f"{index}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    survey = survey_folder(tmp_path)
    assert survey.images_per_class == 3
    assert survey.image_side == 50  # median of 3 x 30 and 5 x 50 (the broken file is skipped)


@pytest.mark.parametrize("name, suggestion", [("lr", "learning_rate"), ("epoch", "epochs"),
                                              ("backbon", "backbone")])
def test_unknown_option_suggests_the_setting_meant(name, suggestion):
    with pytest.raises(ConfigError, match=f"'{name}': did you mean '{suggestion}'") as info:
        build_config(data_dir="x", **{name: 1})
    assert "Known options" not in str(info.value)  # the hint, not a list of 40 names


def test_unknown_option_with_no_close_match_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        build_config(data_dir="x", colour="red")
    assert "did you mean" not in str(info.value) and "'epochs'" in str(info.value)


@pytest.mark.parametrize("name", ["tensorboard", "feature_cache", "mixed_precision",
                                  "overwrite", "train_bn"])
def test_switches_must_be_booleans_not_numbers(name):
    with pytest.raises(ConfigError, match=f"`{name}` must be True or False. Received: {name}=1"):
        build_config(data_dir="x", **{name: 1})


def test_zero_fine_tune_epochs_means_the_head_only():
    config = resolve_config(build_config(data_dir="x", backbone="mobilenet",
                                         fine_tune_epochs=0))
    assert config.train.unfreeze == 0
    with pytest.raises(ConfigError, match="no fine-tuning"):
        build_config(data_dir="x", backbone="mobilenet", fine_tune_epochs=0, unfreeze=1)


def test_augment_none_means_no_flips_unless_asked():
    resolve = lambda **kw: resolve_config(build_config(data_dir="x", **kw)).model.flip  # noqa: E731
    assert resolve() == "horizontal"
    assert resolve(augment="none") == "none"
    assert resolve(augment="none", flip="vertical") == "vertical"
