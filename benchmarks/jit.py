"""Does XLA (`jit_compile=True`) speed up tlkit's train step on this machine?

Times epochs of tlkit's trainer on data/digits for the scratch CNN at 32 px, with the
train step compiled by XLA and without, and prints the ratio. tlkit's default (no XLA) is
set from this measurement.

Run: python -m benchmarks.jit  (about 3 minutes on 2 CPU cores)
"""

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from benchmarks._common import machine, write_section  # noqa: E402
from tlkit.config import DataConfig  # noqa: E402
from tlkit.data import load_image_data, make_dataset  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402
from tlkit.training import Trainer  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
EPOCHS = 4


def epoch_seconds(size, jit):
    data = load_image_data(DataConfig(str(DIGITS), image_size=size), seed=1, verbose=0)
    keras.utils.set_random_seed(1)
    model = build_classifier("scratch", data.num_classes, size)
    trainer = Trainer(model, verbose=0, jit_compile=jit)
    train = make_dataset(data.splits["train"], 32, shuffle=True, seed=1)
    val = make_dataset(data.splits["val"], 32)
    started = time.perf_counter()
    result = trainer.train_stage(train, val, epochs=EPOCHS, learning_rate=1e-3,
                                 patience=EPOCHS)
    total = time.perf_counter() - started
    data.close()
    return statistics.median(h["seconds"] for h in result.history[1:]), total


def main():
    rows = []
    for size in (32,):  # XLA at 64 px took minutes per epoch here
        plain = epoch_seconds(size, False)
        xla = epoch_seconds(size, True)
        rows.append((size, plain, xla))
        print(size, plain, xla, flush=True)
    lines = ["## XLA for the train step (benchmarks/jit.py)", "", f"Machine: {machine()}.", "",
             f"Scratch CNN on data/digits, {EPOCHS} epochs; per epoch: median of epochs 2..N; "
             "total includes tracing/compilation.", "",
             "| image size | s/epoch without XLA | s/epoch with XLA | speed-up | total without | "
             "total with |", "| --- | --- | --- | --- | --- | --- |"]
    for size, plain, xla in rows:
        lines.append(f"| {size} | {plain[0]:.2f} | {xla[0]:.2f} | {plain[0] / xla[0]:.2f}x | "
                     f"{plain[1]:.1f} | {xla[1]:.1f} |")
    report = "\n".join(lines)
    print(report)
    write_section("jit", report)


if __name__ == "__main__":
    main()
