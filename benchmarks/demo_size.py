"""The README's demo at the scratch CNN's image sizes: accuracy and the whole command's time.

The demo is `tlkit fit data/digits --flip none --test-split 0.1`: 1,797 real 8x8 handwritten
digits, a scratch CNN. This script runs exactly that command, as a newcomer would (one `tlkit`
process each, timed from process start to exit), with `--image-size` 16 and 32 added and
`--seed` 0, 1 and 2, and reads the run's validation and test accuracy from the export's
metadata. The choice between sizes is made on validation accuracy; test accuracy is
reported beside it. Goal for a smaller default: validation accuracy within 0.005 of 32 px
(mean over the seeds) and the demo's command at most half the time.

Run: python -m benchmarks.demo_size  (about 10-15 minutes on 2 CPU cores)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._common import machine, publish  # noqa: E402

DIGITS = Path(__file__).resolve().parent.parent / "data" / "digits"
DEMO = ["fit", str(DIGITS), "--flip", "none", "--test-split", "0.1", "-q"]
SIZES, SEEDS = (16, 32), (0, 1, 2)


def run_demo(size, seed, folder):
    """One `tlkit fit` process: returns (val accuracy, test accuracy, epochs, seconds)."""
    command = [shutil.which("tlkit") or "tlkit", *DEMO, "--image-size", str(size),
               "--seed", str(seed)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    export = Path(folder) / done.stdout.strip().splitlines()[-1]
    metadata = json.loads((export / "assets" / "tlkit.json").read_text())
    metrics = metadata["metrics"]
    return (metrics["val"]["accuracy"], metrics["test"]["accuracy"], metadata["epochs_trained"],
            seconds)


def spread(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main():
    rows, results = [], {}
    for seed in SEEDS:
        for size in SIZES:  # alternate the sizes so that load changes hit both alike
            with tempfile.TemporaryDirectory() as folder:
                val, test, epochs, seconds = run_demo(size, seed, folder)
            results.setdefault(size, []).append((val, test, seconds))
            rows.append(f"| {size} | {seed} | {val:.4f} | {test:.4f} | {epochs} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    small, large = SIZES
    val_gap = (statistics.mean(v for v, _, _ in results[small])
               - statistics.mean(v for v, _, _ in results[large]))
    ratio = (statistics.mean(s for _, _, s in results[small])
             / statistics.mean(s for _, _, s in results[large]))
    met = val_gap >= -0.005 and ratio <= 0.5
    lines = [
        "## The README demo at 16 and 32 px (benchmarks/demo_size.py)",
        "",
        f"Machine: {machine()}. `tlkit {' '.join(DEMO[:1])} data/digits {' '.join(DEMO[2:-1])}"
        " --image-size S --seed K`, one process per run, seconds from process start to exit "
        "(the whole command a newcomer waits for), the sizes alternating so that other work on "
        "the machine weighs on both alike. Accuracy from the export's metadata; validation "
        "picks, test is only reported.",
        "",
        "| image size | seed | val accuracy | test accuracy | epochs | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "| image size | val accuracy | test accuracy | seconds |",
        "| --- | --- | --- | --- |",
        *(f"| {size} | {spread([v for v, _, _ in results[size]])} | "
          f"{spread([t for _, t, _ in results[size]])} | "
          f"{statistics.mean(s for _, _, s in results[size]):.0f} |" for size in SIZES),
        "",
        f"{small} px vs {large} px: validation accuracy {val_gap:+.4f}, whole command "
        f"{ratio:.2f}x the time. Goal (within 0.005, at most 0.5x): "
        f"{'met' if met else 'NOT met'}.",
    ]
    return publish("demo_size", lines, met)


if __name__ == "__main__":
    sys.exit(main())
