"""Does training scale from 1 to 2 workers, and what does mixed precision do on this CPU?

1. `tlkit.fit` on data/digits (scratch CNN at 32 px, global batch 64, Adam 1e-3, the demo's
   augmentation, 8 epochs without early stopping), run as
   - 1 worker without a strategy, pinned to one core (`taskset`, one TensorFlow thread);
   - 2 workers of `MultiWorkerMirroredStrategy` on loopback ports (TF_CONFIG), each pinned
     to its own core: every step splits the global batch in two and all-reduces the
     gradients over gRPC;
   - 1 worker on every core, for reference.
   Throughput: training images / median epoch seconds of epochs 2..8 (an epoch's time
   includes its validation pass), from the chief's history. Each worker runs the whole
   input pipeline (decoding, augmentation) and keeps its half of every batch. All epoch
   times are printed: on this machine they jump between two levels (see RESULTS.md).
2. Per-epoch time of the trainer in float32 and in mixed bfloat16 (benchmarks/jit.py's
   timing, scratch CNN at 32 px, batch 32).

Run: python -m benchmarks.distribute  (about 4 minutes on 2 CPU cores)
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks._common import loopback_cluster, machine, publish  # noqa: E402
from benchmarks.jit import DIGITS, epoch_seconds  # noqa: E402

SIZE, BATCH, EPOCHS = 32, 64, 8
FIT = dict(data_dir=str(DIGITS), image_size=SIZE, batch_size=BATCH, epochs=EPOCHS,
           patience=EPOCHS, flip="none", seed=42, verbose=0, feature_cache=False)
WORKER = """
import json, sys
import tlkit
result = tlkit.fit(**json.loads(sys.argv[1]))
if result.export_path is not None:
    print("HISTORY " + json.dumps(result.history))
"""
ONE_CORE = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def run(workers, cores, folder):
    """Starts `workers` processes of one run (pinned to `cores[i]` if given) and returns
    the chief's history and the run's wall seconds."""
    tf_configs = loopback_cluster(workers)
    options = {**FIT, "runs_dir": str(folder / "runs"), "export_dir": str(folder / "exports"),
               "name": f"w{workers}-{'pinned' if cores else 'all'}",
               "distribute": "multi-worker" if workers > 1 else "none"}
    processes, started = [], time.perf_counter()
    for index in range(workers):
        env = dict(os.environ, **(ONE_CORE if cores else {}))
        if workers > 1:
            env["TF_CONFIG"] = tf_configs[index]
        pin = ["taskset", "-c", str(cores[index])] if cores else []
        processes.append(subprocess.Popen(
            [*pin, sys.executable, "-c", WORKER, json.dumps(options)], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    if any(p.returncode for p in processes):
        sys.exit(f"a worker failed: {[p.returncode for p in processes]}")
    line = next(l for l in outputs[0].splitlines() if l.startswith("HISTORY "))
    return json.loads(line.removeprefix("HISTORY ")), time.perf_counter() - started


def main():
    started = time.perf_counter()
    cases = (("1 worker, 1 core", 1, [0]), ("2 workers on loopback, 1 core each", 2, [0, 1]),
             ("1 worker, 2 cores (reference)", 1, None))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, workers, cores in cases:
            history, wall = run(workers, cores, Path(folder))
            epochs = [h["seconds"] for h in history[1:]]
            rows.append((name, statistics.median(epochs), epochs, wall,
                         history[-1]["val_accuracy"]))
            print(rows[-1], flush=True)
    from tlkit.config import DataConfig
    from tlkit.data import load_image_data

    data = load_image_data(DataConfig(str(DIGITS), image_size=SIZE), seed=42, verbose=0)
    images = len(data.splits["train"])
    data.close()
    precision = [(policy, *epoch_seconds(SIZE, False, 8, policy))
                 for policy in ("float32", "mixed_bfloat16")]
    print(precision, flush=True)

    base = images / rows[0][1]
    lines = [
        "## Scaling out: 1 vs 2 workers, mixed precision (benchmarks/distribute.py)", "",
        f"Machine: {machine()}. Run time: {(time.perf_counter() - started) / 60:.1f} min.", "",
        f"`tlkit.fit` on data/digits, scratch CNN at {SIZE} px, global batch {BATCH}, "
        f"{EPOCHS} epochs; {images} training images per epoch; epoch time: median of epochs "
        "2..N, training and validation. The 2 workers are processes of one "
        "MultiWorkerMirroredStrategy cluster (TF_CONFIG, gRPC on 127.0.0.1); the 1-core "
        "setups are pinned with `taskset` and run one TensorFlow thread.", "",
        "| setup | s/epoch (median) | images/s | vs 1 worker, 1 core | each epoch s | wall s "
        "(start to export) | last val accuracy |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, seconds, epochs, wall, accuracy in rows:
        lines.append(f"| {name} | {seconds:.2f} | {images / seconds:.0f} | "
                     f"{images / seconds / base:.2f}x | {', '.join(f'{e:.1f}' for e in epochs)} "
                     f"| {wall:.0f} | {accuracy:.4f} |")
    fastest = min(rows[1][2])
    lines += ["", f"2 workers vs 1 worker on 1 core: {rows[0][1] / rows[1][1]:.2f}x at the "
              f"median epoch, {rows[0][1] / fastest:.2f}x at the fastest 2-worker epoch "
              f"({fastest:.1f} s)."]
    lines += ["", f"Mixed precision on this CPU (trainer only, scratch CNN at {SIZE} px, batch "
              "32, 8 steps per call; per epoch: median of epochs 2..N):", "",
              "| policy | s/epoch | speed vs float32 | total s |", "| --- | --- | --- | --- |"]
    for policy, epoch, total in precision:
        lines.append(f"| {policy} | {epoch:.2f} | {precision[0][1] / epoch:.2f}x | "
                     f"{total:.1f} |")
    publish("distribute", lines)


if __name__ == "__main__":
    main()
