"""`tlkit serve` under concurrent clients, against the raw signature forward.

Clients send one JPEG per request from 16 threads over loopback, as many small services do;
the server is `tlkit serve` in a process of its own. Three ways of answering them are timed on
the same export and images:

- raw: no server; the export's `serving_default` called in-process on batches of 32 encoded
  images (the ceiling: decoding and the forward pass only);
- REST and gRPC through `tlkit serve` with batching (32 images, 2 ms window);
- REST with batching off (`max_batch_size=1`): one forward pass per request.

Two exports with random weights (offline): the scratch CNN at 32 px, where the per-request
cost of HTTP, JSON and base64 dominates, and MobileNetV2 at 160 px, where the forward pass
does. Reported: images/s, latency median and 99th percentile, and the ratios batched /
unbatched and served / raw. Goal: batching >= 1.5x unbatched throughput for the small model
(concurrent single-image requests are what it exists for).

Run: python -m benchmarks.serve  (about 2 minutes on 2 CPU cores)
"""

import base64
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402
from tlkit.export import export_classifier  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402

CASES = (("scratch", 32, 480), ("mobilenet_v2", 160, 160))  # backbone, size, requests
CLIENTS = 16
RAW_BATCH = 32
CLASSES = [f"class_{i}" for i in range(10)]
BATCHING_GOAL = 1.5


def jpegs(count, seed):
    """Photo-like JPEGs, 160-320 px a side."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        height, width = rng.integers(160, 321, 2)
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def raw(export, images):
    """Seconds for the in-process signature on batches of RAW_BATCH encoded images."""
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    serve(image_bytes=tf.constant(images[:RAW_BATCH]))
    started = time.perf_counter()
    for start in range(0, len(images), RAW_BATCH):
        serve(image_bytes=tf.constant(images[start:start + RAW_BATCH]))["probabilities"].numpy()
    return time.perf_counter() - started, []


def rest(url, images):
    """Seconds and per-request latencies for one-image REST requests from CLIENTS threads."""
    bodies = [json.dumps({"instances": [{"b64": base64.b64encode(i).decode()}]}).encode()
              for i in images]

    def send(body):
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=120) as r:
            json.loads(r.read())
        return time.perf_counter() - started

    return _concurrently(send, bodies)


def grpc_client(port, images):
    """The same through TF Serving's gRPC client."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    requests = []
    for image in images:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "bench"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image]))
        requests.append(request)

    def send(request):
        started = time.perf_counter()
        stub.Predict(request, 120)
        return time.perf_counter() - started

    try:
        return _concurrently(send, requests)
    finally:
        channel.close()


def _concurrently(send, items):
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(send, items[:CLIENTS]))  # warm-up: connections, first batches
        started = time.perf_counter()
        latencies = list(pool.map(send, items))
    return time.perf_counter() - started, latencies


class Server:
    """`tlkit serve` in a subprocess on free ports; `stats` holds its closing line's counts."""

    def __init__(self, export, *options):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlkit.cli", "serve", "--model", str(export), "--port", "0",
             "--grpc-port", "0", *options], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        ports = {}
        for line in self.process.stdout:
            if line.startswith("Ctrl-C"):
                break
            found = re.search(r"(REST|gRPC): \S*?:(\d+)", line)
            if found:
                ports[found.group(1)] = int(found.group(2))
        self.rest_url = f"http://127.0.0.1:{ports['REST']}/v1/models/bench:predict"
        self.grpc_port = ports["gRPC"]

    def stop(self):
        """Stops the server; returns (images, forward passes) it reports."""
        self.process.send_signal(signal.SIGINT)
        out = self.process.communicate(timeout=60)[0]
        images, passes = re.search(r"(\d+) images in (\d+) forward passes", out).groups()
        return int(images), int(passes)


def measure(work, backbone, size, count):
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone, len(CLASSES), size, weights="none")
    export = export_classifier(model, CLASSES, work, "bench", image_size=size, resize="squash")
    del model
    images = jpegs(count, seed=size)
    rows = {"raw": raw(export, images)}
    server = Server(export)
    try:
        rows["REST, batched"] = rest(server.rest_url, images)
        rows["gRPC, batched"] = grpc_client(server.grpc_port, images)
    finally:
        served, passes = server.stop()
    server = Server(export, "--max-batch-size", "1")
    try:
        rows["REST, one pass per request"] = rest(server.rest_url, images)
    finally:
        server.stop()
    result = {}
    for name, (seconds, latencies) in rows.items():
        result[name] = {"rate": count / seconds,
                        "p50": statistics.median(latencies) * 1000 if latencies else None,
                        "p99": float(np.percentile(latencies, 99)) * 1000 if latencies else None}
    return {"backbone": backbone, "size": size, "count": count, "rows": result,
            "mean_batch": served / max(passes, 1)}


def main():
    work = Path(tempfile.mkdtemp(prefix="tlkit-serve-"))
    load, started = os.getloadavg()[0], time.perf_counter()
    try:
        cases = [measure(work / case[0], *case) for case in CASES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_time = time.perf_counter() - started
    lines = [
        "## Serving concurrent clients (benchmarks/serve.py)",
        "",
        f"Machine: {machine()}. Run time: {run_time:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        f"{CLIENTS} client threads on loopback, one JPEG (160-320 px) per request; exports "
        "with random weights. raw: the export's `serving_default` in-process on batches of "
        f"{RAW_BATCH} (no server). Batched: `tlkit serve` defaults (up to 32 images per "
        "pass, 2 ms window), in its own process. Throughput over all requests after a "
        "warm-up; the mean batch counts every request the server answered.",
        "",
        "| model | way | images/s | vs raw | latency p50 ms | latency p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ratios = []
    for case in cases:
        rows = case["rows"]
        for name, row in rows.items():
            p50 = "" if row["p50"] is None else f"{row['p50']:.1f}"
            p99 = "" if row["p99"] is None else f"{row['p99']:.1f}"
            lines.append(f"| {case['backbone']} {case['size']} px | {name} | {row['rate']:,.1f}"
                         f" | {row['rate'] / rows['raw']['rate']:.2f}x | {p50} | {p99} |")
        ratio = rows["REST, batched"]["rate"] / rows["REST, one pass per request"]["rate"]
        ratios.append(ratio)
        lines.append(f"| | batched / one pass per request (REST) | {ratio:.2f}x | | "
                     f"mean batch {case['mean_batch']:.1f} images | |")
    met = ratios[0] >= BATCHING_GOAL
    lines += ["", f"Goal: batching >= {BATCHING_GOAL:g}x unbatched for the small model: "
                  f"{'met' if met else 'NOT met'} ({ratios[0]:.2f}x)."]
    return publish("serve", lines, met)


if __name__ == "__main__":
    sys.exit(main())
