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

Each field is a `_setting`: its default, and in its metadata the help text, and where they
differ from the field's name and its default, the CLI's flags (`"flags"`), what an `"auto"`
or `None` default means (`"shown"`) and the allowed values (`"choices"`, the constants the
validation checks). `tlkit fit` builds its options from these fields, so each default, choice
list and help text is written once, here.
"""

import dataclasses
import difflib
import json
import os
from dataclasses import MISSING, dataclass, field
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
FLIP_CHOICES = ("auto", *FLIP_MODES)
CLASS_WEIGHT_MODES = ("none", "auto")
AUDIT_METHODS = ("self_confidence", "class_self_confidence", "confident_joint", "noise_rate")

# Settings whose resolved value depends on the machine (a GPU's `jit="on"` compiles XLA on a
# CPU, 3.8x slower) or the backbone: a saved config keeps them as asked, beside the resolved.
REQUESTED = {"model": ("weights", "dropout"), "train": ("unfreeze", "distribute", "jit")}

# Data-dependent defaults, chosen on benchmarks/transfer_real.py's validation photos; applied
# by `tlkit.api.resolve_config`.
PRETRAINED_BACKBONE = "mobilenet"  # what backbone="auto" trains when the images are big enough
MIN_PRETRAINED_SIDE = 24  # images smaller than this (median shorter side) train from scratch
MIN_PRETRAINED_INPUT = 96  # smallest input side given to a pretrained backbone


def _setting(default, help, **cli):
    """A dataclass field with `default`, its `help` text and the CLI's `flags`, `shown`
    default and `choices` (see the module docstring) as metadata."""
    return field(default=default, metadata={"help": help, **cli})


def _same_setting(section, name):
    """A field with the default, help text and CLI metadata of `section`'s field `name`, for
    another dataclass: a setting two configs share is written once."""
    shared = section.__dataclass_fields__[name]
    return field(default=shared.default, metadata=shared.metadata)


def _paths_to_str(config, *names):
    """Stores path-like fields as strings, so configs compare and serialise as JSON."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become tensors."""

    data_dir: str = _setting(MISSING, "Folder with one subfolder per class (with `labels`: "
                             "where the label file's relative paths are looked up second).",
                             flags=())
    labels: str | None = _setting(None, "A CSV label file instead of class subfolders: a "
                                  "header row, then path,label rows, and optionally a split "
                                  "column (train, val, test) that fixes the split. Relative "
                                  "paths are looked up next to the CSV, then in the data "
                                  "folder.", shown="none: class subfolders")
    multi_label: bool = _setting(False, "Each image may have several labels: a label file's "
                                 "label cell lists them separated by ';' (cat;dog), and the "
                                 "same image in several class folders has each of them. "
                                 "Trains a sigmoid head with per-label thresholds.")
    val_split: float = _setting(0.2, "Fraction of each class held out for validation.")
    test_split: float = _setting(0.0, "Fraction of each class held out as a test set, never "
                                 "trained on, reported separately.")
    val_dir: str | None = _setting(None, "A separate validation folder with the same classes, "
                                   "instead of a validation split.",
                                   shown="none: a split of the data folder")
    image_size: int | str = _setting("auto", "Side of the square model input in pixels.",
                                     shown="auto: the images' side rounded up, within 16 and 32 "
                                     "for scratch, 32 for lenet5, within "
                                     f"{MIN_PRETRAINED_INPUT} px and the backbone's default "
                                     "for a pretrained one")
    resize: str = _setting("squash", "How an image becomes a square: stretch (squash), "
                           "centre-crop (crop) or pad.", choices=RESIZE_POLICIES)
    batch_size: int = _setting(32, "Images per training step.")
    cache: str = _setting("auto", "Where decoded images are kept.", choices=CACHE_MODES,
                          shown="auto: memory if they fit in the available RAM, else disk")
    cache_dir: str | None = _setting(None, "Folder of the disk cache and the feature cache.",
                                     shown="~/.cache/tlkit")
    workers: int = _setting(0, "Image decoding threads; 0: one per CPU core.")

    def __post_init__(self):
        _paths_to_str(self, "data_dir", "labels", "val_dir", "cache_dir")
        if not self.data_dir:
            raise ConfigError(f"`data_dir` must be a folder. Received: data_dir={self.data_dir!r}")
        if self.labels is not None and (not isinstance(self.labels, str) or not self.labels):
            raise ConfigError(f"`labels` must be a CSV file path or None. Received: "
                              f"labels={self.labels!r}")
        if self.labels is not None and self.val_dir is not None:
            raise ConfigError(
                "`labels` and `val_dir` cannot be combined: list the validation images in the "
                "label file, with a split column (val). Received: "
                f"labels={self.labels!r}, val_dir={self.val_dir!r}"
            )
        check_bool("multi_label", self.multi_label)
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

    backbone: str = _setting("auto", "Network: scratch, lenet5, vgg16, resnet50, mobilenet_v2, "
                             "efficientnet_b0, ...; see `tlkit backbones`.",
                             shown=f"auto: {PRETRAINED_BACKBONE} for images of "
                             f"{MIN_PRETRAINED_SIDE} px and more, else scratch")
    weights: str = _setting("auto", "Backbone weights: imagenet, none (random, every layer "
                            "trains), or a weights file (e.g. a run's backbone.weights.h5).",
                            shown="auto: imagenet if the backbone has them, else none")
    init_from: str | None = _setting(None, "Continue a tlkit run folder or model.keras; new "
                                     "classes are added (a head of the other kind, softmax "
                                     "or multi-label, starts anew).",
                                     shown="none: a new network")
    train_bn: bool = _setting(False, "Let BatchNorm layers of unfrozen groups train (off: "
                              "frozen, in inference mode).", flags=("--train-bn/--freeze-bn",))
    dropout: float | str = _setting("auto", "Head dropout rate.", shown="auto: the backbone's")
    augment: str = _setting("standard", "Augmentation preset, used in training only (see "
                            "tlkit.augment).", choices=AUGMENT_PRESETS)
    flip: str = _setting("auto", "Random flips in training; none for digits and text.",
                         choices=FLIP_CHOICES, shown="auto: horizontal, none with augment none")

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
        check_choice("flip", self.flip, FLIP_CHOICES)


@dataclass(frozen=True)
class TrainConfig:
    """How the network is trained."""

    epochs: int = _setting(30, "Most epochs of the first stage (the head, or everything when "
                           "training from scratch); early stopping usually ends sooner.")
    learning_rate: float = _setting(1e-3, "Adam's learning rate in the first stage.",
                                    flags=("--learning-rate", "--lr"))
    patience: int = _setting(5, "Epochs without a better val_loss before a stage stops.")
    unfreeze: int | str = _setting("auto", "Backbone groups unfrozen after the head stage, one "
                                   "stage each, at a 10x lower learning rate per stage.",
                                   shown="auto: 1 when pretrained, else 0")
    fine_tune_epochs: int | None = _setting(None, "Most epochs per unfreezing stage; 0: no "
                                            "fine-tuning (the head only).", shown="as epochs")
    stages: str | None = _setting(None, "Explicit schedule, e.g. 'head:5@1e-3,block5:3@1e-4' "
                                  "(TARGET:EPOCHS@LR; TARGET is head, all or a group); "
                                  "overrides epochs, unfreeze and fine-tune epochs.",
                                  shown="none: made from those")
    class_weight: str = _setting("none", "auto: weight the loss by inverse class frequency "
                                 "(multi-label: each label's presence and absence).",
                                 choices=CLASS_WEIGHT_MODES)
    feature_cache: bool = _setting(True, "Train the head on cached backbone features while the "
                                   "backbone is frozen.")
    # transfer_real --tune: 0.650 vs 0.773 at N=10, 0.770 vs 0.803 (fixed views overfit);
    # at N=250 with 4 views 0.834 vs 0.844 (100 validation photos per class, seeds 103-105)
    fine_tune_cache: bool = _setting(False, "Train unfreezing stages on cached activations of "
                                     "the frozen layers below them (the head stage's views), "
                                     "when they fit in memory: faster per epoch, but the fixed "
                                     "augmented views overfit small sets.")
    cached_views: int | str = _setting(1, "Augmented views per image in the feature cache "
                                       "(benchmarks/transfer_real.py --tune; 'auto' in older "
                                       "run configs means 1).")
    feature_cache_gb: float = _setting(5.0, "Size cap of the feature cache folder, in GiB.")
    tensorboard: bool = _setting(False, "Write TensorBoard logs to the run folder's "
                                 "tensorboard/ (needs pip install tensorboard).")
    steps_per_execution: int = _setting(8, "Train steps per call into the graph: the same "
                                        "results, fewer Python round trips (benchmarks/jit.py).")
    distribute: str = _setting("auto", "tf.distribute strategy: mirrored (this machine's GPUs), "
                               "multi-worker (the machines in TF_CONFIG).",
                               choices=DISTRIBUTE_MODES, shown="auto: multi-worker if TF_CONFIG "
                               "lists several workers, else mirrored with several GPUs, else none")
    mixed_precision: bool = _setting(False, "Compute in float16 (GPU) or bfloat16 (CPUs that "
                                     "have it); variables, output layer and loss stay float32.")
    jit: str = _setting("auto", "XLA for the train step.", choices=JIT_MODES,
                        shown="auto: on with a GPU and no strategy, off on CPU, where it "
                        "measured 3.8x slower")
    verbose: int = _setting(1, "0: silent, 1: progress bars, 2: one line per epoch.",
                            flags=())  # the CLI's -q/--quiet sets 0

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
        check_choice("class_weight", self.class_weight, CLASS_WEIGHT_MODES)
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

    export_dir: str = _setting("saved_models", "Export root: EXPORT_DIR/NAME/VERSION/.")
    name: str = _setting("auto", "Model name.", shown="auto: the data folder's name")
    version: int | None = _setting(None, "Export version; an existing one is refused unless "
                                   "overwrite is on.", shown="the next free integer")
    overwrite: bool = _setting(False, "Replace an existing version (the new export is complete "
                               "and verified before the old one goes).")
    runs_dir: str = _setting("runs", "Where run folders go: RUNS_DIR/NAME/TIMESTAMP/.")

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
    seed: int = _setting(42, "One seed for the split, initial weights, shuffling and "
                         "augmentation.")

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


DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024  # largest REST body or gRPC message tlkit serve takes


@dataclass(frozen=True)
class ServeConfig:
    """How `tlkit serve` (`tlkit.serve.ModelServer`) listens and batches. The bounds on
    clients (timeouts, connections, queue) are `tlkit.serve.ServeLimits`."""

    name: str | None = _setting(None, "Model name in URLs and gRPC requests.",
                                shown="the export's folder name")
    host: str = _setting("127.0.0.1", "Address to bind; 0.0.0.0 serves other machines too.")
    port: int = _setting(8501, "REST port (0: any free port).")
    grpc_port: int | None = _setting(8500, "gRPC port (0: any free port).")
    max_batch_size: int = _setting(32, "Most images per forward pass when requests are "
                                   "batched.")
    batch_timeout_ms: float = _setting(
        0.0, "Longest wait of a request, when the model is idle, for others to batch with. "
        "With 0 a request starts a forward pass at once, and requests arriving during it "
        "form the next batch: about twice the requests/s of a 2 ms wait for one client, "
        "and no fewer for 16 or 64 (benchmarks/serve.py).")
    max_request_bytes: int = _setting(DEFAULT_MAX_REQUEST_BYTES, "Largest request body "
                                      "(REST) or message (gRPC) accepted.",
                                      shown=f"{DEFAULT_MAX_REQUEST_BYTES} (32 MiB)")

    def __post_init__(self):
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"`name` must be a non-empty string. Received: name={self.name!r}")
        if not isinstance(self.host, str):  # "" binds every interface, as 0.0.0.0 does
            raise ConfigError(f"`host` must be an address string. Received: host={self.host!r}")
        check_number("port", self.port, 0, 65535, integer=True)
        if self.grpc_port is not None:
            check_number("grpc_port", self.grpc_port, 0, 65535, integer=True)
        check_number("max_batch_size", self.max_batch_size, 1, integer=True)
        check_number("batch_timeout_ms", self.batch_timeout_ms, 0)
        check_number("max_request_bytes", self.max_request_bytes, 1024, integer=True)


@dataclass(frozen=True)
class AuditConfig:
    """What `tlkit.audit.audit_labels` computes: the frozen backbone's features, the k-fold
    softmax heads that score every image out of sample, and the rule that flags one. The
    data and model settings mean what they mean for `fit` and resolve as fit resolves them."""

    data_dir: str = _same_setting(DataConfig, "data_dir")
    labels: str | None = _same_setting(DataConfig, "labels")
    multi_label: bool = _same_setting(DataConfig, "multi_label")
    backbone: str = _same_setting(ModelConfig, "backbone")
    weights: str = _same_setting(ModelConfig, "weights")
    image_size: int | str = _same_setting(DataConfig, "image_size")
    resize: str = _same_setting(DataConfig, "resize")
    folds: int = _setting(5, "Folds of the out-of-sample probabilities: each image is scored "
                          "by a head trained on the other folds, never on itself.")
    weight_decay: float = _setting(1e-3, "L2 penalty of the softmax heads (on features centred "
                                   "and scaled to a mean squared norm of 1).")
    method: str = _setting("self_confidence", "Which images are label issues: self_confidence "
                           "(as many as the confident joint counts off its diagonal, the least "
                           "self-confident of all), class_self_confidence (the same count per "
                           "class, the least self-confident of each), confident_joint (every "
                           "off-diagonal entry) or noise_rate (prune by noise rate).",
                           choices=AUDIT_METHODS)
    seed: int = _setting(42, "Seed of the folds.")
    cache_dir: str | None = _same_setting(DataConfig, "cache_dir")
    feature_cache: bool = _setting(True, "Keep the features in the feature cache (keyed by the "
                                   "files' content), so a rerun skips the backbone.")
    workers: int = _same_setting(DataConfig, "workers")
    batch_size: int = _setting(64, "Images per forward pass of the backbone.")
    thumbnails: int = _setting(24, "Most suspects shown in audit.png.")
    verbose: int = _setting(1, "0: silent, 1: progress bars.", flags=())

    def __post_init__(self):
        _paths_to_str(self, "data_dir", "labels", "cache_dir")
        DataConfig(self.data_dir, labels=self.labels, multi_label=self.multi_label,
                   image_size=self.image_size, resize=self.resize, cache_dir=self.cache_dir,
                   workers=self.workers)  # checked as fit checks
        ModelConfig(backbone=self.backbone, weights=self.weights)
        check_number("folds", self.folds, 2, 100, integer=True)
        check_number("weight_decay", self.weight_decay, 0.0, 100.0, low_open=True)
        check_choice("method", self.method, AUDIT_METHODS)
        check_number("seed", self.seed, 0, 2**31 - 1, integer=True)
        check_bool("feature_cache", self.feature_cache)
        check_number("batch_size", self.batch_size, 1, integer=True)
        check_number("thumbnails", self.thumbnails, 1, integer=True)
        check_choice("verbose", self.verbose, (0, 1))

    def to_dict(self):
        """The settings as plain JSON-ready data."""
        return dataclasses.asdict(self)


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
        listing = "" if len(hints) == len(unknown) else f" Known options: {known}."
        raise ConfigError(f"Unknown option(s) {unknown}. " + " ".join(hints) + listing)
    values = base.to_dict() if base is not None else {}
    for key, value in options.items():
        if key == "seed":
            values["seed"] = value
        else:
            values.setdefault(owners[key], {})[key] = value
    if "data" not in values or "data_dir" not in values["data"]:
        raise ConfigError("`data_dir` is required: the folder with one subfolder per class.")
    return FitConfig.from_dict(values)
