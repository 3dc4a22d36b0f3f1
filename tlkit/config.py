"""Typed, validated settings for a tlkit run.

A run is described by one `FitConfig`, made of four frozen dataclasses, one per stage of the
data flow. The CLI builds it from flags (or from a JSON file written by an earlier run); the
library validates every field when the object is made, so a bad value fails before any work
starts, with a message that names the setting and the value received. The settings are plain
data: no file is read and no TensorFlow is loaded here. `"auto"` values are resolved in one
place, `tlkit.api.resolve_config`, which also checks what needs the backbone registry or the
machine, and the resolved config is saved in the run folder, so `tlkit fit --config
run/config.json` repeats the run; the settings that depend on the machine or the
backbone (`REQUESTED`) are saved as asked too and read back as asked, so the re-run resolves
them for its own machine.
"""

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tlkit.errors import ConfigError
from tlkit.schedule import parse_stages
from tlkit.validation import check_bool, check_choice, check_number

AUGMENT_PRESETS = ("none", "light", "standard", "heavy")
FLIP_MODES = ("none", "horizontal", "vertical", "horizontal_and_vertical")
CACHE_MODES = ("auto", "memory", "disk")
RESIZE_POLICIES = ("squash", "crop", "pad")
DISTRIBUTE_MODES = ("auto", "none", "mirrored", "multi-worker")
JIT_MODES = ("auto", "on", "off")

# Settings whose resolved value depends on the machine (a GPU's `jit="on"` compiles XLA on a
# CPU, 3.8x slower) or the backbone: a saved config keeps them as asked, beside the resolved.
REQUESTED = {"model": ("weights", "dropout"), "train": ("unfreeze", "distribute", "jit")}


def _paths_to_str(config, *names):
    """Stores path-like fields as strings, so configs compare and serialise as JSON."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become tensors."""

    data_dir: str  # folder with one subfolder per class
    val_split: float = 0.2  # fraction of each class held out for validation
    test_split: float = 0.0  # fraction of each class held out as a test set, never trained on
    val_dir: str | None = None  # explicit validation folder (same classes); replaces val_split
    image_size: int | str = "auto"  # side of the square model input; "auto": the backbone's
    resize: str = "squash"  # squash | crop | pad: how an image becomes a square
    batch_size: int = 32  # images per training step
    cache: str = "auto"  # where decoded images live: memory | disk | auto (by size vs RAM)
    cache_dir: str | None = None  # disk cache folder; None: ~/.cache/tlkit
    workers: int = 0  # decoding threads; 0: one per CPU core

    def __post_init__(self):
        _paths_to_str(self, "data_dir", "val_dir", "cache_dir")
        if not self.data_dir:
            raise ConfigError(f"`data_dir` must be a folder. Received: data_dir={self.data_dir!r}")
        check_number("val_split", self.val_split, 0.0, 0.9)
        check_number("test_split", self.test_split, 0.0, 0.9)
        if self.val_split + self.test_split >= 1.0:
            raise ConfigError(
                "`val_split + test_split` must leave images to train on (< 1). Received: "
                f"val_split={self.val_split!r}, test_split={self.test_split!r}"
            )
        if self.val_dir is None and self.val_split == 0:
            raise ConfigError(
                "Validation data is needed for early stopping: set `val_split` > 0 or "
                f"`val_dir`. Received: val_split={self.val_split!r}, val_dir=None"
            )
        if self.image_size != "auto":
            check_number("image_size", self.image_size, 8, 1024, integer=True)
        check_choice("resize", self.resize, RESIZE_POLICIES)
        check_number("batch_size", self.batch_size, 1, integer=True)
        check_choice("cache", self.cache, CACHE_MODES)
        check_number("workers", self.workers, 0, integer=True)


@dataclass(frozen=True)
class ModelConfig:
    """Which network is built: backbone, head and training-time augmentation."""

    backbone: str = "auto"  # a name from `tlkit backbones`; "auto": by image size
    weights: str = "auto"  # "imagenet" | "none" | a weights file; "auto": imagenet if it has them
    init_from: str | None = None  # continue a tlkit run folder / model.keras (new classes ok)
    train_bn: bool = False  # let BatchNorm layers of unfrozen groups train (default: frozen)
    dropout: float | str = "auto"  # head dropout rate; "auto": the backbone's default
    augment: str = "standard"  # none | light | standard | heavy (see tlkit.augment)
    flip: str = "auto"  # none | horizontal | vertical | horizontal_and_vertical; "auto":
    # horizontal, or none with augment="none"

    @property
    def pretrained(self):
        """Whether the backbone starts from trained weights (a file, ImageNet, init_from)."""
        return self.weights not in ("none", "auto") or self.init_from is not None

    def __post_init__(self):
        _paths_to_str(self, "weights", "init_from")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ConfigError("`backbone` must be 'auto' or a name from `list_backbones()`. "
                              f"Received: backbone={self.backbone!r}")
        if self.init_from is not None and self.weights not in ("auto", "none"):
            raise ConfigError(
                "`init_from` brings its own weights: leave `weights` unset. Received: "
                f"init_from={self.init_from!r}, weights={self.weights!r}"
            )
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError("`weights` must be 'auto', 'imagenet', 'none' or a file path. "
                              f"Received: weights={self.weights!r}")
        check_bool("train_bn", self.train_bn)
        if self.dropout != "auto":
            check_number("dropout", self.dropout, 0.0, 0.95)
        check_choice("augment", self.augment, AUGMENT_PRESETS)
        check_choice("flip", self.flip, ("auto", *FLIP_MODES))


@dataclass(frozen=True)
class TrainConfig:
    """How the network is trained."""

    epochs: int = 30  # most epochs of the first stage; early stopping usually ends sooner
    learning_rate: float = 1e-3  # Adam's learning rate in the first stage
    patience: int = 5  # epochs without a better val_loss before a stage stops
    unfreeze: int | str = "auto"  # groups unfrozen after the head stage; "auto": 1 if pretrained
    fine_tune_epochs: int | None = None  # most epochs per unfreezing stage; None: `epochs`;
    # 0: no fine-tuning (the head only)
    stages: str | None = None  # explicit schedule "head:5@1e-3,block5:3@1e-4"; overrides above
    class_weight: str = "none"  # "auto": weight the loss by inverse class frequency
    feature_cache: bool = True  # frozen-backbone stages train the head on cached features
    fine_tune_cache: bool = False  # unfreezing stages train on cached activations of the
    # layers below their groups (the head stage's views), when those fit in memory: faster,
    # but fixed views overfit (transfer_real --tune: 0.650 vs 0.773 at N=10, 0.770 vs 0.803)
    cached_views: int | str = 1  # augmented views per image (transfer_real --tune); "auto": 1
    feature_cache_gb: float = 5.0  # size cap of the feature cache folder
    tensorboard: bool = False  # write TensorBoard logs to <run folder>/tensorboard
    steps_per_execution: int = 8  # train steps per call into the graph (benchmarks/jit.py)
    distribute: str = "auto"  # none | mirrored (this machine's GPUs) | multi-worker (TF_CONFIG)
    mixed_precision: bool = False  # compute in float16 (GPU) or bfloat16 (CPU); output float32
    jit: str = "auto"  # XLA for the train step: on | off; "auto": on with a GPU, unless distributed
    verbose: int = 1  # 0: silent, 1: progress bars, 2: one line per epoch

    def __post_init__(self):
        check_number("epochs", self.epochs, 1, integer=True)
        check_number("learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        check_number("patience", self.patience, 1, integer=True)
        if self.unfreeze != "auto":
            check_number("unfreeze", self.unfreeze, 0, 20, integer=True)
        if self.fine_tune_epochs is not None:
            check_number("fine_tune_epochs", self.fine_tune_epochs, 0, integer=True)
            if self.fine_tune_epochs == 0 and self.unfreeze not in ("auto", 0):
                raise ConfigError(
                    "`fine_tune_epochs=0` means no fine-tuning, so nothing can be unfrozen. "
                    f"Received: fine_tune_epochs=0, unfreeze={self.unfreeze!r}")
        if self.stages is not None:
            parse_stages(self.stages)
        check_choice("class_weight", self.class_weight, ("none", "auto"))
        check_bool("tensorboard", self.tensorboard)
        check_bool("feature_cache", self.feature_cache)
        check_bool("fine_tune_cache", self.fine_tune_cache)
        check_number("steps_per_execution", self.steps_per_execution, 1, integer=True)
        check_choice("distribute", self.distribute, DISTRIBUTE_MODES)
        check_bool("mixed_precision", self.mixed_precision)
        check_choice("jit", self.jit, JIT_MODES)
        if self.cached_views != "auto":
            check_number("cached_views", self.cached_views, 1, 64, integer=True)
        check_number("feature_cache_gb", self.feature_cache_gb, 0.0)
        check_choice("verbose", self.verbose, (0, 1, 2))


@dataclass(frozen=True)
class ExportConfig:
    """Where the run folder and the SavedModel go."""

    export_dir: str = "saved_models"  # export root: <export_dir>/<name>/<version>/
    name: str = "auto"  # model name; "auto": the data folder's name
    version: int | None = None  # None: the next free integer; an existing one is refused
    overwrite: bool = False  # replace an existing `version` (atomically, once verified)
    runs_dir: str = "runs"  # run folders: <runs_dir>/<name>/<timestamp>/

    def __post_init__(self):
        _paths_to_str(self, "export_dir", "runs_dir")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(
                "`name` must be a plain folder name (no '/', not hidden). "
                f"Received: name={self.name!r}"
            )
        if self.version is not None:
            check_number("version", self.version, 1, integer=True)
        check_bool("overwrite", self.overwrite)


@dataclass(frozen=True)
class FitConfig:
    """Everything `tlkit.fit` needs: one section per stage, plus the seed."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 42  # one seed for the split, initial weights, shuffling and augmentation

    def __post_init__(self):
        check_number("seed", self.seed, 0, 2**31 - 1, integer=True)

    def to_dict(self):
        """The config as plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from `to_dict` output; unknown keys are an error, not ignored."""
        _check_keys("config", values, {*_SECTIONS, "seed"})
        kwargs = {}
        if not isinstance(values.get("data"), dict) or "data_dir" not in values["data"]:
            raise ConfigError("`config` must have a 'data' section with a 'data_dir'.")
        for key, section in _SECTIONS.items():
            if key in values:
                names = {f.name for f in dataclasses.fields(section)}
                _check_keys(f"config[{key!r}]", values[key], names)
                kwargs[key] = section(**values[key])
        if "seed" in values:
            kwargs["seed"] = values["seed"]
        return cls(**kwargs)

    def save(self, path, requested=None):
        """Writes the config as JSON to `path`.

        Args:
            path: the file to write.
            requested: the config as asked, before `resolve`: its `REQUESTED` settings
                (`"auto"` included) are saved too, under `"requested"`, for `load`.
        """
        values = self.to_dict()
        if requested is not None:
            values["requested"] = {section: {name: getattr(getattr(requested, section), name)
                                             for name in names}
                                   for section, names in REQUESTED.items()}
        Path(path).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, path):
        """Reads a config written by `save` (for example a run folder's `config.json`),
        with its `"requested"` settings, if any, instead of their resolved values."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"Cannot read config file {str(path)!r}: {e}") from None
        if isinstance(values, dict) and "requested" in values:
            requested = values.pop("requested")
            _check_keys("config['requested']", requested, REQUESTED)
            for section, asked in requested.items():
                _check_keys(f"config['requested'][{section!r}]", asked, REQUESTED[section])
                if isinstance(values.get(section), dict):
                    values[section].update(asked)
        return cls.from_dict(values)


def _check_keys(where, values, allowed):
    if not isinstance(values, dict):
        raise ConfigError(f"`{where}` must be a JSON object. Received: {values!r}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(
            f"`{where}` has unknown keys {unknown}; allowed keys are {sorted(allowed)}."
        )


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
             "export": ExportConfig}


# Names people type for a setting that has another name here (the CLI's --lr, for one).
_ALIASES = {"lr": "learning_rate", "learning_rate_head": "learning_rate", "size": "image_size",
            "model": "backbone", "arch": "backbone", "freeze": "unfreeze"}


def build_config(base=None, **options):
    """Builds a `FitConfig` from flat keyword options, each routed to its section by name.

    Args:
        base: a `FitConfig` to start from (for example one loaded from a run folder);
            `None` starts from the defaults, and then `data_dir` is required.
        **options: any field of `DataConfig`, `ModelConfig`, `TrainConfig`,
            `ExportConfig`, or `seed`. `None` values are ignored (not given).

    Returns:
        A validated `FitConfig`.

    Example:

    >>> build_config(data_dir="data/digits", backbone="lenet5", epochs=5).model.backbone
    'lenet5'
    """
    options = {k: v for k, v in options.items() if v is not None}
    owners = {f.name: section for section, cls in _SECTIONS.items()
              for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(owners) - {"seed"})
    if unknown:
        known = sorted({*owners, "seed"})
        hints = [f"{name!r}: did you mean {close[0]!r}?" for name in unknown
                 if (close := [_ALIASES[name]] if name in _ALIASES else
                     difflib.get_close_matches(name, known, n=1, cutoff=0.6))]
        raise ConfigError(f"Unknown option(s) {unknown}. " + " ".join(hints)
                          + f" Known options: {known}.")
    values = base.to_dict() if base is not None else {}
    for key, value in options.items():
        if key == "seed":
            values["seed"] = value
        else:
            values.setdefault(owners[key], {})[key] = value
    if "data" not in values or "data_dir" not in values["data"]:
        raise ConfigError("`data_dir` is required: the folder with one subfolder per class.")
    return FitConfig.from_dict(values)
