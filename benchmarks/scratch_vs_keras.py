"""Training throughput of tlkit's trainer against plain `model.fit`, same network, same data.

Both train a fresh `build_classifier("scratch", 10, 32)` (same seed) on data/digits (1,797
real 8x8 digits at 32 px, 20% held out for validation) with batches of 32, Adam at 1e-3 and
sparse categorical cross-entropy, one validation pass per epoch, no augmentation:

- tlkit: `load_image_data` (decode once), `make_dataset(train, 32, shuffle=True)` and
  `make_dataset(val, 32)`, `Trainer.train_stage` (its custom loop);
- plain Keras: `keras.utils.image_dataset_from_directory(..., validation_split=0.2)` with
  `.cache().prefetch(AUTOTUNE)`, `model.compile(Adam, "sparse_categorical_crossentropy",
  metrics=["accuracy"])` and `model.fit(..., validation_data=...)`.

Epoch time is wall clock between consecutive epoch ends (tlkit's `on_epoch_end` hook, a
Keras callback's `on_epoch_end`), so it includes validation and everything the loop does
between epochs; the first epoch (tracing, cache filling) is excluded. The sides alternate in
`ROUNDS` rounds and the median epoch time of each side is reported.
Goal: tlkit >= 0.95x the plain Keras script's training images/s.

Run: python -m benchmarks.scratch_vs_keras  (about 1.5 minutes on 2 CPU cores)
"""

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402
from tlkit.config import DataConfig  # noqa: E402
from tlkit.data import load_image_data, make_dataset  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402
from tlkit.training import Trainer, adapt_batchnorm_momentum  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
SIZE, BATCH, SEED, LEARNING_RATE = 32, 32, 42, 1e-3
EPOCHS = 4  # the first one is the warm-up
ROUNDS = 2
GOAL = 0.95


def fresh_model(num_classes, train_images):
    """The scratch classifier from the same seed, with the BatchNorm momentum `fit` sets."""
    keras.utils.set_random_seed(SEED)
    model = build_classifier("scratch", num_classes, SIZE)
    adapt_batchnorm_momentum(model, -(-train_images // BATCH))
    return model


def epoch_seconds(ends):
    """Seconds of each epoch after the first, from the times the epochs ended."""
    return [b - a for a, b in zip(ends, ends[1:])]


def with_tlkit():
    """Epoch seconds after the first and training images per epoch of tlkit's trainer."""
    data = load_image_data(DataConfig(data_dir=str(DIGITS), image_size=SIZE, val_split=0.2,
                                      batch_size=BATCH), seed=SEED, verbose=0)
    try:
        train = data.splits["train"]
        train_ds = make_dataset(train, BATCH, shuffle=True, seed=SEED)
        val_ds = make_dataset(data.splits["val"], BATCH)
        model = fresh_model(data.num_classes, len(train))
        ends = []
        Trainer(model, verbose=0).train_stage(
            train_ds, val_ds, epochs=EPOCHS, learning_rate=LEARNING_RATE, patience=EPOCHS,
            on_epoch_end=lambda progress: ends.append(time.perf_counter()))
        return epoch_seconds(ends), len(train)
    finally:
        data.close()


class EpochEnds(keras.callbacks.Callback):
    """Records the time at which every epoch (training and validation) ended."""

    def __init__(self):
        super().__init__()
        self.ends = []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())


def with_keras():
    """Epoch seconds after the first and training images per epoch of `model.fit`."""
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        DIGITS, image_size=(SIZE, SIZE), batch_size=BATCH, validation_split=0.2,
        subset="both", seed=SEED, verbose=False)
    images = sum(int(tf.shape(x)[0]) for x, _ in train_ds)
    num_classes = len(train_ds.class_names)
    train_ds = train_ds.cache().prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.cache().prefetch(tf.data.AUTOTUNE)
    model = fresh_model(num_classes, images)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochEnds()
    # image_dataset_from_directory shuffled the files; fit cannot reshuffle a Dataset.
    model.fit(train_ds, validation_data=val_ds, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=[timer])
    return epoch_seconds(timer.ends), images


def main():
    load, started = os.getloadavg()[0], time.perf_counter()
    seconds = {"tlkit": [], "keras": []}
    images = {}
    for _ in range(ROUNDS):
        for name, run in (("tlkit", with_tlkit), ("keras", with_keras)):
            epochs, images[name] = run()
            seconds[name] += epochs
    run_time = time.perf_counter() - started
    epoch = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: images[name] / epoch[name] for name in seconds}
    ratio = rate["tlkit"] / rate["keras"]
    met = ratio >= GOAL
    lines = [
        "## Scratch CNN training: tlkit's trainer vs plain model.fit "
        "(benchmarks/scratch_vs_keras.py)",
        "",
        f"Machine: {machine()}. Run time: {run_time:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        f"data/digits at {SIZE} px, val split 0.2, batch {BATCH}, Adam {LEARNING_RATE:g}, no "
        f"augmentation, same fresh scratch CNN. {EPOCHS} epochs per run, the first excluded; "
        f"{ROUNDS} rounds alternating the sides; median epoch time (training plus validation).",
        "",
        "| | train images / epoch | epoch seconds (each) | median epoch s | train images/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in (("tlkit", "tlkit: `Trainer.train_stage` on `make_dataset`"),
                        ("keras", "plain Keras: `model.fit` on `image_dataset_from_directory`"
                                  " `.cache().prefetch()`")):
        each = ", ".join(f"{s:.2f}" for s in seconds[name])
        lines.append(f"| {label} | {images[name]} | {each} | {epoch[name]:.2f} | "
                     f"{rate[name]:,.0f} |")
    lines += ["", f"tlkit / plain Keras: {ratio:.2f}x. Goal: >= {GOAL:g}x: "
                  f"{'met' if met else 'NOT met'}."]
    return publish("scratch_vs_keras", lines, met)


if __name__ == "__main__":
    sys.exit(main())
