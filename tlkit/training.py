"""The trainer: one step function, early stopping with best weights, a history per epoch.

tlkit runs its own loop instead of `model.fit`: every step runs through `strategy.run`, with
TensorFlow's default strategy when there is no other (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy, keras-team/keras#20585), and the loop owns its state (epoch,
best weights, patience counter, history), so staged schedules and resuming can build on it,
on one device or many (`tlkit.distribute`). Progress uses Keras's `Progbar`.
"""

import math
import time
import warnings
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from tlkit.checkpoint import RunState, StateWriter
from tlkit.errors import ConfigError
from tlkit.models import traced_function
from tlkit.schedule import ALL, HEAD, StageProgress, StageResult
from tlkit.validation import check_number

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class Trainer:
    """Trains a Keras classifier with sparse categorical cross-entropy and Adam (binary
    cross-entropy for multi-hot float labels `(n, classes)`, a multi-label model's; its
    `accuracy` is then the share of label decisions right at 0.5).

    Every step runs through `strategy.run` on a distributed dataset, whatever the strategy:
    with none given, it is TensorFlow's default strategy (this process, its default
    device), so single-device, multi-GPU and multi-worker training share one code path.
    The batch size of the datasets is the global batch: each replica gets its share.

    Args:
        model: a `keras.Model` that outputs class probabilities, built inside
            `strategy.scope()` (see `tlkit.distribute.for_training`).
        verbose: 0 silent, 1 progress bar per epoch, 2 one line per epoch.
        jit_compile: compile the forward and backward pass with XLA (see benchmarks/jit.py
            for whether it pays on a CPU); the gradient all-reduce and the update run
            outside XLA.
        steps_per_execution: train steps run in one call into the graph (fewer Python
            round trips; progress then updates every that many steps).
        strategy: a `tf.distribute.Strategy`; None: the default strategy.

    Example:

    >>> trainer = Trainer(model)
    >>> result = trainer.train_stage(train_ds, val_ds, epochs=10, learning_rate=1e-3)
    >>> result.best["val_accuracy"]
    """

    def __init__(self, model, verbose=1, jit_compile=False, steps_per_execution=1,
                 strategy=None):
        check_number("steps_per_execution", steps_per_execution, 1, integer=True)
        self.strategy = strategy or tf.distribute.get_strategy()
        if model.weights and not self.strategy.extended.variable_created_in_scope(
                model.weights[0].value):
            raise ConfigError(
                "`model` must be built inside `strategy.scope()` of the strategy it trains "
                "under (tlkit.distribute.for_training makes such a copy). Received: "
                f"strategy={type(self.strategy).__name__}"
            )
        self.model = model
        self.verbose = verbose
        self.jit_compile = jit_compile
        self.steps_per_execution = steps_per_execution

    def train_stage(self, train_ds, val_ds, *, epochs, learning_rate, patience=5,
                    name="train", sample_weights=None, resume=None, on_epoch_end=None,
                    on_batch_end=None):
        """Trains until `epochs` or until `val_loss` has not improved for `patience` epochs.

        The weights of the epoch with the lowest `val_loss` are restored at the end.

        Args:
            train_ds: `tf.data.Dataset` of `(images, labels)` batches.
            val_ds: validation batches, same structure.
            epochs: most epochs to run.
            learning_rate: Adam's learning rate (a new optimizer per stage).
            patience: epochs without improvement before stopping.
            name: stage name recorded in the history.
            sample_weights: optional loss weights: one per class index, or for multi-hot
                labels `(2, K)`, each label's weight where absent (row 0) and present
                (row 1).
            resume: a `StageProgress` saved after an earlier epoch of this stage: training
                continues after it, with its optimizer state and best weights.
            on_epoch_end: called as `on_epoch_end(progress)` after every epoch with the
                stage's `StageProgress` (for checkpoints).
            on_batch_end: called as `on_batch_end(name, epoch, batch)` after every training
                batch (1-based numbers); with `steps_per_execution` > 1 the batches of one
                call into the graph are reported after that call.

        Returns:
            A `StageResult`.
        """
        check_number("epochs", epochs, 1, integer=True)
        check_number("patience", patience, 1, integer=True)
        variables = self.model.trainable_variables
        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
            if any(layer.dtype_policy.name == "mixed_float16" for layer in self.model.layers):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(variables)
        train_step = self._steps(self._make_train_step(optimizer, variables, sample_weights))
        eval_step = self._steps(self._eval_step)
        average_statistics = self._statistics_average()
        steps = _cardinality(train_ds)
        train_ds, val_ds = self._distribute(train_ds), self._distribute(val_ds)

        progress = resume or StageProgress()
        if progress.optimizer_state is not None:
            for variable, value in zip(optimizer.variables, progress.optimizer_state):
                variable.assign(value)
        progress.optimizer = optimizer
        while progress.epoch < epochs and progress.waited < patience:
            epoch = progress.epoch + 1
            if self.verbose == 1:
                print(f"[{name}] Epoch {epoch}/{epochs}")
            started = time.perf_counter()
            train = self._run_epoch(train_ds, train_step, steps, (name, epoch), on_batch_end)
            average_statistics()
            val = self._run_epoch(val_ds, eval_step)
            logs = {"stage": name, "epoch": epoch, **train,
                    "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "lr": float(learning_rate), "seconds": time.perf_counter() - started}
            progress.history.append(logs)
            progress.epoch = epoch
            self._report(name, epoch, epochs, logs)
            if logs["val_loss"] < progress.best:
                progress.best, progress.best_epoch, progress.waited = logs["val_loss"], epoch, 0
                progress.best_weights = [np.array(w) for w in self.model.get_weights()]
            else:
                progress.waited += 1
            if on_epoch_end is not None:
                on_epoch_end(progress)
        if progress.best_weights is not None:
            self.model.set_weights(progress.best_weights)
        history, best_epoch = progress.history, progress.best_epoch
        best_logs = {k: history[best_epoch - 1][k] for k in METRICS} if best_epoch else {}
        stopped = len(history) < epochs
        if stopped and self.verbose:
            print(f"[{name}] Early stop after epoch {len(history)}: best val_loss at epoch "
                  f"{best_epoch}, its weights restored.")
        return StageResult(name, history, best_epoch, best_logs, stopped,
                           learning_rate=float(learning_rate), trainable_weights=len(variables))

    def _make_train_step(self, optimizer, variables, sample_weights):
        """One replica's train step: gradients (under XLA if asked), then the update, whose
        gradient all-reduce over the replicas Keras's optimizer does."""
        model = self.model
        weights = None if sample_weights is None else tf.constant(sample_weights, tf.float32)

        def gradients(images, labels):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                losses = _losses(labels, probabilities, weights)
                loss = optimizer.scale_loss(tf.nn.compute_average_loss(losses))
            return tape.gradient(loss, variables), tf.stack(
                _batch_sums(labels, probabilities, losses))

        if self.jit_compile:
            gradients = tf.function(gradients, jit_compile=True)

        def train_step(images, labels):
            grads, sums = _unless_empty(labels, lambda: gradients(images, labels), lambda: (
                [tf.zeros(v.shape, v.dtype) for v in variables], tf.zeros([3])))
            optimizer.apply(grads, variables)  # every replica joins the all-reduce
            return sums

        return train_step

    def _eval_step(self, images, labels):
        return _unless_empty(labels, lambda: tf.stack(_eval_step(self.model, images, labels)),
                             lambda: tf.zeros([3]))

    def _steps(self, replica_step):
        """A graph function that runs up to `steps_per_execution` steps of `replica_step`
        on every replica: `(batch sums added over steps and replicas, steps run)`."""
        strategy, steps = self.strategy, self.steps_per_execution

        @tf.function
        def run(iterator):
            totals, count = tf.zeros([3]), tf.constant(0)
            for _ in tf.range(steps):
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                sums = strategy.run(replica_step, args=batch.get_value())
                totals += strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)
                count += 1
            return totals, count

        return run

    def _statistics_average(self):
        """A function that sets the moving statistics of the training BatchNormalization
        layers to their mean over the replicas. Each replica normalises with the statistics
        of its share of the batch, so within an epoch the replicas' moving statistics drift
        apart; averaged after every epoch, every worker validates, saves and ends with the
        same weights. With one replica it does nothing."""
        variables = [variable for layer in _leaf_layers(self.model)
                     if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                     for variable in (layer.moving_mean, layer.moving_variance)]
        if self.strategy.num_replicas_in_sync == 1 or not variables:
            return lambda: None
        strategy = self.strategy

        @tf.function
        def average():
            def replica_fn():
                means = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])
                for variable, mean in zip(variables, means):
                    variable.assign(mean)

            strategy.run(replica_fn)

        return average

    def _distribute(self, dataset):
        """Splits each batch of `dataset` over the replicas (and workers: every worker runs
        the same input pipeline and keeps its share of every batch)."""
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    def _run_epoch(self, dataset, step, steps=None, where=None, on_batch_end=None):
        """Runs `step` over `dataset`; a training epoch (`where` = (stage, epoch)) shows
        progress and calls `on_batch_end`."""
        progbar = (keras.utils.Progbar(steps, stateful_metrics=["loss", "accuracy"])
                   if self.verbose == 1 and where else None)
        totals, index = np.zeros(3), 0
        iterator = iter(dataset)
        while True:
            sums, count = step(iterator)
            if not int(count):
                break
            if where and on_batch_end is not None:
                for batch in range(index + 1, index + int(count) + 1):
                    on_batch_end(*where, batch)
            totals += sums.numpy()
            index += int(count)
            self._progress(progbar, index, totals)
        if progbar is not None:
            progbar.update(progbar.target or index, finalize=True)
        if not totals[2]:
            return {"loss": math.nan, "accuracy": math.nan}
        return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}

    @staticmethod
    def _progress(progbar, index, totals):
        if progbar is not None:
            progbar.update(index, [("loss", totals[0] / totals[2]),
                                   ("accuracy", totals[1] / totals[2])], finalize=False)

    def _report(self, name, epoch, epochs, logs):
        if self.verbose:
            print(f"[{name}] epoch {epoch}/{epochs}: "
                  + ", ".join(f"{k}={logs[k]:.4f}" for k in METRICS)
                  + f" ({logs['seconds']:.1f}s)")


def _unless_empty(labels, compute, empty):
    """`compute()`, or `empty()` on a replica whose share of a batch is empty: the last
    batch of an epoch may not reach every replica of a multi-worker run."""
    return tf.cond(tf.size(labels) > 0, compute, empty)


def _losses(labels, probabilities, weights=None):
    """Per-image loss: cross-entropy of class indices, or, for multi-hot label rows, the
    binary cross-entropy averaged over the labels.

    `weights` (optional): for class indices, one weight per class, scaling each image's
    loss by its class's; for multi-hot rows, `(2, K)`: row 0 weighs each label's term where
    the label is absent, row 1 where it is present."""
    if labels.shape.rank == 2:
        targets = tf.cast(labels, probabilities.dtype)
        terms = keras.ops.binary_crossentropy(targets, probabilities)
        if weights is not None:
            weights = tf.cast(weights, terms.dtype)
            terms = terms * (weights[0] + targets * (weights[1] - weights[0]))
        return tf.reduce_mean(terms, axis=-1)
    losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    if weights is None:
        return losses
    return losses * tf.cast(tf.gather(weights, labels), losses.dtype)


def _batch_sums(labels, probabilities, losses):
    """Summed loss, correct count and images of a batch. For multi-hot labels an image's
    "correct" is its share of labels right at threshold 0.5 (binary accuracy)."""
    if labels.shape.rank == 2:
        right = tf.equal(probabilities >= 0.5, tf.cast(labels, probabilities.dtype) >= 0.5)
        correct = tf.reduce_sum(tf.reduce_mean(tf.cast(right, tf.float32), axis=-1))
    else:
        predicted = tf.argmax(probabilities, axis=-1, output_type=labels.dtype)
        correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    return tf.reduce_sum(losses), correct, tf.cast(tf.shape(labels)[0], tf.float32)


def _cardinality(dataset):
    count = int(dataset.cardinality())
    return count if count > 0 else None


def evaluate(model, dataset):
    """Mean cross-entropy loss and accuracy of `model` on a dataset of `(images, labels)`.

    Args:
        model: a `keras.Model` that outputs class probabilities.
        dataset: `tf.data.Dataset` of batches.

    Returns:
        A dict with `"loss"` and `"accuracy"`.
    """
    totals = np.zeros(3)
    step = traced_function(model, "eval", _eval_step)
    for images, labels in dataset:
        totals += [float(v) for v in step(images, labels)]
    if not totals[2]:
        return {"loss": math.nan, "accuracy": math.nan}
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}


def _eval_step(model, images, labels):
    probabilities = model(images, training=False)
    return _batch_sums(labels, probabilities, _losses(labels, probabilities))


def probability_metrics(labels, probabilities, batch_size):
    """Mean cross-entropy loss and accuracy of probabilities already predicted, computed
    exactly as `evaluate` computes them on a dataset of `batch_size` batches.

    Args:
        labels: integer class index per row of `probabilities`, or multi-hot rows
            `(n, classes)` (then binary cross-entropy and binary accuracy).
        probabilities: float32 array `(n, classes)`.
        batch_size: the batch size the probabilities were predicted with.

    Returns:
        A dict with `"loss"` and `"accuracy"` (NaN for no row).
    """
    totals = np.zeros(3)
    for start in range(0, len(labels), batch_size):
        batch_labels = np.asarray(labels[start:start + batch_size])
        batch_labels = tf.constant(batch_labels, np.float32 if batch_labels.ndim == 2
                                   else np.int64)
        batch = tf.constant(np.asarray(probabilities[start:start + batch_size], np.float32))
        totals += [float(v) for v in _batch_sums(batch_labels, batch,
                                                 _losses(batch_labels, batch))]
    if not totals[2]:
        return {"loss": math.nan, "accuracy": math.nan}
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}


# --- Staged schedules --------------------------------------------------------------------------


def set_trainable(model, groups, target, freeze_batchnorm=True):
    """Sets which backbone layers train for a stage; the head always trains.

    Args:
        model: a tlkit classifier (with a layer named `"backbone"`).
        groups: `tlkit.backbones.unfreeze_groups(spec, backbone)`.
        target: `"head"`, `"all"` or a group name.
        freeze_batchnorm: keep BatchNormalization layers frozen (`trainable=False`, which in
            Keras 3 also runs them in inference mode) even in unfrozen groups.

    Returns:
        The names of the unfrozen groups.
    """
    names = [name for name, _ in groups]
    if target not in (HEAD, ALL, *names):
        raise ConfigError(f"Stage target must be one of {[HEAD, *names, ALL]}. "
                          f"Received: {target!r}")
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    if target == ALL:
        unfrozen = names
    elif target == HEAD:
        unfrozen = []
    else:
        unfrozen = names[:names.index(target) + 1]
    open_layers = {id(layer) for name, layers in groups if name in unfrozen for layer in layers}
    for layer in _leaf_layers(backbone):
        trainable = target == ALL or id(layer) in open_layers
        if freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable
    return unfrozen


def adapt_batchnorm_momentum(model, steps_per_epoch, default=0.9):
    """Lowers BatchNorm momentum when an epoch has few steps, so that the moving statistics
    used for validation follow the weights within an epoch.

    With momentum m, the moving mean and variance average about 1 / (1 - m) batches. On a
    small training set (two steps an epoch, say) the usual 0.9-0.99 make them lag the
    changing weights for tens of epochs, validation runs on stale statistics, and early
    stopping ends training at chance accuracy. tlkit uses `min(default, 1 - 2 / steps)`:
    unchanged from 20 steps an epoch up, and the last batches' statistics below that.

    Args:
        model: a Keras model; every BatchNormalization layer in it (nested too) is changed.
        steps_per_epoch: training steps per epoch.
        default: the momentum used when epochs are long enough.

    Returns:
        The momentum set.
    """
    momentum = float(min(default, max(0.0, 1.0 - 2.0 / max(steps_per_epoch, 1))))
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
    return momentum


def _leaf_layers(model):
    for layer in model.layers:
        sublayers = getattr(layer, "layers", None)
        if sublayers:
            yield from _leaf_layers(layer)
        else:
            yield layer


@dataclass(frozen=True)
class ScheduleSettings:
    """How `run_schedule` trains each stage: one object instead of a dozen keywords."""

    patience: int = 5  # early-stopping patience per stage
    freeze_batchnorm: bool = True  # BatchNorm stays frozen in unfrozen groups (`set_trainable`)
    sample_weights: object = None  # loss weights (see `Trainer.train_stage`), or None
    verbose: int = 1  # 0 silent, 1 progress bars, 2 one line per epoch
    steps_per_execution: int = 1  # train steps per call into the graph (see `Trainer`)
    jit_compile: bool = False  # XLA for the forward and backward pass (see `Trainer`)
    strategy: object = None  # the `tf.distribute.Strategy` the model was built under
    checkpoint_dir: object = None  # run state saved there after every epoch (`tlkit.checkpoint`)
    keep_previous_state: bool = False  # also keep the epoch before (multi-worker runs)


class ScheduleCallbacks:
    """The hooks of `run_schedule`; subclass and override the ones you need (each default
    does nothing)."""

    def stage_inputs(self, stage):
        """Called with a `Stage` after its layers are frozen; may return `(model, train_ds,
        val_ds)` to train that stage on other inputs (the head on cached features,
        `tlkit.features`), or None for the schedule's model and datasets."""
        return None

    def on_epoch_end(self, logs):
        """Called with each epoch's logs (with `stage_index` and `step`, the epoch's number
        over all stages), after its state is saved; e.g. to write TensorBoard summaries."""

    def on_batch_end(self, stage, epoch, batch):
        """Called after every training batch with the stage's target, the epoch and the
        batch (1-based); e.g. to report progress, or to stop by raising
        `KeyboardInterrupt`."""


def run_schedule(model, groups, stages, train_ds, val_ds, settings=None, callbacks=None,
                 resume=None):
    """Runs a staged schedule on `model`: freeze, train with early stopping, roll back.

    Each stage sets the trainable layers (`set_trainable`), trains with a new optimizer at its
    learning rate, and keeps its best epoch. A stage whose best `val_loss` is worse than the
    best so far is rolled back to the weights before it; so is a stage whose every `val_loss`
    is NaN (it diverged: `StageResult.diverged`, with a `RuntimeWarning`).

    Args:
        model: a tlkit classifier.
        groups: the backbone's unfreeze groups (`tlkit.backbones.unfreeze_groups`).
        stages: a sequence of `Stage`.
        train_ds: training batches.
        val_ds: validation batches.
        settings: a `ScheduleSettings`; None: its defaults.
        callbacks: a `ScheduleCallbacks`; None: no hooks.
        resume: a `tlkit.checkpoint.RunState` to continue from.

    Returns:
        A list of `StageResult`, one per stage.

    Example:

    >>> settings = ScheduleSettings(patience=3, verbose=0)
    >>> results = run_schedule(model, groups, parse_stages("head:5@1e-3,all:5@1e-4"),
    ...                        train_ds, val_ds, settings)
    """
    settings = settings or ScheduleSettings()
    callbacks = callbacks or ScheduleCallbacks()
    verbose = settings.verbose
    if resume is not None:
        results, best, best_weights = list(resume.finished), resume.best, resume.rollback_weights
        model.set_weights(resume.current_weights)
        if verbose:
            print(f"Resuming at stage {resume.stage_index + 1}/{len(stages)}, after epoch "
                  f"{resume.stage.epoch} of that stage.")
    else:
        results, best, best_weights = [], math.inf, None

    writer = (StateWriter(settings.checkpoint_dir, settings.keep_previous_state)
              if settings.checkpoint_dir is not None else None)

    def save(index, progress):
        if writer is not None:
            writer.save(RunState(index, results, best, best_weights, progress,
                                 model.get_weights()))
        if progress.history:
            done = sum(len(r.history) for r in results)
            callbacks.on_epoch_end({**progress.history[-1], "stage_index": index,
                                    "step": done + progress.epoch})

    for index, stage in enumerate(stages):
        if index < len(results):
            continue
        unfrozen = set_trainable(model, groups, stage.target, settings.freeze_batchnorm)
        if verbose:
            trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            print(f"[{stage.target}] stage {stage}: unfrozen groups {unfrozen or 'none'}, "
                  f"{trainable:,} trainable parameters")
        progress = resume.stage if resume is not None and index == resume.stage_index else None
        trained, stage_train, stage_val = (callbacks.stage_inputs(stage)
                                           or (model, train_ds, val_ds))
        before = best_weights if best_weights is not None else model.get_weights()
        trainer = Trainer(trained, verbose=verbose, jit_compile=settings.jit_compile,
                          steps_per_execution=settings.steps_per_execution,
                          strategy=settings.strategy)
        result = trainer.train_stage(
            stage_train, stage_val, epochs=stage.epochs, learning_rate=stage.learning_rate,
            patience=settings.patience, name=stage.target,
            sample_weights=settings.sample_weights, resume=progress,
            on_epoch_end=lambda p, i=index: save(i, p), on_batch_end=callbacks.on_batch_end)
        if not result.best:  # no epoch had a val_loss to compare: NaN throughout
            model.set_weights(before)
            result.rolled_back = result.diverged = True
            warnings.warn(f"Stage {stage} diverged (every val_loss was NaN): rolled back to "
                          "the weights before it. A lower learning rate may help.",
                          RuntimeWarning, stacklevel=2)
        elif result.best["val_loss"] > best:
            model.set_weights(before)
            result.rolled_back = True
            if verbose:
                print(f"[{stage.target}] best val_loss {result.best['val_loss']:.4f} is worse "
                      f"than the previous stages' {best:.4f}: rolled back to their weights.")
        else:
            best, best_weights = result.best["val_loss"], model.get_weights()
        for logs in result.history:
            logs["stage_index"] = index
        results.append(result)
        save(index + 1, StageProgress())
    return results
