"""`tlkit.fit`: the whole run, from a folder of images to a verified export.

    config -> resolve_config -> load_image_data -> build_classifier (+ augmenter) -> Trainer
           -> evaluate -> run folder (config, data report, history, curves, .keras)
           -> export_classifier

Every step is a public function of its own module; this one resolves the `"auto"` settings
(`resolve_config`: they depend on the data, the backbone and the machine), wires the steps
together and writes the run folder, so a Python user can replace any step.
"""

import contextlib
import csv
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


import keras

import numpy as np

from tlkit.augment import build_augmenter
from tlkit.backbones import get_backbone, unfreeze_groups
from tlkit.config import (MIN_PRETRAINED_INPUT, MIN_PRETRAINED_SIDE, PRETRAINED_BACKBONE,
                          FitConfig, build_config)
from tlkit.data import load_image_data, make_dataset, survey_folder
from tlkit.doctor import split_leaks
from tlkit.checkpoint import clear_state, load_state
from tlkit.distribute import (agreed_resume_point, check_agreement, check_batch_size,
                              chief_text, connect, failures, for_training, precision_policy,
                              resolve_distribute, resolve_jit, worker_folder, worker_index)
from tlkit.errors import ConfigError, DataError, TlkitError
from tlkit.evaluate import choose_thresholds, evaluate_arrays
from tlkit.export import CALIBRATION_IMAGES, check_version_free, export_classifier
from tlkit.files import write_atomically
from tlkit.models import (build_backbone, build_classifier, describe_keras_file,
                          extend_classifier, load_for_continuation, copy_classifier,
                          predict_probabilities)
from tlkit.plots import plot_history
from tlkit.schedule import ALL, HEAD, parse_stages, plan_stages
from tlkit.training import (ScheduleCallbacks, ScheduleSettings, adapt_batchnorm_momentum,
                            probability_metrics, run_schedule)

BACKBONE_WEIGHTS = "backbone.weights.h5"

@dataclass
class FitResult:
    """What `fit` produced."""

    config: FitConfig  # the resolved settings
    run_dir: Path  # run folder: config.json, data.json, history, curves.png, model.keras
    export_path: Path | None  # the SavedModel version folder (None on a non-chief worker)
    history: list  # one dict per epoch
    metrics: dict  # "val" (and "test") -> {"loss", "accuracy"} of the kept weights
    model: keras.Model  # the trained Keras model
    seconds: dict = field(default_factory=dict)  # time per step: decode, features, epochs, ...


def fit(data_dir=None, *, config=None, resume=None, on_batch_end=None, **options):
    """Trains an image classifier on a folder of images and exports it as a SavedModel.

    The run state is saved in the run folder after every epoch; a run that was killed or
    interrupted continues with `fit(resume=run_dir)`, losing at most the epoch in progress.

    Args:
        data_dir: folder with one subfolder per class (or, with `labels="labels.csv"`,
            the folder a label file's relative paths are looked up in after its own).
        config: a `FitConfig` (for example `FitConfig.load("runs/.../config.json")`);
            options given as keywords override it.
        resume: a run folder of an interrupted run: continue it with its own settings
            (only `verbose` may be given with it).
        on_batch_end: called as `on_batch_end(stage, epoch, batch)` after every training
            batch (see `tlkit.training.ScheduleCallbacks`), for example to report progress or
            to stop the run by raising `KeyboardInterrupt`.
        **options: any setting of `tlkit.config` by field name, for example
            `backbone="lenet5"`, `image_size=32`, `epochs=10`, `val_split=0.2`,
            `test_split=0.1`, `augment="light"`, `flip="none"`, `export_dir="saved_models"`,
            `seed=42`.

    Returns:
        A `FitResult` with the run folder, the export path, the history and the metrics. In
        a multi-worker run (`distribute`, see `tlkit.distribute`) only the chief evaluates
        and exports; the other workers return no export path and no metrics.

    Raises:
        Interrupted: on Ctrl-C, after the last completed epoch was saved; the message says
            how to resume.
        ClusterError: in a multi-worker run, when a worker dies, stops answering or has
            other data; the message says how to resume.

    Example:

    >>> result = tlkit.fit("data/digits", flip="none", epochs=20)
    >>> tlkit.load(result.export_path).predict("data/digits/3/3_0003.png")[0].label
    '3'
    """
    if config is not None and not isinstance(config, FitConfig):
        raise ConfigError(f"`config` must be a FitConfig. Received: config={config!r}")
    run = _start_run(data_dir, config, resume, options)
    built, spec = _build_backbone(run)
    run.data = _load_data(run)
    try:
        model = _build_classifier(run, built, spec)
        _open_run(run, model)
        results, model = _train(run, model, spec, on_batch_end)
        history = [epoch for result in results for epoch in result.history]
        if not run.cluster.is_chief:
            return _worker_done(run, model, history)
        backbone_changed = any(r.name != HEAD and not r.rolled_back for r in results)
        probabilities, metrics, evaluation, thresholds = _evaluate(run, model,
                                                                   backbone_changed)
        schedule = _schedule_report(results)
        _write_run_folder(run, model, schedule, history)
        export_path = _export(run, model, probabilities, metrics, evaluation, schedule,
                              history, thresholds)
        timings = run.clock.seconds()
        _write_json(run.dir / "result.json", {"export_path": str(export_path),
                                              "metrics": metrics, "schedule": schedule,
                                              "seconds": timings})
        clear_state(run.dir)
    finally:
        run.data.close()
    if run.verbose:
        _print_summary(run, metrics, export_path, timings)
    return FitResult(run.config, run.dir, export_path, history, metrics, model, timings)


# --- The steps of a run, in order -------------------------------------------------------------


@dataclass
class _Run:
    """What the steps of one `fit` share."""

    config: FitConfig  # resolved settings
    requested: FitConfig  # the settings as asked, before `resolve_config`
    cluster: object  # tlkit.distribute's cluster: strategy, workers, chief
    policy: object  # the Keras dtype policy of training
    clock: "_Clock"
    dir: Path | None = None  # the run folder: given when resuming, else made by _open_run
    own_dir: Path | None = None  # this worker's folder in it (the run folder on the chief)
    state: object = None  # a resume point (tlkit.checkpoint.RunState) or None
    data: object = None  # tlkit.data.ImageData
    # The validation split's pooled features as the head stage trained on them, when
    # TensorFlow float32 computed them (exactly the float32 model's): evaluation takes the
    # validation probabilities from them when no later stage changed the backbone.
    head_val_features: object = None

    @property
    def verbose(self):
        return self.config.train.verbose


def _start_run(data_dir, config, resume, options):
    """Settings built, `auto` resolved, the cluster joined, the export version checked."""
    clock = _Clock()
    if resume is not None:
        run_dir, config, state = _resumable_run(resume, data_dir, config, options)
    else:
        config = build_config(config, data_dir=data_dir and os.fspath(data_dir), **options)
        run_dir, state = None, None
    notes = []
    requested, config = config, resolve_config(config, _survey(config), notes)
    if config.train.verbose:
        for note in notes:
            print(f"auto {note}")
    cluster = connect(config.train.distribute)  # before any other TensorFlow operation
    check_batch_size(cluster, config.data.batch_size)
    policy = precision_policy(config.train.mixed_precision)
    keras.utils.set_random_seed(config.seed)
    if cluster.is_chief and not config.export.overwrite:
        check_version_free(config.export.export_dir, config.export.name,
                           config.export.version)
    return _Run(config, requested, cluster, policy, clock, dir=run_dir, state=state)


def _build_backbone(run):
    """The backbone (or the model to continue), built before the data is read so that a
    weights problem shows at once; returns it with the backbone's registry entry."""
    config = run.config
    spec = get_backbone(config.model.backbone)
    if config.model.init_from:
        return load_for_continuation(config.model.init_from), spec
    return build_backbone(spec.name, config.data.image_size, config.model.weights), spec


def _load_data(run):
    """Decoded, checked and split images, with a warning for split leaks."""
    config = run.config
    with run.clock.step("decode"):
        data = load_image_data(config.data, seed=config.seed, verbose=run.verbose)
        try:
            leaks = split_leaks(data)
        except BaseException:
            data.close()
            raise
    if leaks:
        data.warnings.append(
            f"{len(leaks)} near-duplicate image pair(s) straddle the splits (e.g. "
            f"{leaks[0][0]} in {leaks[0][1]} and {leaks[0][2]} in {leaks[0][3]}): "
            "validation and test scores may be optimistic. `tlkit doctor "
            f"{config.data.data_dir}"
            f"{' --labels ' + config.data.labels if config.data.labels else ''}` lists them.")
    if run.verbose:
        print(data.summary())
    return data


def _build_classifier(run, built, spec):
    """The classifier for this data: a new head on the backbone, or the continued model
    with its head extended to the new classes."""
    config, data = run.config, run.data
    if config.model.init_from:
        previous, previous_classes = built
        return extend_classifier(previous, previous_classes, data.class_names,
                                 config.model.dropout, multi_label=data.multi_label)
    return build_classifier(spec.name, data.num_classes, config.data.image_size,
                            config.model.dropout, backbone_model=built,
                            multi_label=data.multi_label)


def _open_run(run, model):
    """Workers agree on data and model; the run folder is made (or reopened to resume)."""
    if run.cluster.workers > 1:
        check_agreement(run.cluster, _worker_fingerprint(run.config, run.data, model))
    run.dir, run.own_dir, run.state = _open_run_folder(
        run.cluster, run.config, run.requested, run.data, run.dir, run.state)


def _train(run, model, spec, on_batch_end):
    """The staged schedule; returns its stage results and the trained float32 model."""
    config, data, cluster = run.config, run.data, run.cluster
    pretrained = config.model.pretrained
    if not pretrained:
        steps = -(-len(data.splits["train"]) // config.data.batch_size)
        adapt_batchnorm_momentum(model, steps)
    trained = for_training(model, cluster, run.policy)
    groups = unfreeze_groups(spec, trained.get_layer("backbone"))
    stages = _schedule(config, [name for name, _ in groups], pretrained)
    if run.verbose:
        print(cluster.describe(config.data.batch_size, config.train.learning_rate, run.policy,
                               config.train.jit))
    augmenter = build_augmenter(config.model.augment, config.model.flip, seed=config.seed)
    batch = config.data.batch_size
    train_ds = make_dataset(data.splits["train"], batch, shuffle=True, seed=config.seed,
                            augmenter=augmenter)
    val_ds = make_dataset(data.splits["val"], batch)
    weights = None
    if config.train.class_weight == "auto":
        labels = data.splits["train"].labels
        weights = (balanced_label_weights(labels) if data.multi_label
                   else balanced_class_weights(labels, data.num_classes))
    settings = ScheduleSettings(
        patience=config.train.patience,
        freeze_batchnorm=pretrained and not config.model.train_bn,
        sample_weights=weights, verbose=run.verbose,
        steps_per_execution=config.train.steps_per_execution,
        jit_compile=config.train.jit == "on", strategy=cluster.strategy,
        checkpoint_dir=run.own_dir, keep_previous_state=cluster.workers > 1)
    callbacks = _FitCallbacks(
        _feature_inputs(config, spec, trained, data, run.verbose, run.clock,
                        lambda features: setattr(run, "head_val_features", features)),
        _tensorboard(config, run.dir) if cluster.is_chief else None, on_batch_end)
    try:
        with failures(cluster, run.dir), run.clock.step("epochs"):
            results = run_schedule(trained, groups, stages, train_ds, val_ds, settings,
                                   callbacks, resume=run.state)
    except KeyboardInterrupt:
        raise Interrupted(
            "Training interrupted; every completed epoch is saved in "
            f"{str(run.dir)!r}. Resume with `resume={str(run.dir)!r}`."
        ) from None
    if trained is not model:  # a plain float32 copy evaluates and exports
        model = copy_classifier(trained)
    return results, model


class _FitCallbacks(ScheduleCallbacks):
    """fit's hooks into the schedule: cached features as stage inputs, TensorBoard after
    each epoch, the caller's `on_batch_end`; each may be None."""

    def __init__(self, inputs, epoch_end, batch_end):
        self._inputs, self._epoch_end, self._batch_end = inputs, epoch_end, batch_end

    def stage_inputs(self, stage):
        return self._inputs(stage) if self._inputs is not None else None

    def on_epoch_end(self, logs):
        if self._epoch_end is not None:
            self._epoch_end(logs)

    def on_batch_end(self, stage, epoch, batch):
        if self._batch_end is not None:
            self._batch_end(stage, epoch, batch)


def _worker_done(run, model, history):
    """A non-chief worker's end: its state goes; the chief evaluates and exports."""
    clear_state(run.own_dir)
    if run.verbose:
        print(f"Worker {run.cluster.worker} done; the chief (worker 0) evaluates, writes "
              f"the run folder {run.dir} and exports.")
    return FitResult(run.config, run.dir, None, history, {}, model)


def _evaluate(run, model, backbone_changed):
    """One forward pass per held-out split feeds its metrics and its evaluation report (none
    for the validation split when the head stage's float32 features of it still hold: only
    the head runs); a multi-label run's thresholds are chosen on the validation split first
    (None for a single-label run)."""
    data, batch = run.data, run.config.data.batch_size
    with run.clock.step("evaluation"):
        probabilities = {}
        for name in ("val", "test"):
            if name not in data.splits:
                continue
            if name == "val" and run.head_val_features is not None and not backbone_changed:
                from tlkit.features import head_model

                probabilities[name] = predict_probabilities(head_model(model),
                                                            run.head_val_features, batch)
            else:
                probabilities[name] = predict_probabilities(model, data.splits[name].images,
                                                            batch)
        metrics = {name: probability_metrics(data.splits[name].labels, values, batch)
                   for name, values in probabilities.items()}
        thresholds = (choose_thresholds(data.splits["val"].labels, probabilities["val"])
                      if data.multi_label else None)
        evaluation = {name: _evaluation_summary(evaluate_arrays(
            model, data.splits[name].images, data.splits[name].labels, data.class_names,
            output_dir=run.dir / f"evaluation_{name}", sources=data.splits[name].files,
            probabilities=values, thresholds=thresholds))
            for name, values in probabilities.items()}
    return probabilities, metrics, evaluation, thresholds


def _write_run_folder(run, model, schedule, history):
    """The trained model, its backbone's weights, schedule, history and curves."""
    config = run.config
    with run.clock.step("run folder"):
        model.save(run.dir / "model.keras")
        model.get_layer("backbone").save_weights(run.dir / BACKBONE_WEIGHTS)
        _write_json(run.dir / "schedule.json", schedule)
        _write_json(run.dir / "history.json", history)
        _write_csv(run.dir / "history.csv", history)
        plot_history(history, run.dir / "curves.png", title=f"{config.export.name}: "
                     f"{config.model.backbone} at {config.data.image_size}px")


def _export(run, model, probabilities, metrics, evaluation, schedule, history, thresholds):
    """The verified SavedModel version with its metadata and model card."""
    config, data = run.config, run.data
    with run.clock.step("export"):
        return export_classifier(
            model, data.class_names, config.export.export_dir, config.export.name,
            image_size=config.data.image_size, resize=config.data.resize,
            version=config.export.version,
            metadata={"backbone": config.model.backbone, "metrics": metrics,
                      "evaluation": evaluation,
                      "weights": config.model.weights, "schedule": schedule,
                      "epochs_trained": len(history),
                      "data": {n: len(s) for n, s in data.splits.items()},
                      "run_dir": str(run.dir.resolve()), "config": config.to_dict()},
            verify_images=data.splits["val"].images[:8],
            verify_probabilities=probabilities["val"][:8],
            model_card=_model_card(config, data, schedule, evaluation),
            calibration_images=_calibration_sample(data.splits["train"], config.seed),
            overwrite=config.export.overwrite, thresholds=thresholds,
        )


def _print_summary(run, metrics, export_path, timings):
    accuracy = "label accuracy" if run.data.multi_label else "accuracy"
    for name, values in metrics.items():
        print(f"{name}: loss={values['loss']:.4f} {accuracy}={values['accuracy']:.4f}")
    print(f"Run folder: {run.dir}")
    print(f"Exported: {export_path}")
    print(_Clock.line(timings))


class _Clock:
    """Seconds per step of a run since it started; `epochs` excludes the feature extraction
    that runs inside the schedule."""

    def __init__(self):
        self._started = time.perf_counter()
        self._seconds = {}

    @contextlib.contextmanager
    def step(self, name):
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - started

    def seconds(self):
        """`{step: seconds}` in the order of a run, with `other` and `total`."""
        steps = dict(self._seconds)
        if "epochs" in steps:
            steps["epochs"] -= steps.get("features", 0.0)
        order = ("decode", "features", "epochs", "evaluation", "run folder", "export")
        steps = {name: round(steps[name], 2) for name in order if name in steps}
        total = time.perf_counter() - self._started
        return {**steps, "other": round(total - sum(steps.values()), 2),
                "total": round(total, 2)}

    @staticmethod
    def line(seconds):
        """One line: the total, then each step."""
        steps = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()
                          if name != "total")
        return f"Time: {seconds['total']:.1f} s in fit: {steps}"


class Interrupted(TlkitError):
    """Training was interrupted (Ctrl-C); the message says how to resume."""


def _resumable_run(resume, data_dir, config, options):
    run_dir = Path(resume)
    extra = sorted(set(options) - {"verbose"})
    if data_dir is not None or config is not None or extra:
        raise ConfigError(
            "`resume` continues a run with its own saved settings; give no other settings "
            f"(only `verbose`). Received: {['data_dir'] * (data_dir is not None) + extra}"
        )
    own_dir = worker_folder(run_dir, worker_index())
    if not (own_dir / "config.json").is_file():
        raise ConfigError(f"`resume` must be a tlkit run folder (with config.json). "
                          f"Received: resume={str(run_dir)!r}")
    if (run_dir / "result.json").exists():
        raise ConfigError(f"Run {str(run_dir)!r} already finished (result.json exists); "
                          "there is nothing to resume.")
    state = load_state(own_dir) or load_state(own_dir, previous=True)
    if state is None:
        raise ConfigError(f"Run {str(run_dir)!r} has no saved state: it stopped before its "
                          "first epoch ended. Start it again instead.")
    config = FitConfig.load(own_dir / "config.json")
    if options.get("verbose") is not None:
        config = build_config(config, verbose=options["verbose"])
    return run_dir, config, state


def resolve_config(config, survey=None, notes=None):
    """Returns a copy of a `FitConfig` with every `"auto"` value replaced by what it means
    for this run, and checks the settings that depend on the backbone or the machine.

    Args:
        config: the `FitConfig` to resolve.
        survey: what the data folder holds (`tlkit.data.survey_folder`), for the
            settings that follow the data: `backbone="auto"` trains
            `PRETRAINED_BACKBONE` when the images' median shorter side is at least
            `MIN_PRETRAINED_SIDE` pixels and the scratch CNN below that (or without a
            survey); `image_size="auto"` is the images' side rounded up to a multiple
            of 32 within `MIN_PRETRAINED_INPUT` and the default size for a pretrained
            backbone, to a multiple of 16 within the backbone's smallest and default
            size for one trained from scratch (the 8 px digits train at 16 px:
            benchmarks/demo_size.py).
        notes: a list that gets one sentence per data-dependent choice, saying why.

    Returns:
        The resolved `FitConfig`, as the run folder saves it.

    Raises:
        ConfigError: for an unknown `backbone`, and for settings the backbone, the
            `init_from` model or this machine cannot honour.

    Example:

    >>> resolve_config(build_config(data_dir="data/digits", backbone="lenet5")).data.image_size
    32
    """
    notes = [] if notes is None else notes
    data, model, export = config.data, config.model, config.export
    if model.backbone != "auto":
        get_backbone(model.backbone)
    if model.init_from is not None:
        backbone, image_size = describe_keras_file(model.init_from)
        if model.backbone not in ("auto", backbone):
            raise ConfigError(
                f"`backbone` must match the `init_from` model's ({backbone!r}). "
                f"Received: backbone={model.backbone!r}"
            )
        if data.image_size not in ("auto", image_size):
            raise ConfigError(
                f"`image_size` must match the `init_from` model's ({image_size}). "
                f"Received: image_size={data.image_size!r}"
            )
        model = dataclasses.replace(model, backbone=backbone, weights="none")
        data = dataclasses.replace(data, image_size=image_size)
    elif model.backbone == "auto":
        model = dataclasses.replace(model, backbone=_auto_backbone(survey, notes))
    spec = get_backbone(model.backbone)
    if data.image_size == "auto":
        data = dataclasses.replace(data, image_size=_auto_image_size(spec, survey, notes))
    if data.image_size < spec.min_size:
        raise ConfigError(
            f"`image_size` must be >= {spec.min_size} for backbone {spec.name!r}. "
            f"Received: image_size={data.image_size!r}"
        )
    if model.dropout == "auto":
        model = dataclasses.replace(model, dropout=spec.default_dropout)
    if model.weights == "auto":
        model = dataclasses.replace(model, weights="imagenet" if spec.imagenet else "none")
    if model.flip == "auto":
        model = dataclasses.replace(
            model, flip="none" if model.augment == "none" else "horizontal")
    pretrained = model.pretrained
    train = config.train
    if train.unfreeze == "auto":
        fine_tune = pretrained and train.fine_tune_epochs != 0
        train = dataclasses.replace(train, unfreeze=1 if fine_tune else 0)
    if train.cached_views == "auto":  # run configs written before the default was 1
        train = dataclasses.replace(train, cached_views=1)
    group_names = [name for name, _ in spec.unfreeze_groups]
    if pretrained and train.unfreeze > len(group_names):
        raise ConfigError(
            f"`unfreeze` must be <= {len(group_names)} for backbone {spec.name!r} (groups "
            f"{group_names}). Received: unfreeze={train.unfreeze!r}"
        )
    if not pretrained and train.unfreeze:
        raise ConfigError(
            "`unfreeze` needs pretrained weights: with weights='none' every layer trains "
            f"from the start. Received: unfreeze={train.unfreeze!r}, weights='none'"
        )
    if train.stages is not None:
        stages = parse_stages(train.stages, group_names)
        if not pretrained and any(s.target != ALL for s in stages):
            raise ConfigError(
                "With weights='none' the backbone is random, so freezing it is "
                "meaningless: use 'all:EPOCHS@LR' stages or pretrained `weights`. "
                f"Received: stages={train.stages!r}"
            )
    train = _resolve_devices(train)
    if export.name == "auto":
        name = Path(data.data_dir).resolve().name or "model"
        export = dataclasses.replace(export, name=name)
    return dataclasses.replace(config, data=data, model=model, train=train, export=export)


def _auto_backbone(survey, notes):
    if survey is None or survey.image_side < MIN_PRETRAINED_SIDE:
        if survey is not None:
            notes.append(f"backbone: scratch (the images are {survey.image_side} px, below the "
                         f"{MIN_PRETRAINED_SIDE} px a pretrained backbone needs)")
        return "scratch"
    notes.append(f"backbone: {PRETRAINED_BACKBONE} with ImageNet weights (the images are "
                 f"{survey.image_side} px: transfer learning)")
    return PRETRAINED_BACKBONE


def _auto_image_size(spec, survey, notes):
    if survey is None:
        return spec.default_size
    if spec.imagenet:
        side = max(MIN_PRETRAINED_INPUT, -(-survey.image_side // 32) * 32)
    else:  # a network trained here learns nothing from upsampled pixels, at 4x the cost
        side = max(spec.min_size, -(-survey.image_side // 16) * 16)
    side = min(spec.default_size, side)
    if side != spec.default_size:
        notes.append(f"image size: {side} px (the images are {survey.image_side} px; "
                     f"{spec.name}'s default {spec.default_size} px would only upsample them)")
    return side


def _resolve_devices(train):
    """Resolves `distribute` and `jit` for this machine, and checks that it can run
    `mixed_precision` (see `tlkit.distribute`)."""
    distribute = resolve_distribute(train.distribute)
    precision_policy(train.mixed_precision)
    return dataclasses.replace(train, distribute=distribute,
                               jit=resolve_jit(train.jit, distribute))


def _survey(config):
    """The data survey behind the data-dependent defaults; None when there is none to make
    (every such setting given, or the folder missing: the loader reports that)."""
    model, data = config.model, config.data
    if model.init_from is not None or "auto" not in (model.backbone, data.image_size):
        return None
    try:
        return survey_folder(data.data_dir, labels=data.labels)
    except DataError:
        return None


def _open_run_folder(cluster, config, requested, data, run_dir, state):
    """Makes the run folder of a new run, or checks the one resumed. The chief makes it and
    names it for every worker; each other worker keeps its config (resolved, and as
    `requested`), split and resume state in its own folder in it
    (`tlkit.distribute.worker_folder`).

    Returns:
        `(run folder, this worker's folder, state to resume from or None)`.
    """
    if run_dir is not None:
        own_dir = worker_folder(run_dir, cluster.worker)
        _check_same_splits(own_dir, data)
        if cluster.workers > 1:
            states = [s for s in (load_state(own_dir), load_state(own_dir, previous=True))
                      if s is not None]
            point = agreed_resume_point(cluster, [(s.stage_index, s.epochs_done)
                                                  for s in states])
            state = next(s for s in states if (s.stage_index, s.epochs_done) == point)
        return run_dir, own_dir, state
    run_dir = _make_run_dir(config) if cluster.is_chief else None
    if cluster.workers > 1:
        name = chief_text(cluster, run_dir.name if run_dir else "")
        run_dir = Path(config.export.runs_dir) / config.export.name / name
    own_dir = worker_folder(run_dir, cluster.worker)
    own_dir.mkdir(parents=True, exist_ok=True)
    config.save(own_dir / "config.json", requested=requested)
    _write_splits(own_dir / "splits.csv", data)
    if cluster.is_chief:
        _write_json(run_dir / "data.json", data.report())
        (run_dir / "labels.txt").write_text("".join(f"{c}\n" for c in data.class_names))
    return run_dir, own_dir, None


_PER_HOST = {"data": ("data_dir", "labels", "val_dir", "cache", "cache_dir", "workers"),
             "model": ("weights", "init_from"), "train": ("verbose", "tensorboard")}


def _worker_fingerprint(config, data, model):
    """What every worker of a multi-worker run must share, by name, for
    `tlkit.distribute.check_agreement`: paths and per-host settings left out."""
    from tlkit.features import weights_digest

    settings = {**config.to_dict(), "export": None}
    for section, keys in _PER_HOST.items():
        settings[section] = {k: v for k, v in settings[section].items() if k not in keys}
    items = {"class names": "\n".join(data.class_names)}
    for name, split in data.splits.items():
        items[f"{name} split"] = "\n".join(f"{digest} {label}" for digest, label in
                                          zip(split.digests, split.labels))
    items["settings"] = json.dumps(settings, sort_keys=True)
    items["initial weights"] = weights_digest(model)
    return items


def _check_same_splits(run_dir, data):
    with open(run_dir / "splits.csv", newline="") as f:
        saved = sorted((row["file"], row["split"]) for row in csv.DictReader(f))
    now = sorted((file, name) for name, split in data.splits.items() for file in split.files)
    if saved != now:
        raise DataError(
            f"The data folder changed since run {str(run_dir)!r} started (its split differs "
            "from splits.csv), so it cannot be resumed. Start a new run."
        )


def _schedule(config, group_names, pretrained):
    train = config.train
    if train.stages:
        return parse_stages(train.stages, group_names)
    return plan_stages(group_names, pretrained, train.epochs, train.learning_rate,
                       unfreeze=train.unfreeze, fine_tune_epochs=train.fine_tune_epochs)


def _feature_inputs(config, spec, model, data, verbose, clock, keep_val_features):
    """Stage inputs that train a stage on cached outputs of the layers it leaves frozen
    (`tlkit.features`): the head on pooled backbone features, an unfreezing stage on the
    activations below its groups; None when the run does not use them. The head stage's
    validation features go to `keep_val_features` when TensorFlow float32 computed them
    with a float32 backbone (the float32 model's own features)."""
    train_config = config.train
    if not config.model.pretrained or not (train_config.feature_cache or
                                           train_config.fine_tune_cache):
        return None
    from tlkit.features import (ACTIVATIONS_MAX_BYTES, FeatureCache, FeatureEngine,
                                activation_bytes, feature_dataset, frozen_cut, head_model,
                                split_features)

    cache = FeatureCache(Path(config.data.cache_dir) / "features" if config.data.cache_dir
                         else None, train_config.feature_cache_gb * 1024**3)
    settings = dict(backbone_name=spec.name, image_size=config.data.image_size,
                    resize=config.data.resize, preprocessing=spec.preprocessing,
                    augment=config.model.augment, flip=config.model.flip,
                    dtype_policy=model.get_layer("backbone").dtype_policy.name)
    batch = config.data.batch_size
    train_split, val_split = data.splits["train"], data.splits["val"]
    views = train_config.cached_views

    def inputs(stage):
        # Each stage gets its own augmenter with the same seed, so every stage sees the same
        # views, and the training augmenter's random state does not depend on whether they
        # were computed or found in the cache.
        augmenter = build_augmenter(config.model.augment, config.model.flip,
                                    seed=config.seed + 1)
        if stage.target == HEAD:
            if not train_config.feature_cache:
                return None
            cut, what = None, "backbone features"
        else:
            cut = frozen_cut(model) if train_config.fine_tune_cache else None
            count = (views if augmenter is not None else 1) * len(train_split)
            if cut is None or activation_bytes(model, cut, count + len(val_split)) > \
                    ACTIVATIONS_MAX_BYTES:
                return None
            what = f"activations of {cut}"
        started = time.perf_counter()
        with clock.step("features"):
            engine = FeatureEngine(model, verbose=verbose, cut=cut)
            keyed = dict(settings, cut=cut)
            train = split_features(model, train_split, train_split.digests, cache, keyed,
                                   augmenter, views, verbose=verbose, seed=config.seed + 1,
                                   engine=engine)
            val = split_features(model, val_split, val_split.digests, cache, keyed,
                                 verbose=verbose, engine=engine)
        if cut is None and val.computed_by == ("tensorflow", "float32") and \
                settings["dtype_policy"] == "float32":
            keep_val_features(val.features[0])
        if verbose:
            source = "from the cache" if train.from_cache and val.from_cache else \
                f"computed ({engine.name} {engine.precision})"
            print(f"[{stage.target}] {what} for {len(train_split)} x "
                  f"{train.features.shape[0]} view(s) + {len(val_split)} validation images "
                  f"{source} in {time.perf_counter() - started:.1f}s ({cache.folder})")
        return (head_model(model, cut), feature_dataset(train, batch, shuffle=True,
                                                        seed=config.seed),
                feature_dataset(val, batch))

    return inputs


def _tensorboard(config, run_dir):
    """An epoch callback writing TensorBoard scalars, or None when not asked for."""
    if not config.train.tensorboard:
        return None
    import tensorflow as tf

    if importlib.util.find_spec("tensorboard") is None:  # tf.summary needs it installed
        raise ConfigError("`tensorboard=True` needs the tensorboard package: pip install "
                          "tensorboard (or tlkit[tensorboard]).")

    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))

    def write(logs):
        with writer.as_default(step=logs["step"]):
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
                tf.summary.scalar(key, logs[key])
            tf.summary.scalar("stage", logs["stage_index"])
        writer.flush()

    return write


def _model_card(config, data, schedule, evaluation):
    """A short markdown model card: data, schedule, metrics, limitations."""
    lines = [
        f"# Model card: {config.export.name}",
        "",
        f"Image classifier trained by tlkit: backbone `{config.model.backbone}` (weights "
        f"`{config.model.weights}`{', continued from ' + config.model.init_from if config.model.init_from else ''}), "
        f"input {config.data.image_size}x{config.data.image_size} RGB, resize policy "
        f"`{config.data.resize}`, "
        + (f"{data.num_classes} labels, multi-label (a sigmoid per label, binary "
           "cross-entropy, per-label thresholds)." if data.multi_label else
           f"{data.num_classes} classes."),
        "",
        "## Data",
        "",
        f"Folder `{config.data.data_dir}`, {_split_description(config, data.fixed_split)}; "
        f"{len(data.skipped)} file(s) skipped as unreadable.",
        "",
        "| class | " + " | ".join(data.splits) + " |",
        "| --- | " + " | ".join("---" for _ in data.splits) + " |",
    ]
    counts = {name: split.class_counts(data.num_classes) for name, split in data.splits.items()}
    for index, name in enumerate(data.class_names):
        lines.append(f"| {name} | " + " | ".join(str(int(counts[s][index])) for s in data.splits)
                     + " |")
    lines += ["", "## Training", "", "| stage | learning rate | epochs | best epoch | best "
              "val_loss | best val_accuracy | rolled back |", "| --- | --- | --- | --- | --- | "
              "--- | --- |"]
    for stage in schedule:
        best = stage["best"]
        lines.append(f"| {stage['stage']} | {stage['learning_rate']:g} | {stage['epochs']} | "
                     f"{stage['best_epoch']} | {best.get('val_loss', float('nan')):.4f} | "
                     f"{best.get('val_accuracy', float('nan')):.4f} | {stage['rolled_back']} |")
    lines += ["", "## Metrics", ""] + (_multi_label_card(evaluation) if data.multi_label else
                                       _single_label_card(evaluation))
    lines += [
        "",
        "## Limitations",
        "",
        "- Multi-label: each label has its own sigmoid probability and threshold (chosen on "
        "the validation split to maximise that label's F1, so validation scores at those "
        "thresholds are optimistic); an image may get several labels or none. It only knows "
        "the labels above."
        if data.multi_label else
        "- It only knows the classes above: every image gets one of them, however unlike the "
        "training data it is. Check the probabilities before trusting a prediction.",
        "- The validation split chose the training epochs, so its metrics are optimistic; the "
        "test split (if any) was never used for a decision."
        if "test" in data.splits else "- The validation split chose the training epochs, so "
        "its metrics are optimistic: evaluate on held-out data (`tlkit evaluate`).",
        f"- Images are resized to {config.data.image_size} px (`{config.data.resize}`); "
        "detail smaller than that is lost.",
        "- The serving graph decodes JPEG, PNG, GIF, BMP and WebP; send other formats "
        "decoded to `predict_images`. Images over 89,478,485 pixels are refused.",
        "",
    ]
    return "\n".join(lines)


def _single_label_card(evaluation):
    lines = ["| split | images | accuracy | macro F1 | ECE |", "| --- | --- | --- | --- | --- |"]
    for name, summary in evaluation.items():
        lines.append(f"| {name} | {summary['images']} | {summary['accuracy']:.4f} | "
                     f"{summary['macro_f1']:.4f} | {summary['ece']:.4f} |")
    return lines


def _multi_label_card(evaluation):
    """The model card's multi-label metrics: per split, then per label and split."""
    lines = ["| split | images | subset accuracy | mAP | micro F1 | macro F1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, summary in evaluation.items():
        mean_ap = "-" if summary["map"] is None else f"{summary['map']:.4f}"
        lines.append(f"| {name} | {summary['images']} | {summary['subset_accuracy']:.4f} | "
                     f"{mean_ap} | {summary['micro_f1']:.4f} | {summary['macro_f1']:.4f} |")
    lines += ["", "| label | split | threshold | precision | recall | F1 | AP | support |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, summary in evaluation.items():
        for label, v in summary["per_class"].items():
            ap = "-" if v["average_precision"] is None else f"{v['average_precision']:.4f}"
            lines.append(f"| {label} | {name} | {v['threshold']:.4f} | {v['precision']:.4f} | "
                         f"{v['recall']:.4f} | {v['f1']:.4f} | {ap} | {v['support']} |")
    return lines


def _split_description(config, fixed):
    """How the run's data was labelled and split, for the model card."""
    data = config.data
    if data.labels and fixed:
        return f"labels and split from `{data.labels}`"
    labelled = f"labels from `{data.labels}`, " if data.labels else ""
    folder = f", validation folder {data.val_dir}" if data.val_dir else ""
    return (f"{labelled}split with seed {config.seed} (val {data.val_split}, test "
            f"{data.test_split}{folder})")


def _calibration_sample(split, seed):
    """Up to `CALIBRATION_IMAGES` images of `split` for int8 calibration: one per class in
    turn, each class's images in a seeded random order."""
    rng = np.random.default_rng(seed)
    labels = split.labels.argmax(axis=1) if split.labels.ndim == 2 else split.labels
    queues = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    turns = [i for turn in itertools.zip_longest(*queues) for i in turn if i is not None]
    return np.asarray(split.cache.array[split.indices[turns[:CALIBRATION_IMAGES]]])


def _evaluation_summary(report):
    metrics = report.metrics
    if metrics.get("multi_label"):
        return {"subset_accuracy": metrics["subset_accuracy"], "map": metrics["map"],
                "micro_f1": metrics["micro_avg"]["f1"], "macro_f1": metrics["macro_avg"]["f1"],
                "label_accuracy": metrics["label_accuracy"],
                "per_class": metrics["per_class"], "images": metrics["num_samples"],
                "mistakes": len(report.mistakes)}
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_avg"]["f1"],
            "ece": metrics["ece"], "top_k_accuracy": metrics["top_k_accuracy"],
            "images": metrics["num_samples"], "mistakes": len(report.mistakes)}


def _schedule_report(results):
    report, first_epoch = [], 1
    for result in results:
        report.append({"stage": result.name, "learning_rate": result.learning_rate,
                       "first_epoch": first_epoch, "epochs": len(result.history),
                       "best_epoch": first_epoch + result.best_epoch - 1,
                       "best": result.best, "rolled_back": result.rolled_back,
                       "diverged": result.diverged,
                       "trainable_weights": result.trainable_weights})
        first_epoch += len(result.history)
    return report


def balanced_class_weights(labels, num_classes):
    """Loss weight per class, `n / (num_classes * count)`: rare classes weigh more."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return (len(labels) / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def balanced_label_weights(label_matrix):
    """Multi-label loss weights `(2, K)`: per label, `n / (2 * absent)` where it is absent
    (row 0) and `n / (2 * present)` where present (row 1), so a rare label's few images
    weigh as much in its term of the loss as the many without it."""
    present = np.asarray(label_matrix) > 0.5
    return np.stack([balanced_class_weights(column, 2) for column in present.T.astype(int)],
                    axis=1)


def _make_run_dir(config):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.export.runs_dir) / config.export.name
    for attempt in range(1000):
        run_dir = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as e:
            raise ConfigError(f"Cannot create run folder under {str(base)!r}: {e.strerror}. "
                              "Choose another `runs_dir`.") from None
    raise ConfigError(f"Cannot find a free run folder name under {str(base)!r}.")


def _write_json(path, value):
    """Writes `value` as JSON atomically: `--resume` takes a result.json as a finished run."""
    text = (json.dumps(value, indent=2) + "\n").encode()
    write_atomically(path, lambda f: f.write(text))


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_splits(path, data):
    rows = [{"file": file, "class": label, "split": name}
            for name, split in data.splits.items()
            for file, label in zip(split.files, split.label_names(data.class_names))]
    _write_csv(path, rows)
