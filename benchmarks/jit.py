"""Do XLA (`jit_compile=True`) or several steps per graph call speed up tlkit's trainer?

Times epochs of tlkit's trainer on data/digits for the scratch CNN at 32 px: plain, with
the train step compiled by XLA, and with 8 train steps per call into the graph
(`steps_per_execution`), and prints the ratios. tlkit's defaults (neither) are set from
this measurement.

Run: python -m benchmarks.jit  (about 3 minutes on 2 CPU cores)
"""

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402
from tlkit.config import DataConfig  # noqa: E402
from tlkit.data import load_image_data, make_dataset  # noqa: E402
from tlkit.models import build_classifier, copy_classifier  # noqa: E402
from tlkit.training import Trainer  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
EPOCHS = 4


def epoch_seconds(size, jit, steps_per_execution=1, policy="float32"):
    """Median epoch seconds (epochs 2..N) and total seconds of the scratch CNN on digits,
    computing in the dtype `policy`."""
    data = load_image_data(DataConfig(str(DIGITS), image_size=size), seed=1, verbose=0)
    keras.utils.set_random_seed(1)
    model = copy_classifier(build_classifier("scratch", data.num_classes, size), policy)
    trainer = Trainer(model, verbose=0, jit_compile=jit,
                      steps_per_execution=steps_per_execution)
    train = make_dataset(data.splits["train"], 32, shuffle=True, seed=1)
    val = make_dataset(data.splits["val"], 32)
    started = time.perf_counter()
    result = trainer.train_stage(train, val, epochs=EPOCHS, learning_rate=1e-3,
                                 patience=EPOCHS)
    total = time.perf_counter() - started
    data.close()
    return statistics.median(h["seconds"] for h in result.history[1:]), total


CONFIGS = (("plain", False, 1), ("XLA", True, 1), ("8 steps per call", False, 8))


def main():
    size = 32  # XLA at 64 px took minutes per epoch here
    rows = [(name, *epoch_seconds(size, jit, spe)) for name, jit, spe in CONFIGS]
    for row in rows:
        print(row, flush=True)
    plain = rows[0][1]
    lines = ["## Train-step options (benchmarks/jit.py)", "", f"Machine: {machine()}.", "",
             f"Scratch CNN on data/digits at {size} px, {EPOCHS} epochs; per epoch: median of "
             "epochs 2..N; total includes tracing/compilation.", "",
             "| option | s/epoch | speed vs plain | total s |", "| --- | --- | --- | --- |"]
    for name, epoch, total in rows:
        lines.append(f"| {name} | {epoch:.2f} | {plain / epoch:.2f}x | {total:.1f} |")
    publish("jit", lines)


if __name__ == "__main__":
    main()
