"""Runs the speed benchmarks, one process each, and prints how long each took.

    python -m benchmarks                    # the eight speed benchmarks (~18 min, 2 cores)
    python -m benchmarks transfer_digits    # or any of them by name (this one ~7-10 min)
    python -m benchmarks transfer_real      # ImageNet MobileNet on Fashion-MNIST (hours)
    python -m benchmarks audit_noise        # tlkit audit on flipped Fashion-MNIST labels

Each script prints its ratios with the raw numbers and rewrites its section of
benchmarks/RESULTS.md.
"""

import subprocess
import sys
import time

SPEED = ("frozen_stage", "pipeline", "predict_folder", "cold_start", "scratch_vs_keras", "jit",
         "serve", "distribute")
BENCHMARKS = (*SPEED, "demo_size", "fit_end_to_end", "transfer_digits", "transfer_real",
              "audit_noise")


def main(names):
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"Unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}.")
    timings = []
    for name in names or SPEED:
        print(f"=== {name}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"])
        timings.append((name, time.perf_counter() - started, done.returncode))
    for name, seconds, code in timings:
        note = f"  exit {code} (an error, or a goal the script checks was missed)" if code else ""
        print(f"{name:<18} {seconds / 60:5.1f} min{note}")
    return 1 if any(code for _, _, code in timings) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
