"""fit's flags and the config's fields agree: one flag per setting, the same defaults, the same
choices, and a flag overrides what `--config` loaded (both ways for an on/off setting)."""

import dataclasses
import json
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

import tlkit.api
from tlkit import config as tlkit_config
from tlkit.cli import main
from tlkit.config import (DataConfig, ExportConfig, FitConfig, ModelConfig, TrainConfig,
                          build_config)
from tlkit.errors import ConfigError

FIT = main.commands["fit"]
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
            "export": ExportConfig}
FIELDS = {f.name: (section, f) for section, cls in SECTIONS.items()
          for f in dataclasses.fields(cls)}
FIELDS["seed"] = (None, next(f for f in dataclasses.fields(FitConfig) if f.name == "seed"))

# The settings set another way than by a flag of their own, and why.
NO_FLAG = {"data_dir": "the DATA_DIR argument", "verbose": "-q/--quiet sets 0"}
# fit's options that are not settings: documented in fit's --help.
CLI_ONLY = {"config_file": "--config", "resume": "--resume", "quiet": "-q"}

# Every flag and alias fit had before its options were made from the config.
FLAGS_BEFORE = [
    "--config", "--backbone", "--weights", "--init-from", "--image-size", "--resize",
    "--val-split", "--test-split", "--val-dir", "--epochs", "--learning-rate", "--lr",
    "--unfreeze", "--fine-tune-epochs", "--stages", "--train-bn", "--freeze-bn",
    "--feature-cache", "--no-feature-cache", "--fine-tune-cache", "--no-fine-tune-cache",
    "--cached-views", "--steps-per-execution", "--distribute", "--mixed-precision",
    "--no-mixed-precision", "--jit", "--tensorboard", "--class-weight", "--patience",
    "--batch-size", "--dropout", "--augment", "--flip", "--seed", "--export-dir", "--name",
    "--version", "--overwrite", "--runs-dir", "--cache", "--cache-dir", "--workers",
    "--resume", "-q", "--quiet"]

# The constants each choice option must offer, as the validation checks them.
CHOICES = {"resize": tlkit_config.RESIZE_POLICIES, "cache": tlkit_config.CACHE_MODES,
           "augment": tlkit_config.AUGMENT_PRESETS,
           "flip": ("auto", *tlkit_config.FLIP_MODES),
           "class_weight": ("none", "auto"), "distribute": tlkit_config.DISTRIBUTE_MODES,
           "jit": tlkit_config.JIT_MODES}

# A value other than the default for every setting with a flag: (flag arguments, expected).
SAMPLES = {
    "labels": (["--labels", "{file}"], "{file}"),
    "multi_label": (["--multi-label"], True),
    "val_split": (["--val-split", "0.3"], 0.3),
    "test_split": (["--test-split", "0.1"], 0.1),
    "val_dir": (["--val-dir", "{folder}"], "{folder}"),
    "image_size": (["--image-size", "48"], 48),
    "resize": (["--resize", "pad"], "pad"),
    "batch_size": (["--batch-size", "7"], 7),
    "cache": (["--cache", "disk"], "disk"),
    "cache_dir": (["--cache-dir", "{folder}"], "{folder}"),
    "workers": (["--workers", "3"], 3),
    "backbone": (["--backbone", "lenet5"], "lenet5"),
    "weights": (["--weights", "none"], "none"),
    "init_from": (["--init-from", "{folder}"], "{folder}"),
    "train_bn": (["--train-bn"], True),
    "dropout": (["--dropout", "0.3"], 0.3),
    "augment": (["--augment", "light"], "light"),
    "flip": (["--flip", "vertical"], "vertical"),
    "epochs": (["--epochs", "4"], 4),
    "learning_rate": (["--learning-rate", "0.01"], 0.01),
    "patience": (["--patience", "2"], 2),
    "unfreeze": (["--unfreeze", "2"], 2),
    "fine_tune_epochs": (["--fine-tune-epochs", "0"], 0),
    "stages": (["--stages", "all:2@1e-3"], "all:2@1e-3"),
    "class_weight": (["--class-weight", "auto"], "auto"),
    "feature_cache": (["--no-feature-cache"], False),
    "fine_tune_cache": (["--fine-tune-cache"], True),
    "cached_views": (["--cached-views", "4"], 4),
    "feature_cache_gb": (["--feature-cache-gb", "0.5"], 0.5),
    "tensorboard": (["--tensorboard"], True),
    "steps_per_execution": (["--steps-per-execution", "2"], 2),
    "distribute": (["--distribute", "none"], "none"),
    "mixed_precision": (["--mixed-precision"], True),
    "jit": (["--jit", "off"], "off"),
    "export_dir": (["--export-dir", "{folder}"], "{folder}"),
    "name": (["--name", "flowers"], "flowers"),
    "version": (["--version", "3"], 3),
    "overwrite": (["--overwrite"], True),
    "runs_dir": (["--runs-dir", "{folder}"], "{folder}"),
    "seed": (["--seed", "7"], 7),
}


def fit_options():
    return [p for p in FIT.params if isinstance(p, click.Option)]


def setting_options():
    return {p.name: p for p in fit_options() if p.name in FIELDS}


@pytest.fixture
def fit_calls(monkeypatch):
    """Runs `tlkit fit` with the library's fit replaced: records the config it would train."""
    calls = []

    def fake_fit(data_dir=None, *, config=None, resume=None, **options):
        calls.append(build_config(config, data_dir=data_dir, **options))
        return SimpleNamespace(export_path="saved_models/x/1")

    monkeypatch.setattr(tlkit.api, "fit", fake_fit)

    def run(*args):
        result = CliRunner().invoke(main, ["fit", *map(str, args)])
        assert result.exit_code == 0, result.output
        return calls.pop()

    return run


def test_every_setting_has_a_fit_flag_and_every_flag_sets_a_setting():
    options = {p.name for p in fit_options()} - {"help"}
    assert options - set(FIELDS) == set(CLI_ONLY)
    assert set(FIELDS) - options == set(NO_FLAG)
    assert [p.name for p in FIT.params if isinstance(p, click.Argument)] == ["data_dir"]
    for flag in CLI_ONLY.values():
        assert flag in FIT.get_help(click.Context(FIT))


def test_every_flag_fit_had_still_works():
    declared = {opt for p in fit_options() for opt in (*p.opts, *p.secondary_opts)}
    assert set(FLAGS_BEFORE) <= declared
    assert "--feature-cache-gb" in declared


def test_each_help_shows_the_dataclass_default():
    for name, option in setting_options().items():
        field = FIELDS[name][1]
        shown = option.help.rsplit("[default: ", 1)[1].removesuffix("]")
        assert option.default is None, name  # not given: the --config file's value stays
        if field.default is None or field.default == "auto":
            assert shown == field.metadata["shown"], name
            assert field.default is None or shown.startswith("auto"), name
        elif isinstance(field.default, bool):
            assert shown == ("on" if field.default else "off"), name
        else:
            assert type(field.default)(shown) == field.default, name


def test_choices_are_the_configs_constants_and_the_validation_agrees(tmp_path):
    choice_options = {name: option for name, option in setting_options().items()
                      if isinstance(option.type, click.Choice)}
    assert set(choice_options) == set(CHOICES)
    for name, option in choice_options.items():
        assert tuple(option.type.choices) == tuple(CHOICES[name]), name
        for value in CHOICES[name]:
            build_config(data_dir=str(tmp_path), **{name: value})
        with pytest.raises(ConfigError, match=f"`{name}`"):
            build_config(data_dir=str(tmp_path), **{name: "bogus"})


def test_every_on_off_setting_has_a_switch_back():
    for name, option in setting_options().items():
        if FIELDS[name][1].type is bool:
            assert option.is_flag and option.secondary_opts, name


@pytest.mark.parametrize("name", sorted(set(FIELDS) - set(NO_FLAG)))
def test_each_flag_sets_its_setting(fit_calls, tmp_path, name):
    assert set(SAMPLES) == set(FIELDS) - set(NO_FLAG)
    args, expected = SAMPLES[name]
    folder = tmp_path / "folder"
    folder.mkdir()
    file = tmp_path / "labels.csv"
    file.write_text("path,label\n")
    args = [a.format(folder=folder, file=file) for a in args]
    expected = expected.format(folder=folder, file=file) if isinstance(expected, str) \
        else expected
    section, field = FIELDS[name]
    assert expected != field.default
    config = fit_calls(tmp_path, *args)
    assert getattr(getattr(config, section) if section else config, name) == expected


@pytest.mark.parametrize("name", sorted(n for n, (_, f) in FIELDS.items() if f.type is bool))
def test_a_flag_switches_a_loaded_on_off_setting_both_ways(fit_calls, tmp_path, name):
    section, field = FIELDS[name]
    flag_on, flag_off = setting_options()[name].opts[0], setting_options()[name].secondary_opts[0]
    for loaded in (True, False):
        saved = build_config(data_dir=str(tmp_path), **{name: loaded})
        saved.save(tmp_path / "config.json")
        kept = fit_calls("--config", tmp_path / "config.json")
        flipped = fit_calls("--config", tmp_path / "config.json", flag_off if loaded else flag_on)
        assert getattr(getattr(kept, section), name) is loaded
        assert getattr(getattr(flipped, section), name) is (not loaded)


def test_no_tensorboard_switches_off_a_config_that_has_it(fit_calls, tmp_path):
    values = build_config(data_dir=str(tmp_path)).to_dict()
    values["train"]["tensorboard"] = True
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert fit_calls("--config", tmp_path / "config.json").train.tensorboard is True
    config = fit_calls("--config", tmp_path / "config.json", "--no-tensorboard")
    assert config.train.tensorboard is False


def test_auto_takes_back_a_loaded_number(fit_calls, tmp_path):
    build_config(data_dir=str(tmp_path), image_size=48, dropout=0.1).save(tmp_path / "c.json")
    config = fit_calls("--config", tmp_path / "c.json", "--image-size", "auto",
                       "--dropout", "auto")
    assert (config.data.image_size, config.model.dropout) == ("auto", "auto")


def test_quiet_is_verbose_0_and_data_dir_is_the_argument(fit_calls, tmp_path):
    config = fit_calls(tmp_path, "-q")
    assert config.train.verbose == 0 and config.data.data_dir == str(tmp_path)
    assert fit_calls(tmp_path).train.verbose == TrainConfig().verbose


def test_doctor_splits_as_fit_does_by_default():
    defaults = {p.name: p.default for p in main.commands["doctor"].params}
    assert defaults["val_split"] == DataConfig.__dataclass_fields__["val_split"].default
    assert defaults["test_split"] == DataConfig.__dataclass_fields__["test_split"].default
    assert defaults["seed"] == FitConfig.__dataclass_fields__["seed"].default


def _shared(command, name):
    return next((p for p in main.commands[command].params if p.name == name), None)


def test_shared_options_mean_the_same_in_every_command():
    consumers = ["predict", "explain", "export-tflite", "evaluate", "serve"]
    models = [_shared(c, "model_path") for c in consumers]
    assert all(m.opts == ["--model"] and m.help == models[0].help for m in models)
    roots = [_shared(c, "export_dir") for c in consumers]
    assert all(r.default == ExportConfig().export_dir for r in roots)
    for command in ("explain", "export-tflite", "evaluate"):
        assert _shared(command, "output_dir").opts == ["--output-dir", "--out"], command
    formats = {c: _shared(c, "output_format") for c in ("predict", "doctor", "evaluate")}
    assert {c: tuple(f.type.choices) for c, f in formats.items()} == {
        "predict": ("table", "json", "csv"), "doctor": ("table", "json"),
        "evaluate": ("table", "json")}
    assert all(f.default == "table" for f in formats.values())
    assert formats["evaluate"].type.convert("text", formats["evaluate"], None) == "table"


def test_fit_help_lists_the_settings_by_section():
    text = CliRunner().invoke(main, ["fit", "--help"], terminal_width=100).output
    titles = ["Options:", "Data options:", "Model options:", "Training options:",
              "Export options:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    model = text[text.index("Model options:"):text.index("Training options:")]
    assert "--augment [none|light|standard|heavy]" in model and "[default: standard]" in model
    assert "--feature-cache-gb FLOAT" in text and "--tensorboard / --no-tensorboard" in text


def test_serve_takes_its_flags_and_defaults_from_serve_config():
    import inspect

    from tlkit.config import ServeConfig
    from tlkit.serve import ModelServer, ServeLimits

    flags = {p.name: p for p in main.commands["serve"].params if isinstance(p, click.Option)}
    defaults = ServeConfig()
    for field in dataclasses.fields(ServeConfig):
        assert flags[field.name].default is None, field.name  # not given: the config's
        shown = field.metadata.get("shown", str(field.default))
        assert f"[default: {shown}]" in flags[field.name].help, field.name
    server = inspect.signature(ModelServer).parameters
    for name in ("name", "host", "port", "grpc_port", "max_batch_size", "batch_timeout_ms"):
        assert server[name].default == getattr(defaults, name), name
    assert ServeLimits().max_request_bytes == defaults.max_request_bytes


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "70000", "`--port` must be an integer >= 0 and <= 65535. Received: --port "
                        "70000"),
    ("--batch-timeout-ms", "-1", "`--batch-timeout-ms` must be a number >= 0."),
    ("--max-request-bytes", "10", "`--max-request-bytes` must be an integer >= 1024."),
])
def test_serve_refuses_a_bad_flag_naming_it(tmp_path, flag, value, message):
    done = CliRunner().invoke(main, ["serve", "--export-dir", str(tmp_path), flag, value])
    assert done.exit_code == 1
    assert message in done.output
