"""Frozen-stage training: tlkit's cached features vs the Keras guide's way.

The Keras transfer-learning guide trains a head with `image_dataset_from_directory`, a frozen
backbone inside the model and `fit`: every epoch runs the backbone on every image again.
tlkit runs it once per image (K augmented views) and trains the head on cached features.

Two measurements, each on the same backbone, data and epochs for both ways:

1. Accuracy and speed with real features: tlkit's scratch CNN pretrained on digits 0-4 (its
   backbone weights file), head trained on digits 5-9 at 64 px. Accuracies must agree
   within 2 points.
2. Speed at ResNet50's cost: ResNet50 (random weights; its features are not meaningful, its
   speed is) at 128 px on a few hundred digit images.

Per epoch: median seconds of epochs 2..N. Total: from the start of data loading to the end
of the head's last epoch: Keras's dataset creation, model building and `fit`; tlkit's
decoding, feature extraction and head epochs, run with the library's own pieces as `fit`
runs them (`fit` then also evaluates and exports, which the Keras way does not).

Run: python -m benchmarks.frozen_stage  (about 10 minutes on 2 CPU cores)
"""

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tlkit  # noqa: E402
from benchmarks._common import machine, publish  # noqa: E402
from tlkit.augment import build_augmenter  # noqa: E402
from tlkit.backbones import get_backbone, unfreeze_groups  # noqa: E402
from tlkit.config import DataConfig  # noqa: E402
from tlkit.data import load_image_data  # noqa: E402
from tlkit.features import (FeatureCache, feature_dataset, head_model,  # noqa: E402
                            split_features)
from tlkit.layers import Preprocess  # noqa: E402
from tlkit.models import build_backbone, build_classifier  # noqa: E402
from tlkit.training import Trainer, set_trainable  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
EPOCHS = 10
BATCH = 32
SEED = 7


def copy_digits(target, digits, per_class=None):
    for digit in digits:
        files = sorted((DIGITS / digit).glob("*.png"))[:per_class]
        (target / digit).mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy(file, target / digit / file.name)
    return target


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.started)


def keras_guide(folder, backbone, size, weights, augment):
    """The Keras guide's recipe; returns (per-epoch seconds, total seconds, val accuracy)."""
    keras.utils.set_random_seed(SEED)
    started = time.perf_counter()
    common = dict(image_size=(size, size), batch_size=BATCH, validation_split=0.2, seed=SEED,
                  label_mode="int", interpolation="bilinear")
    train = keras.utils.image_dataset_from_directory(folder, subset="training", **common)
    val = keras.utils.image_dataset_from_directory(folder, subset="validation", **common)
    classes = len(train.class_names)
    train, val = train.prefetch(2), val.prefetch(2)
    base = build_backbone(backbone, size, weights)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = inputs
    if augment:  # the same Keras augmentation layers tlkit uses
        x = build_augmenter("standard", "horizontal", seed=SEED)(x)
    x = Preprocess(get_backbone(backbone).preprocessing)(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = EpochTimer()
    history = model.fit(train, validation_data=val, epochs=EPOCHS, verbose=0, callbacks=[timer])
    total = time.perf_counter() - started
    return statistics.median(timer.times[1:]), total, history.history["val_accuracy"][-1]


def tlkit_cached(folder, backbone, size, weights, views, work):
    """tlkit's head stage on cached features, as `tlkit.fit` runs it (decode once, features
    once, head epochs), without fit's evaluation and export; returns (per-epoch, total,
    val accuracy)."""
    keras.utils.set_random_seed(SEED)
    started = time.perf_counter()
    data = load_image_data(DataConfig(str(folder), image_size=size, batch_size=BATCH),
                           seed=SEED, verbose=0)
    model = build_classifier(backbone, data.num_classes, size, dropout=0.2, weights=weights)
    groups = unfreeze_groups(get_backbone(backbone), model.get_layer("backbone"))
    set_trainable(model, groups, "head")
    augmenter = build_augmenter("standard", "horizontal", seed=SEED) if views > 1 else None
    cache = FeatureCache(work / f"cache-{time.time_ns()}")
    settings = dict(backbone_name=backbone, image_size=size, resize="squash")
    train = split_features(model, data.splits["train"], data.splits["train"].digests, cache,
                           settings, augmenter, views, verbose=0, seed=SEED)
    val = split_features(model, data.splits["val"], data.splits["val"].digests, cache,
                         settings, verbose=0)
    result = Trainer(head_model(model), verbose=0).train_stage(
        feature_dataset(train, BATCH, shuffle=True, seed=SEED), feature_dataset(val, BATCH),
        epochs=EPOCHS, learning_rate=1e-3, patience=EPOCHS)
    total = time.perf_counter() - started
    data.close()
    epochs = [h["seconds"] for h in result.history]
    return statistics.median(epochs[1:]), total, result.history[-1]["val_accuracy"]


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-frozen-"))
    rows = []
    try:
        pre = tlkit.fit(copy_digits(work / "pre", "01234"), image_size=64, flip="none",
                        augment="light", seed=SEED, verbose=0, runs_dir=work / "runs",
                        export_dir=work / "exports", name="pre")
        weights = str(pre.run_dir / "backbone.weights.h5")
        cases = [
            ("scratch CNN (pretrained on 0-4), 64 px, digits 5-9", "scratch", 64, weights,
             copy_digits(work / "task", "56789")),
            ("ResNet50 (random weights), 128 px, 300 digits", "resnet50", 128, "none",
             copy_digits(work / "resnet", "0123456789", per_class=30)),
        ]
        for label, backbone, size, case_weights, folder in cases:
            tlkit_weights = case_weights if case_weights != "none" else _random_weights_file(
                backbone, size, work)
            for views in (1, 4):
                k_epoch, k_total, k_acc = keras_guide(folder, backbone, size, tlkit_weights,
                                                      augment=views > 1)
                t_epoch, t_total, t_acc = tlkit_cached(folder, backbone, size, tlkit_weights,
                                                       views, work)
                rows.append((label, views, k_epoch, t_epoch, k_total, t_total, k_acc, t_acc))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_report(rows)


def write_report(rows):
    """Prints the table and the goals, and writes them to benchmarks/RESULTS.md."""
    lines = ["## Frozen-stage training: cached features vs the Keras guide "
             "(benchmarks/frozen_stage.py)", "", f"Machine: {machine()}.", "",
             f"{EPOCHS} head epochs, batch {BATCH}; K = cached augmented views (tlkit) vs "
             "the same augmentation layers in the model (Keras). Per epoch: median of epochs "
             "2..N. Total: data loading to the end of the last head epoch (tlkit: decoding, "
             "feature extraction and epochs, as `fit` runs them).", "",
             "| case | K | Keras s/epoch | tlkit s/epoch | ratio | Keras total s | tlkit total s "
             "| ratio | Keras val acc | tlkit val acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, views, k_epoch, t_epoch, k_total, t_total, k_acc, t_acc in rows:
        lines.append(f"| {label} | {views} | {k_epoch:.2f} | {t_epoch:.3f} | "
                     f"{k_epoch / t_epoch:.1f}x | {k_total:.1f} | {t_total:.1f} | "
                     f"{k_total / t_total:.1f}x | {k_acc:.3f} | {t_acc:.3f} |")
    k1 = [r for r in rows if r[1] == 1]
    per_epoch_ok = all(r[2] / r[3] >= 10 for r in k1)
    total_ok = all(r[4] / r[5] >= 3 for r in k1)
    lines += ["", f"Goals at K=1: per epoch >= 10x: {'met' if per_epoch_ok else 'NOT met'}; "
                  f"total over {EPOCHS} epochs >= 3x: {'met' if total_ok else 'NOT met'}."]
    for label, views, *_, k_acc, t_acc in rows:
        if label.startswith("scratch"):  # real features: the accuracies mean something
            gap = t_acc - k_acc
            met = "met" if abs(gap) <= 0.02 else "NOT met"
            lines.append(f"- Accuracy at K={views}: Keras {k_acc:.3f}, tlkit {t_acc:.3f} "
                         f"({gap:+.3f}; within 2 points: {met}).")
    lines.append("- ResNet50's random features give chance accuracy both ways; they measure "
                 "speed only.")
    publish("frozen_stage", lines)


def _random_weights_file(backbone, size, work):
    path = work / f"{backbone}-random.weights.h5"
    if not path.exists():
        keras.utils.set_random_seed(SEED)
        build_backbone(backbone, size, "none").save_weights(path)
    return str(path)


if __name__ == "__main__":
    main()
