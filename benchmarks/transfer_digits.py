"""Does transfer learning help? Measured on real digits, offline, in a few minutes.

1. Pretrain tlkit's scratch CNN on digits 0-4 of data/digits and keep the run's
   `backbone.weights.h5`.
2. Few-shot task: digits 5-9 with 20 training and 10 validation images per class, sampled per
   seed from a pool; a fixed held-out set of 5-9 digits (never sampled) measures accuracy.
3. For each seed, train the same network two ways:
   - transfer: `--weights backbone.weights.h5`, staged: the head, then every layer at a
     lower learning rate (`TRANSFER_STAGES`; unfreezing only the top groups at 10x lower
     rates did worse here: 0.88 mean held-out accuracy);
   - baseline: `--weights none`, every layer trainable from the start, with a longer budget,
     the best honest from-scratch recipe tlkit has.
4. Print mean and standard deviation of held-out accuracy for both and the gain, and record
   them in benchmarks/RESULTS.md.

Run: python -m benchmarks.transfer_digits  (about 3 minutes on 2 CPU cores)
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

import tlkit  # noqa: E402
from benchmarks._common import machine, write_section  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
SEEDS = (0, 1, 2)
SHOTS, VAL_SHOTS, HELD_OUT = 20, 10, 100
PRETRAIN_CLASSES, TASK_CLASSES = "01234", "56789"
COMMON = dict(image_size=32, flip="none", augment="light", verbose=0)
TRANSFER_STAGES = "head:60@1e-3,all:80@3e-4"


def copy_files(files, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy(file, folder / file.name)


def accuracy(export_path, files, labels):
    predictions = tlkit.load(export_path).predict(files, top_k=1)
    return float(np.mean([p.label == label for p, label in zip(predictions, labels)]))


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-transfer-"))
    out = dict(runs_dir=work / "runs", export_dir=work / "saved_models")
    started = time.perf_counter()
    try:
        for digit in PRETRAIN_CLASSES:
            copy_files(sorted((DIGITS / digit).glob("*.png")), work / "pretrain" / digit)
        pretrained = tlkit.fit(work / "pretrain", name="pretrain", **COMMON, **out)
        weights = pretrained.run_dir / "backbone.weights.h5"
        print(f"pretrained on digits 0-4: val accuracy "
              f"{pretrained.metrics['val']['accuracy']:.3f} -> {weights}")

        rng = np.random.default_rng(1234)
        pools, held_files, held_labels = {}, [], []
        for digit in TASK_CLASSES:
            files = sorted((DIGITS / digit).glob("*.png"))
            order = rng.permutation(len(files))
            held_files += [files[i] for i in order[:HELD_OUT]]
            held_labels += [digit] * HELD_OUT
            pools[digit] = [files[i] for i in order[HELD_OUT:]]

        results = {"transfer": [], "baseline": []}
        for seed in SEEDS:
            task = work / f"task-{seed}"
            pick = np.random.default_rng(seed)
            for digit, pool in pools.items():
                chosen = [pool[i] for i in pick.permutation(len(pool))[:SHOTS + VAL_SHOTS]]
                copy_files(chosen[:SHOTS], task / "train" / digit)
                copy_files(chosen[SHOTS:], task / "val" / digit)
            data = dict(val_dir=task / "val", seed=seed, name=f"task-{seed}")
            transfer = tlkit.fit(task / "train", weights=str(weights), stages=TRANSFER_STAGES,
                                 patience=15, **data, **COMMON, **out)
            baseline = tlkit.fit(task / "train", weights="none", epochs=150, patience=20,
                                 **data, **COMMON, **out)
            for key, run in (("transfer", transfer), ("baseline", baseline)):
                results[key].append(accuracy(run.export_path, held_files, held_labels))
            print(f"seed {seed}: transfer {results['transfer'][-1]:.3f}, "
                  f"baseline {results['baseline'][-1]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mean = {k: statistics.mean(v) for k, v in results.items()}
    spread = {k: statistics.stdev(v) for k, v in results.items()}
    gain = mean["transfer"] - mean["baseline"]
    paired = [t - b for t, b in zip(results["transfer"], results["baseline"])]
    beyond = gain > spread["transfer"] + spread["baseline"]
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "## Transfer learning on digits (benchmarks/transfer_digits.py)",
        "",
        f"Machine: {machine()}. Run time: {minutes:.1f} min.",
        "",
        "Scratch CNN at 32 px pretrained on every image of digits 0-4, then "
        f"digits 5-9 with {SHOTS} training + {VAL_SHOTS} validation images per class; accuracy "
        f"on the same {HELD_OUT * len(TASK_CLASSES)} held-out 5-9 digits, {len(SEEDS)} seeds.",
        "",
        "| | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean | std |",
        "| --- | " + " | ".join("---" for _ in SEEDS) + " | --- | --- |",
    ]
    for key, label in (("transfer", f"transfer (weights file, stages {TRANSFER_STAGES})"),
                       ("baseline", "baseline (weights none, all layers, longer budget)")):
        cells = " | ".join(f"{v:.3f}" for v in results[key])
        lines.append(f"| {label} | {cells} | {mean[key]:.3f} | {spread[key]:.3f} |")
    lines += ["", f"Gain: {gain:+.3f} ({'beyond' if beyond else 'NOT beyond'} the summed "
                  f"spread {spread['transfer'] + spread['baseline']:.3f}); per seed "
                  + ", ".join(f"{d:+.3f}" for d in paired) + "."]
    report = "\n".join(lines)
    print(report)
    write_section("transfer_digits", report)
    return 0 if beyond else 1


if __name__ == "__main__":
    sys.exit(main())
