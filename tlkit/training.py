"""The trainer: one step function, early stopping with best weights, a history per epoch.

tlkit runs its own loop instead of `model.fit`: the train step is a `tf.function` that can be
run directly or through `strategy.run` (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy, keras-team/keras#20585), and the loop owns its state (epoch,
best weights, patience counter, history), so staged schedules and resuming can build on it.
Progress uses Keras's `Progbar`.
"""

import math
import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

from tlkit.config import _check_number

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class StageResult:
    """What one training stage did."""

    name: str  # stage name
    history: list  # one dict per epoch: stage, epoch, loss, accuracy, val_*, lr, seconds
    best_epoch: int  # 1-based epoch whose weights were kept
    best: dict = field(default_factory=dict)  # metrics of the best epoch
    stopped_early: bool = False  # ended by patience before `epochs`


class Trainer:
    """Trains a Keras classifier with sparse categorical cross-entropy and Adam.

    Args:
        model: a `keras.Model` that outputs class probabilities.
        verbose: 0 silent, 1 progress bar per epoch, 2 one line per epoch.

    Example:

    >>> trainer = Trainer(model)
    >>> result = trainer.train_stage(train_ds, val_ds, epochs=10, learning_rate=1e-3)
    >>> result.best["val_accuracy"]
    """

    def __init__(self, model, verbose=1):
        self.model = model
        self.verbose = verbose

    def train_stage(self, train_ds, val_ds, *, epochs, learning_rate, patience=5,
                    name="train", sample_weights=None):
        """Trains until `epochs` or until `val_loss` has not improved for `patience` epochs.

        The weights of the epoch with the lowest `val_loss` are restored at the end.

        Args:
            train_ds: `tf.data.Dataset` of `(images, labels)` batches.
            val_ds: validation batches, same structure.
            epochs: most epochs to run.
            learning_rate: Adam's learning rate (a new optimizer per stage).
            patience: epochs without improvement before stopping.
            name: stage name recorded in the history.
            sample_weights: optional float array, one weight per class index.

        Returns:
            A `StageResult`.
        """
        _check_number("epochs", epochs, 1, integer=True)
        _check_number("patience", patience, 1, integer=True)
        optimizer = keras.optimizers.Adam(learning_rate)
        variables = self.model.trainable_variables
        optimizer.build(variables)
        step = self._make_train_step(optimizer, variables, sample_weights)
        steps = _cardinality(train_ds)

        history, best, best_epoch, best_weights, waited = [], math.inf, 0, None, 0
        for epoch in range(1, epochs + 1):
            if self.verbose == 1:
                print(f"[{name}] Epoch {epoch}/{epochs}")
            started = time.perf_counter()
            train = self._run_epoch(train_ds, step, steps)
            val = evaluate(self.model, val_ds)
            logs = {"stage": name, "epoch": epoch, **train,
                    "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "lr": float(learning_rate), "seconds": time.perf_counter() - started}
            history.append(logs)
            self._report(name, epoch, epochs, logs)
            if logs["val_loss"] < best:
                best, best_epoch, waited = logs["val_loss"], epoch, 0
                best_weights = [np.array(w) for w in self.model.get_weights()]
            else:
                waited += 1
                if waited >= patience:
                    break
        if best_weights is not None:
            self.model.set_weights(best_weights)
        best_logs = {k: history[best_epoch - 1][k] for k in METRICS} if best_epoch else {}
        stopped = len(history) < epochs
        if stopped and self.verbose:
            print(f"[{name}] Early stop after epoch {len(history)}: best val_loss at epoch "
                  f"{best_epoch}, its weights restored.")
        return StageResult(name, history, best_epoch, best_logs, stopped)

    def _make_train_step(self, optimizer, variables, sample_weights):
        model = self.model
        weights = None if sample_weights is None else tf.constant(sample_weights, tf.float32)

        @tf.function(reduce_retracing=True)
        def train_step(images, labels):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
                if weights is not None:
                    losses = losses * tf.gather(weights, labels)
                loss = tf.nn.compute_average_loss(losses)
            optimizer.apply(tape.gradient(loss, variables), variables)
            return _batch_sums(labels, probabilities, losses)

        return train_step

    def _run_epoch(self, dataset, step, steps):
        progbar = keras.utils.Progbar(steps) if self.verbose == 1 else None
        totals = np.zeros(3)
        for index, (images, labels) in enumerate(dataset, start=1):
            totals += [float(v) for v in step(images, labels)]
            if progbar is not None:
                progbar.update(index, [("loss", totals[0] / totals[2]),
                                       ("accuracy", totals[1] / totals[2])], finalize=False)
        if progbar is not None:
            progbar.update(progbar.target or index, finalize=True)
        return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}

    def _report(self, name, epoch, epochs, logs):
        if self.verbose:
            print(f"[{name}] epoch {epoch}/{epochs}: "
                  + ", ".join(f"{k}={logs[k]:.4f}" for k in METRICS)
                  + f" ({logs['seconds']:.1f}s)")


def _batch_sums(labels, probabilities, losses):
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
    for images, labels in dataset:
        totals += [float(v) for v in _eval_step(model, images, labels)]
    if not totals[2]:
        return {"loss": math.nan, "accuracy": math.nan}
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}


@tf.function(reduce_retracing=True)
def _eval_step(model, images, labels):
    probabilities = model(images, training=False)
    losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    return _batch_sums(labels, probabilities, losses)


def predict_probabilities(model, images, batch_size=256):
    """Class probabilities for a uint8 or float array of images, in batches."""
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return np.concatenate([_predict_step(model, tf.cast(b, tf.float32)).numpy()
                           for b in dataset]) if len(images) else np.zeros((0,))


@tf.function(reduce_retracing=True)
def _predict_step(model, images):
    return model(images, training=False)
