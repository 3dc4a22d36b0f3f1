"""Batch prediction of a folder: `tlkit.load(export).predict(files)` against plain TensorFlow.

The plain script is what a TensorFlow user writes for a tlkit export: read each file with
`tf.io.read_file`, stack 64 of them into a batch of bytes and call the SavedModel's
`serving_default` signature, which decodes, resizes and classifies inside the graph. tlkit
decodes with Pillow in threads, resizes with the same function and calls `predict_images`.

Two models, exported by `tlkit.export.export_classifier` with random weights (offline):
ResNet50 at 224 px on 64 JPEGs, and the scratch CNN at 32 px on 500 JPEGs. Both sides load
the export once and are warmed up; each timing is the whole folder, median of 3,
alternating the two sides. Goal: tlkit >= 0.9x the plain script's images/s, and both give
the same top-1 class on >= 99% of the files.

Run: python -m benchmarks.predict_folder  (about 1.5 minutes on 2 CPU cores)
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkit  # noqa: E402
from benchmarks._common import machine, publish  # noqa: E402
from benchmarks.pipeline import CLASSES, write_photo_folder  # noqa: E402
from tlkit.export import export_classifier  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402

CASES = (  # (backbone, image size, JPEG files)
    ("resnet50", 224, 64),
    ("scratch", 32, 500),
)
BATCH = 64
REPEATS = 3
SPEED_GOAL, AGREEMENT_GOAL = 0.9, 0.99


def plain_tf(export_path):
    """The plain TensorFlow way: bytes in batches to `serving_default`; returns a function
    from a list of files to their probabilities."""
    serve = tf.saved_model.load(str(export_path)).signatures["serving_default"]

    def predict(files):
        out = []
        for start in range(0, len(files), BATCH):
            data = tf.stack([tf.io.read_file(str(f)) for f in files[start:start + BATCH]])
            out.append(serve(image_bytes=data)["probabilities"].numpy())
        return np.concatenate(out)

    return predict


def with_tlkit(export_path):
    """`tlkit.load(path).predict(files)`; returns a function from files to `Prediction`s."""
    classifier = tlkit.load(export_path)
    return lambda files: classifier.predict(files, batch_size=BATCH)


def measure(work, backbone, size, count):
    """Images/s of both sides and their top-1 agreement for one model."""
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone, len(CLASSES), size, weights="none")
    export = export_classifier(model, CLASSES, work / "exports", backbone, image_size=size,
                               resize="squash")
    del model
    per_class = -(-count // len(CLASSES))
    files = write_photo_folder(work / backbone, per_class=per_class, fmt="jpg",
                               seed=size)[:count]
    sides = {"tlkit": with_tlkit(export), "plain": plain_tf(export)}
    outputs = {name: run(files) for name, run in sides.items()}  # warm-up, and the answers
    seconds = {name: [] for name in sides}
    for _ in range(REPEATS):
        for name, run in sides.items():
            started = time.perf_counter()
            run(files)
            seconds[name].append(time.perf_counter() - started)
    rate = {name: len(files) / statistics.median(s) for name, s in seconds.items()}
    plain_top1 = [CLASSES[i] for i in outputs["plain"].argmax(axis=1)]
    tlkit_top1 = [p.label for p in outputs["tlkit"]]
    agree = np.mean([a == b for a, b in zip(tlkit_top1, plain_top1)])
    plain_best = outputs["plain"].max(axis=1)
    gap = max(abs(p.probabilities[0] - q) for p, q in zip(outputs["tlkit"], plain_best))
    return {"backbone": backbone, "size": size, "files": len(files), "tlkit": rate["tlkit"],
            "plain": rate["plain"], "ratio": rate["tlkit"] / rate["plain"],
            "agreement": agree, "gap": gap,
            "seconds": {n: statistics.median(s) for n, s in seconds.items()}}


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-predict-"))
    load, started = os.getloadavg()[0], time.perf_counter()
    try:
        rows = [measure(work, *case) for case in CASES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_time = time.perf_counter() - started
    speed_met = all(r["ratio"] >= SPEED_GOAL for r in rows)
    agree_met = all(r["agreement"] >= AGREEMENT_GOAL for r in rows)
    lines = [
        "## Batch prediction of a folder (benchmarks/predict_folder.py)",
        "",
        f"Machine: {machine()}. Run time: {run_time:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        "Generated photo-like JPEGs (160-400 px a side), models with random weights exported "
        f"by `export_classifier`. tlkit: `tlkit.load(export).predict(files, batch_size={BATCH})`"
        " (files read in threads, JPEG/PNG bytes batched to `serving_default`, Pillow for "
        "other formats). Plain TF: `tf.io.read_file` per file, "
        f"batches of {BATCH} encoded images to `serving_default` (decode in the graph). Whole "
        f"folder per timing, export loaded once, warmed up, median of {REPEATS}.",
        "",
        "| model | files | tlkit s | plain TF s | tlkit images/s | plain TF images/s | "
        "tlkit / plain | same top-1 | max top-1 probability gap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} {r['size']} px | {r['files']} | {r['seconds']['tlkit']:.2f} | "
            f"{r['seconds']['plain']:.2f} | {r['tlkit']:,.1f} | {r['plain']:,.1f} | "
            f"{r['ratio']:.2f}x | {r['agreement']:.1%} | {r['gap']:.1e} |")
    lines += ["", f"Goal: tlkit >= {SPEED_GOAL:g}x the plain script's images/s: "
                  f"{'met' if speed_met else 'NOT met'}. Same top-1 on >= "
                  f"{AGREEMENT_GOAL:.0%} of files: {'met' if agree_met else 'NOT met'}."]
    return publish("predict_folder", lines, speed_met and agree_met)


if __name__ == "__main__":
    sys.exit(main())
