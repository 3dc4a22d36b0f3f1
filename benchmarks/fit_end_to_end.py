"""What a user waits for: the whole `tlkit fit` command against the Keras guide's way.

Both sides are whole processes, timed from start to exit, on the same folder, backbone
weights, image size and 10 head epochs on a frozen ResNet50, and both end with a
SavedModel:

- tlkit: `tlkit fit DIR --backbone resnet50 --weights FILE --image-size S --epochs 10
  --unfreeze 0 --augment none --flip none --patience 10` (a fresh feature cache, so the
  features are computed), which also evaluates, writes the run folder and exports a verified
  SavedModel with four signatures.
- Keras: the transfer-learning guide's recipe (`image_dataset_from_directory`, a frozen
  `keras.applications.ResNet50` inside the model, 10 epochs of `fit`), then
  `model.export`.

Workloads (`python -m benchmarks.fit_end_to_end [small] [features] [photos]`, all three by
default):

- small: 500 small JPEGs (64x64, 10 classes, from the digits) at 96 px (~5 min);
- features: 2,000 such JPEGs at 160 px, where feature extraction dominates (~25 min);
- photos: 100 JPEGs of 4000x3000 pixels (photo-like, 10 classes) at 224 px (~10 min).

The backbone weights are random (a `build_backbone(...).save_weights()` file): the times do
not depend on their values. The per-step breakdown is tlkit's own (`result.json`'s
`seconds`; "start" is the process's time before `fit` began: imports and CLI start) and, for
Keras, timers in its script.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import machine, publish

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
EPOCHS = 10
SEED = 7
WORKLOADS = {  # name: (images per class, side of the JPEGs, model input size, label)
    "small": (50, 64, 96, "500 JPEGs of 64x64 px at 96 px"),
    "features": (200, 64, 160, "2,000 JPEGs of 64x64 px at 160 px"),
    "photos": (10, (4000, 3000), 224, "100 JPEGs of 4000x3000 px at 224 px"),
}
GOALS = {"small": 3.0, "features": 5.0}

KERAS_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import keras
imported = time.perf_counter()
folder, size, weights, export = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
keras.utils.set_random_seed(7)
common = dict(image_size=(size, size), batch_size=32, validation_split=0.2, seed=7,
              label_mode="int", interpolation="bilinear")
train = keras.utils.image_dataset_from_directory(folder, subset="training", **common)
val = keras.utils.image_dataset_from_directory(folder, subset="validation", **common)
classes = len(train.class_names)
train, val = train.prefetch(2), val.prefetch(2)
base = keras.applications.ResNet50(include_top=False, weights=None,
                                   input_shape=(size, size, 3))
base.load_weights(weights)
base.trainable = False
inputs = keras.Input((size, size, 3))
x = keras.applications.resnet50.preprocess_input(inputs)
x = base(x, training=False)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dropout(0.2)(x)
outputs = keras.layers.Dense(classes, activation="softmax")(x)
model = keras.Model(inputs, outputs)
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
              metrics=["accuracy"])
built = time.perf_counter()
history = model.fit(train, validation_data=val, epochs=10, verbose=0)
trained = time.perf_counter()
model.export(export, verbose=False)
exported = time.perf_counter()
print(json.dumps({"start": imported - started, "data + build": built - imported,
                  "epochs": trained - built, "export": exported - trained,
                  "val_accuracy": history.history["val_accuracy"][-1]}))
"""


def make_jpegs(folder, per_class, side):
    """JPEGs of the digits 0-9 (`per_class` each), upscaled to `side` (int or (w, h)) with a
    little noise so that neighbouring files differ."""
    rng = np.random.default_rng(SEED)
    width, height = (side, side) if isinstance(side, int) else side
    for digit in "0123456789":
        sources = sorted((DIGITS / digit).glob("*.png"))
        (folder / digit).mkdir(parents=True)
        for index in range(per_class):
            small = Image.open(sources[index % len(sources)]).convert("RGB")
            pixels = np.asarray(small.resize((width, height), Image.BILINEAR), np.int16)
            pixels = pixels + rng.normal(0, 8, pixels.shape).astype(np.int16)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                folder / digit / f"{digit}_{index:04d}.jpg", quality=90)
    return folder


def weights_file(size, work):
    """Random ResNet50 backbone weights, saved as a tlkit run would save them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from tlkit.models import build_backbone

    keras.utils.set_random_seed(SEED)
    path = work / f"resnet50-{size}.weights.h5"
    build_backbone("resnet50", size, "none").save_weights(path)
    return path


def user_environment():
    """The environment of a user's shell: no TensorFlow log settings from this process."""
    return {k: v for k, v in os.environ.items()
            if k not in ("TF_CPP_MIN_LOG_LEVEL", "TLKIT_TF_LOGS")}


def run_tlkit(folder, size, weights, work):
    """`tlkit fit` as a user runs it; returns (process seconds, steps, val accuracy)."""
    command = shutil.which("tlkit")
    command = [command] if command else [sys.executable, "-c",
                                         "from tlkit.cli import main; main()"]
    runs = work / f"runs-{time.time_ns()}"
    started = time.perf_counter()
    done = subprocess.run([*command, "fit", str(folder), "--backbone", "resnet50",
                           "--weights", str(weights), "--image-size", str(size),
                           "--epochs", str(EPOCHS), "--unfreeze", "0", "--augment", "none",
                           "--flip", "none", "--patience", str(EPOCHS), "--seed", str(SEED),
                           "--export-dir", str(work / "exports"), "--runs-dir", str(runs),
                           "--cache-dir", str(work / f"cache-{time.time_ns()}")],
                          capture_output=True, text=True, env=user_environment())
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"tlkit fit failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(runs.glob("*/*/result.json")).read_text())
    steps = dict(result["seconds"])
    steps = {"start": seconds - steps.pop("total"), **steps}
    return seconds, steps, result["metrics"]["val"]["accuracy"], done.stderr


def run_keras(folder, size, weights, work):
    """The Keras guide's way, ending in `model.export`; returns (process seconds, steps,
    val accuracy)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(folder), str(size),
                           str(weights), str(work / f"keras-export-{time.time_ns()}")],
                          capture_output=True, text=True, env=user_environment())
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"The Keras guide's script failed:\n{done.stderr[-3000:]}")
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    accuracy = steps.pop("val_accuracy")
    return seconds, steps, accuracy


def main(names):
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"Unknown workload(s) {unknown}; choose from {list(WORKLOADS)}.")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="tlkit-e2e-"))
    try:
        for name in names or list(WORKLOADS):
            per_class, side, size, label = WORKLOADS[name]
            folder = make_jpegs(work / name, per_class, side)
            weights = weights_file(size, work)
            keras_run = run_keras(folder, size, weights, work)
            tlkit_run = run_tlkit(folder, size, weights, work)
            rows.append((name, label, keras_run, tlkit_run))
            print(name, keras_run[:3], tlkit_run[:3], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(rows)


def report(rows):
    """The table, the breakdowns and the goals, printed and written to RESULTS.md."""
    lines = ["## The whole `tlkit fit` vs the Keras guide ending in a SavedModel "
             "(benchmarks/fit_end_to_end.py)", "", f"Machine: {machine()}.", "",
             f"Frozen ResNet50 (random weights from one file for both), {EPOCHS} head "
             "epochs, batch 32, validation 20%; each side a whole process, start to exit, "
             "ending with a SavedModel (tlkit: evaluated, run folder, verified export with "
             "four signatures; Keras: `model.export`). One run each, in the same script.",
             "", "| workload | Keras guide s | tlkit fit s | ratio | Keras val acc | tlkit "
             "val acc |", "| --- | --- | --- | --- | --- | --- |"]
    met = True
    for name, label, (k_s, _, k_acc), (t_s, _, t_acc, _) in rows:
        lines.append(f"| {label} | {k_s:.1f} | {t_s:.1f} | {k_s / t_s:.2f}x | {k_acc:.3f} | "
                     f"{t_acc:.3f} |")
    lines += ["", "Where the time went (s):", ""]
    for name, label, (k_s, k_steps, _), (t_s, t_steps, _, _) in rows:
        lines.append(f"- {label}: tlkit " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                      t_steps.items())
                     + "; Keras " + ", ".join(f"{k} {v:.1f}" for k, v in k_steps.items())
                     + f", exit {k_s - sum(k_steps.values()):.1f}.")
    lines.append("")
    for name, label, (k_s, *_), (t_s, *_) in rows:
        if name in GOALS:
            ok = k_s / t_s >= GOALS[name]
            met = met and ok
            lines.append(f"Goal {label}: >= {GOALS[name]:g}x: {'met' if ok else 'NOT met'} "
                         f"({k_s / t_s:.2f}x).")
    lines.append("- The random features give chance accuracy both ways; they measure speed "
                 "only.")
    return publish("fit_end_to_end", lines, met)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
