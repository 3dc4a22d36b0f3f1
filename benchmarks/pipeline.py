"""Input pipeline headroom: can tlkit's training pipeline feed its fastest model?

Producer: `make_dataset(train split, 32, shuffle=True, seed, augmenter=build_augmenter(
"standard", "horizontal", seed))`, the training input of `tlkit fit --augment standard`, over
a `load_image_data` split of a generated folder of photo-like PNG and JPEG files (smooth
gradients, blurred shapes, noise). Its batches are iterated and copied out with `.numpy()`,
with no model attached.

Consumer: the scratch CNN's training step (`Trainer._make_train_step`) driven by tlkit's own
epoch loop (`Trainer._run_epoch`, which syncs the loss and accuracy sums after every step)
over the same batches pre-materialised as constant tensors. Constant batches cost nothing to
produce, so this is the fastest the trainer can consume; timing `train_stage` on a
`.cache()`d dataset would add a validation pass per epoch and understate the consumer.

Both run alone on the machine; the goal is pipeline >= 2x consumer at 32 and 128 px.

Run: python -m benchmarks.pipeline  (about 1 minute on 2 CPU cores)
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
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402
from tlkit.augment import build_augmenter  # noqa: E402
from tlkit.config import DataConfig  # noqa: E402
from tlkit.data import load_image_data, make_dataset  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402
from tlkit.training import Trainer  # noqa: E402

SIZES = (32, 128)
CLASSES = ("ellipse", "rectangle", "triangle", "star")
PER_CLASS = 100
BATCH = 32
SEED = 42
GOAL = 2.0


def photo(shape, width, height, rng):
    """A photo-like RGB image: a smooth two-colour gradient, one blurred shape, noise."""
    low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1) / 2
    pixels = low + (high - low) * t[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    r = rng.uniform(0.15, 0.35) * min(width, height)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if shape == "ellipse":
        draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=colour)
    elif shape == "rectangle":
        draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=colour)
    else:
        points = 3 if shape == "triangle" else 10
        turn = rng.uniform(0, 2 * np.pi)
        radii = [r if i % 2 == 0 or shape == "triangle" else 0.45 * r for i in range(points)]
        draw.polygon([(cx + q * np.cos(turn + 2 * np.pi * i / points),
                       cy + q * np.sin(turn + 2 * np.pi * i / points))
                      for i, q in enumerate(radii)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_photo_folder(root, classes=CLASSES, per_class=PER_CLASS, fmt="mixed",
                       sizes=(160, 400), seed=0):
    """Writes `per_class` photo-like images per class to `root/<class>/`; returns the files.

    `fmt` is "jpg", "png" or "mixed" (alternating); widths and heights are drawn from
    `sizes` (inclusive range), so images have varied sizes and aspect ratios.
    """
    rng = np.random.default_rng(seed)
    files = []
    for name in classes:
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            width, height = rng.integers(sizes[0], sizes[1] + 1, 2)
            ext = fmt if fmt != "mixed" else ("jpg", "png")[index % 2]
            path = folder / f"{name}_{index:04d}.{ext}"
            photo(name, int(width), int(height), rng).save(
                path, **({"quality": 90} if ext == "jpg" else {}))
            files.append(path)
    return files


def images_per_second(run, images, min_seconds, repeats=3):
    """Median images/s of `run()` (which handles `images` images) over `repeats` timings,
    each repeating `run` until `min_seconds` have passed; `run` was warmed up by the caller."""
    rates = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        rates.append(calls * images / elapsed)
    return statistics.median(rates)


def measure(folder, size):
    """Producer and consumer images/s at one image size."""
    data = load_image_data(DataConfig(data_dir=str(folder), image_size=size, val_split=0.2),
                           seed=SEED, verbose=0)
    try:
        train = data.splits["train"]
        augmenter = build_augmenter("standard", "horizontal", seed=SEED)
        dataset = make_dataset(train, BATCH, shuffle=True, seed=SEED, augmenter=augmenter)

        def epoch_of_pipeline():
            for images, labels in dataset:
                images.numpy(), labels.numpy()

        epoch_of_pipeline()
        produced = images_per_second(epoch_of_pipeline, len(train), min_seconds=2.0)

        keras.utils.set_random_seed(SEED)
        trainer = Trainer(build_classifier("scratch", data.num_classes, size), verbose=0)
        optimizer = keras.optimizers.Adam(1e-3)
        variables = trainer.model.trainable_variables
        optimizer.build(variables)
        step = trainer._make_train_step(optimizer, variables, None)
        pixels, labels = train.images.astype(np.float32), train.labels
        # Full batches only (a short last batch would time a second trace, not the step);
        # at 128 px a few batches per timing keep the run short.
        count = len(train) // BATCH if size <= 64 else 3
        batches = [(tf.constant(pixels[i * BATCH:(i + 1) * BATCH]),
                    tf.constant(labels[i * BATCH:(i + 1) * BATCH])) for i in range(count)]

        def epoch_of_training():
            trainer._run_epoch(batches, step, len(batches), ("benchmark", 1))

        epoch_of_training()
        consumed = images_per_second(epoch_of_training, count * BATCH,
                                     min_seconds=2.0 if size <= 64 else 4.0)
        return {"size": size, "train_images": len(train), "produced": produced,
                "consumed": consumed, "ratio": produced / consumed}
    finally:
        data.close()


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-pipeline-"))
    load, started = os.getloadavg()[0], time.perf_counter()
    try:
        write_photo_folder(work / "photos")
        rows = [measure(work / "photos", size) for size in SIZES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    met = all(row["ratio"] >= GOAL for row in rows)
    lines = [
        "## Input pipeline headroom (benchmarks/pipeline.py)",
        "",
        f"Machine: {machine()}. Run time: {seconds:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        f"{len(CLASSES) * PER_CLASS} generated photo-like images (half PNG, half JPEG, "
        "160-400 px a side), decoded once by `load_image_data` (val_split 0.2). Pipeline: "
        f"`make_dataset(train, {BATCH}, shuffle=True, augmenter=build_augmenter(\"standard\", "
        "\"horizontal\"))` iterated with `.numpy()` and no model. Consumer: the scratch CNN's "
        "train step in tlkit's epoch loop (`Trainer._run_epoch`) on constant batches of "
        f"{BATCH}. Median of 3 timings after a warm-up; producer and consumer run one at a time.",
        "",
        "| image size | train images | pipeline images/s | scratch CNN train step images/s "
        "| pipeline / consumer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['size']} px | {row['train_images']} | {row['produced']:,.0f} | "
                     f"{row['consumed']:,.0f} | {row['ratio']:.2f}x |")
    lines += ["", f"Goal: pipeline >= {GOAL:g}x the consumer at every size: "
                  f"{'met' if met else 'NOT met'}."]
    return publish("pipeline", lines, met)


if __name__ == "__main__":
    sys.exit(main())
