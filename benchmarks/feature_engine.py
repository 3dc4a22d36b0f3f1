"""Frozen-backbone features: OpenVINO bfloat16 against TensorFlow float32, speed and accuracy.

`tlkit.features.FeatureEngine` computes the pooled features a frozen backbone gives the head
(`fit`'s feature cache, `tlkit audit`). This script runs `tlkit.features.compute_features`, the
function `fit` calls, with `engine="tensorflow"` and with `engine="openvino"` (converted and
compiled with `INFERENCE_PRECISION_HINT=bf16`, checked against TensorFlow float32 on a sample
first, which falls back to TensorFlow if the check fails), in one process:

- speed: ResNet50 at 224 and 160 px with random weights (the time does not depend on their
  values) and ImageNet MobileNet v1 at 224 px (random MobileNet weights give degenerate
  features, useless for the check), batch 32, `IMAGES` random images. Two figures per engine:
  "with set-up", the first call as `fit` makes it (TensorFlow: tracing; OpenVINO: the
  sample run on both engines, conversion, compilation and the check), and "steady", a
  second call on the same images. The share of the machine's peak is the steady
  images/s x FLOPs per image over the peak: FLOPs are 2 per multiply-add of the
  convolution and dense layers, counted from their shapes; the float32 peak is cores x
  clock (/proc/cpuinfo's `cpu MHz`) x 2 FMA units x 16 float32 lanes (AVX-512) x 2;
  the bfloat16 peak, on a CPU with AMX, cores x clock x 1,024 bfloat16 multiply-adds per
  cycle (one AMX tile unit) x 2.
- accuracy: ImageNet MobileNet v1 (`benchmarks/mobilenet_weights.py`) at 96 px on
  Fashion-MNIST (Debian's `dataset-fashion-mnist`): per seed, 200 training photos per class
  drawn from the training file, features from each engine (OpenVINO's used whatever the
  check says, `min_cosine=-1`, to see what the check guards against), the audit's softmax head
  (`tlkit.audit.train_softmax_head`, its default weight decay, nothing tuned here) trained
  on them and scored on the fixed 2,000 photos of the test file that
  `benchmarks/transfer_real.py` uses. Mean and spread over the seeds, and how often the two
  heads predict the same class.

    python -m benchmarks.feature_engine           # ~2 min on 2 cores
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_HOME"] = str(Path(os.environ.get(
    "TLKIT_BENCH_CACHE", Path.home() / ".cache" / "tlkit-bench")) / "keras")

from benchmarks._common import machine, publish  # noqa: E402
from benchmarks.transfer_real import (CLASSES, TEST_PER_CLASS, draw, prepare_weights,  # noqa: E402
                                      read_idx)

IMAGES = 256
BATCH = 32
SPEED_CASES = (("resnet50", 224, "none"), ("resnet50", 160, "none"), ("mobilenet", 224, "imagenet"))
ACCURACY_SIZE = 96
PER_CLASS = 200
SEEDS = (0, 1, 2)
GOAL = 3.0  # steady OpenVINO bf16 images/s over TensorFlow float32, ResNet50 at 224 px


def clock_ghz():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1]) / 1000
    return float("nan")


def peaks():
    """(float32 GFLOPS, bfloat16 GFLOPS or None) of this machine, computed as the module
    docstring says."""
    from tlkit.runtime import cpu_flags

    flags, cores, ghz = cpu_flags(), os.cpu_count(), clock_ghz()
    lanes = 16 if "avx512f" in flags else 8
    float32 = cores * ghz * 2 * lanes * 2
    bfloat16 = cores * ghz * 1024 * 2 if "amx_bf16" in flags else None
    return float32, bfloat16


def flops_per_image(model):
    """2 x the multiply-adds of every convolution and dense layer of `model` (nested models
    included), from the layers' input and output shapes."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += flops_per_image(layer) // 2
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw * layer.input.shape[-1] // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return 2 * total


def timed_features(engine, images):
    """(features, seconds with set-up, steady seconds) of `compute_features` on `images`."""
    from tlkit.features import compute_features

    started = time.perf_counter()
    features = compute_features(engine, images, batch_size=BATCH, verbose=0)[0]
    first = time.perf_counter() - started
    started = time.perf_counter()
    compute_features(engine, images, batch_size=BATCH, verbose=0)
    return features, first, time.perf_counter() - started


def speed():
    import keras

    from tlkit.features import FeatureEngine, feature_extractor
    from tlkit.models import build_classifier

    float32_peak, bfloat16_peak = peaks()
    rows, ratios = [], {}
    for backbone, size, weights in SPEED_CASES:
        keras.utils.set_random_seed(0)
        model = build_classifier(backbone, 10, size, weights=weights)
        flops = flops_per_image(feature_extractor(model))
        images = np.random.default_rng(0).integers(0, 256, (IMAGES, size, size, 3), np.uint8)
        reference, tf_first, tf_steady = timed_features(FeatureEngine(model, "tensorflow"),
                                                        images)
        engine = FeatureEngine(model, "openvino")
        features, ov_first, ov_steady = timed_features(engine, images)
        cosines = np.sum(features * reference, axis=1) / (
            np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
        used = f"{engine.name} {engine.precision}"
        if engine.name != "openvino":
            check = engine.check or {}
            used += (f" (OpenVINO: cosine {check['cosine']:.6f}, {check['images_per_second']:.0f}"
                     " img/s)" if "cosine" in check else f" ({check.get('error', 'no BF16')})")
        tf_rate, ov_rate = IMAGES / tf_steady, IMAGES / ov_steady
        ratios[(backbone, size)] = ov_rate / tf_rate if engine.name == "openvino" else None
        share_tf = tf_rate * flops / 1e9 / float32_peak
        share_ov = ov_rate * flops / 1e9 / (bfloat16_peak or float32_peak)
        rows.append(f"| {backbone} {size} px, weights {weights} | {flops / 1e9:.2f} | "
                    f"{tf_rate:.1f} ({share_tf:.0%}) | {ov_rate:.1f} ({share_ov:.1%}) | {used} | "
                    f"{ov_rate / tf_rate:.2f}x | {tf_first:.1f} | {ov_first:.1f} | "
                    f"{tf_first / ov_first:.2f}x | {np.min(cosines):.6f} |")
        print(rows[-1], flush=True)
    peak_note = (f"Peaks: float32 {float32_peak:.0f} GFLOPS (AVX-512 FMA); bfloat16 "
                 f"{bfloat16_peak:.0f} GFLOPS (AMX)" if bfloat16_peak else
                 f"Peak: float32 {float32_peak:.0f} GFLOPS; this CPU has no AMX")
    lines = [
        f"{IMAGES} images per case, batch {BATCH}, one process. Steady: a second call of "
        "`compute_features` on the same images (the engine's throughput); with set-up: the "
        "first call, as `fit` makes it (TensorFlow: tracing; OpenVINO: sample run on both "
        "engines, conversion, compilation, check). Share of peak in brackets "
        "(TensorFlow: of the float32 peak; OpenVINO: of the bfloat16 peak where the CPU has "
        f"AMX). {peak_note} at {clock_ghz():.2f} GHz, {os.cpu_count()} cores.",
        "",
        "| case | GFLOP/image | TensorFlow float32 img/s | OpenVINO img/s | engine used | "
        "steady ratio | TF with set-up s | OpenVINO with set-up s | ratio with set-up | "
        "least cosine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows]
    return lines, ratios


def accuracy():
    import keras

    from tlkit.audit import train_softmax_head
    from tlkit.features import ENGINE_MIN_COSINE, FeatureEngine, compute_features
    from tlkit.images import resize_image
    from tlkit.models import build_classifier

    def pixels(images):
        return np.stack([resize_image(np.repeat(image[:, :, None], 3, axis=2),
                                      ACCURACY_SIZE).numpy() for image in images])

    keras.utils.set_random_seed(0)
    model = build_classifier("mobilenet", len(CLASSES), ACCURACY_SIZE, weights="imagenet")
    engines = {"tensorflow": FeatureEngine(model, "tensorflow"),
               "openvino": FeatureEngine(model, "openvino", min_cosine=-1.0)}
    test_images, test_labels = read_idx("t10k-images-idx3-ubyte.gz"), read_idx(
        "t10k-labels-idx1-ubyte.gz")
    chosen = draw(test_labels, TEST_PER_CLASS, np.random.default_rng(12345))
    test = pixels(test_images[chosen])
    test_labels = test_labels[chosen]
    test_features = {name: compute_features(engine, test, batch_size=BATCH, verbose=0)[0]
                     for name, engine in engines.items()}
    train_images, train_labels = read_idx("train-images-idx3-ubyte.gz"), read_idx(
        "train-labels-idx1-ubyte.gz")
    scores = {name: [] for name in engines}
    agreement = []
    for seed in SEEDS:
        picked = draw(train_labels, PER_CLASS, np.random.default_rng(seed))
        train = pixels(train_images[picked])
        predictions = {}
        for name, engine in engines.items():
            features = compute_features(engine, train, batch_size=BATCH, verbose=0)[0]
            head = train_softmax_head(features, train_labels[picked], len(CLASSES))
            predictions[name] = head.predict(test_features[name]).argmax(axis=1)
            scores[name].append(float(np.mean(predictions[name] == test_labels)))
        agreement.append(float(np.mean(predictions["tensorflow"] == predictions["openvino"])))
        print(f"seed {seed}: " + ", ".join(f"{n} {s[-1]:.4f}" for n, s in scores.items()),
              flush=True)

    def spread(values):
        return (f"{statistics.mean(values):.4f} ± "
                f"{statistics.stdev(values) if len(values) > 1 else 0.0:.4f}")

    check = engines["openvino"].check or {}
    used = (f"{engines['openvino'].name} {engines['openvino'].precision}, least cosine to "
            f"TensorFlow float32 {check.get('cosine', float('nan')):.6f} on the check's sample "
            f"(the default check asks for {ENGINE_MIN_COSINE}; this comparison uses the "
            "OpenVINO features whatever their cosine)")
    lines = [
        f"ImageNet MobileNet v1 at {ACCURACY_SIZE} px, Fashion-MNIST: {PER_CLASS} training "
        f"photos per class per seed (seeds {', '.join(map(str, SEEDS))}), the fixed "
        f"{TEST_PER_CLASS * len(CLASSES)} test photos; the audit's softmax head on each "
        f"engine's features. The OpenVINO engine computed with: {used}.",
        "",
        "| features from | test accuracy (mean ± sd) |",
        "| --- | --- |",
        f"| TensorFlow float32 | {spread(scores['tensorflow'])} |",
        f"| OpenVINO bfloat16 | {spread(scores['openvino'])} |",
        "",
        f"The two heads predict the same class on {spread(agreement)} of the test photos.",
    ]
    return lines, scores


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    prepare_weights()
    speed_lines, ratios = speed()
    accuracy_lines, scores = [], None
    if not args.no_accuracy:
        accuracy_lines, scores = accuracy()
    ratio = ratios.get(("resnet50", 224))
    met = ratio is not None and ratio >= GOAL
    lines = [
        "## Feature engines: OpenVINO bfloat16 vs TensorFlow float32 "
        "(benchmarks/feature_engine.py)", "",
        f"Machine: {machine()}.", "", *speed_lines, "", *accuracy_lines, "",
        f"Goal: OpenVINO >= {GOAL:.0f}x TensorFlow float32 on ResNet50 at 224 px (steady): "
        + (f"{'met' if met else 'NOT met'} ({ratio:.2f}x)." if ratio else
           "NOT met (OpenVINO bfloat16 was not used on this machine)."),
        f"Whole script: {time.perf_counter() - started:.0f} s."]
    if scores:
        gap = statistics.mean(scores["openvino"]) - statistics.mean(scores["tensorflow"])
        lines.append(f"- Accuracy, OpenVINO minus TensorFlow: {gap:+.4f}.")
    return publish("feature_engine", lines, met)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
