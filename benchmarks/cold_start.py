"""Cold start of `tlkit predict photo.jpg`: where do the seconds go?

Every measurement runs in a fresh Python process, as a user's command does:

- breakdown: the command's work, step by step in one process, with wall-clock stamps:
  `import tlkit.cli` (click; the command imports it first), `import tensorflow`, `import
  tlkit.predict` on top, `tlkit.load(export)` (the SavedModel load), decoding one JPEG
  (`tlkit.images.load_image`: Pillow, then the first call of the traced resize), the forward
  pass (`Classifier.predict_arrays`, the first call of `predict_images`), then
  `Classifier.predict([photo])` and printing its line (a call of up to one batch of files
  decodes with Pillow and calls `predict_images`, both warm by then; a larger one sends the
  bytes through `serving_default`, whose first call, TensorFlow optimising its decoding
  graph, costs about 0.5 s). The process's wall time less the interpreter start
  and these stages is process exit (it skips Python's final garbage collection, as the
  command does);
- end to end: the wall time of the real `tlkit predict photo.jpg --model EXPORT` command;
- plain TensorFlow: the wall time of a script that imports TensorFlow, loads the same export
  and calls `serving_default` on the file's bytes, for reference;
- and `python -c pass`, the interpreter's own start.

The export is the scratch CNN at 32 px (the README's digits model; random weights, offline).
One warm-up round (file cache), then the median of 3 rounds.
Goal: the cold start is dominated by importing TensorFlow, not by tlkit.

Run: python -m benchmarks.cold_start  (about 1 minute on 2 CPU cores)
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
from benchmarks.pipeline import CLASSES, write_photo_folder  # noqa: E402

ROUNDS = 3
SIZE = 32

BREAKDOWN = """
import json, sys, time
export, photo = sys.argv[1:]
stamps = [time.perf_counter()]
import tlkit.cli
from tlkit.runtime import exit_without_final_collection
exit_without_final_collection()  # as the command does
stamps.append(time.perf_counter())
import tensorflow
stamps.append(time.perf_counter())
import tlkit.predict
stamps.append(time.perf_counter())
classifier = tlkit.predict.load(export)
stamps.append(time.perf_counter())
from tlkit.images import load_image
image = load_image(photo, classifier.image_size, classifier.resize)
stamps.append(time.perf_counter())
classifier.predict_arrays(image[None])
stamps.append(time.perf_counter())
prediction = classifier.predict([photo], top_k=3)[0]
print(prediction.source, prediction.labels, prediction.probabilities)
stamps.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))
"""

PLAIN_TF = """
import sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](image_bytes=tf.stack([tf.io.read_file(sys.argv[2])]))
print(out["class_names"].numpy()[0].decode())
"""

STAGES = ("import tlkit.cli (click)", "import tensorflow", "import tlkit.predict (on top)",
          "tlkit.load(export)", "decode one JPEG (load_image)",
          "forward pass (predict_arrays)", "Classifier.predict([photo]) and printing")
TLKIT_STAGES = ("import tlkit.cli (click)", "import tlkit.predict (on top)",
                "decode one JPEG (load_image)", "Classifier.predict([photo]) and printing")


def wall(command):
    """Wall seconds of a subprocess (which must succeed) and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stdout


def tlkit_command():
    """The installed `tlkit` console script of this interpreter (not a shim)."""
    script = Path(sys.executable).with_name("tlkit")
    return [str(script)] if script.exists() else [shutil.which("tlkit")]


def make_export(work):
    """A scratch-CNN export at 32 px with random weights, and one photo-like JPEG."""
    import keras

    from tlkit.export import export_classifier
    from tlkit.models import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("scratch", len(CLASSES), SIZE)
    export = export_classifier(model, CLASSES, work / "exports", "photos", image_size=SIZE,
                               resize="squash")
    photo = write_photo_folder(work / "photos", per_class=1, fmt="jpg")[0]
    return export, photo


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-cold-"))
    load, started = os.getloadavg()[0], time.perf_counter()
    try:
        export, photo = make_export(work)
        args = [str(export), str(photo)]
        commands = {
            "breakdown": [sys.executable, "-c", BREAKDOWN, *args],
            "end_to_end": [*tlkit_command(), "predict", str(photo), "--model", str(export)],
            "plain_tf": [sys.executable, "-c", PLAIN_TF, *args],
            "python": [sys.executable, "-c", "pass"],
        }
        wall(commands["breakdown"])  # warm-up: file cache
        walls = {name: [] for name in commands}
        stages = []
        for _ in range(ROUNDS):
            for name, command in commands.items():
                seconds, out = wall(command)
                walls[name].append(seconds)
                if name == "breakdown":
                    stages.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_time = time.perf_counter() - started

    median = {name: statistics.median(values) for name, values in walls.items()}
    parts = dict(zip(STAGES, (statistics.median(s[i] for s in stages)
                              for i in range(len(STAGES)))))
    total = median["breakdown"]
    # per round: the breakdown's wall less the interpreter start and its stages, then median
    exit_seconds = statistics.median(
        whole - python - sum(round_stages) for whole, python, round_stages in
        zip(walls["breakdown"], walls["python"], stages))
    tlkit_own = sum(parts[s] for s in TLKIT_STAGES)
    tensorflow = parts["import tensorflow"]
    met = tensorflow > tlkit_own and tensorflow == max(parts.values())
    lines = [
        "## Cold start of `tlkit predict photo.jpg` (benchmarks/cold_start.py)",
        "",
        f"Machine: {machine()}. Run time: {run_time:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        f"Scratch CNN export at {SIZE} px, one photo-like JPEG; every process is fresh; median "
        f"of {ROUNDS} rounds after a warm-up. The breakdown runs the command's steps in one "
        "process with timestamps; the last step is `Classifier.predict` and printing (one "
        "photo: decoded with Pillow, as the steps before it did).",
        "",
        "| stage | seconds | share of the breakdown process |",
        "| --- | --- | --- |",
        f"| Python interpreter start (`python -c pass`) | {median['python']:.3f} | "
        f"{median['python'] / total:.0%} |",
    ]
    lines += [f"| {stage} | {seconds:.3f} | {seconds / total:.0%} |"
              for stage, seconds in parts.items()]
    lines += [
        f"| process exit | {exit_seconds:.3f} | "
        f"{exit_seconds / total:.0%} |",
        f"| **breakdown process, wall** | **{total:.2f}** | 100% |",
        f"| end to end: `tlkit predict photo.jpg --model EXPORT`, wall | "
        f"{median['end_to_end']:.2f} | {median['end_to_end'] / total:.0%} |",
        f"| plain TF script: import, `tf.saved_model.load`, `serving_default` on the bytes, wall "
        f"| {median['plain_tf']:.2f} | {median['plain_tf'] / total:.0%} |",
        "",
        f"tlkit's own share (importing tlkit.cli and tlkit.predict on top of TensorFlow, "
        f"decoding with Pillow and the first resize, Classifier.predict's own work): "
        f"{tlkit_own:.2f} s = {tlkit_own / total:.0%}; importing TensorFlow: {tensorflow:.2f} s "
        f"= {tensorflow / total:.0%}. The `tlkit predict` command / the plain TF script: "
        f"{median['end_to_end'] / median['plain_tf']:.2f}x.",
        "",
        "Goal: cold start dominated by importing TensorFlow (the largest stage, larger than "
        f"tlkit's own share): {'met' if met else 'NOT met'}.",
    ]
    return publish("cold_start", lines, met)


if __name__ == "__main__":
    sys.exit(main())
