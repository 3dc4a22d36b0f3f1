"""`tlkit serve` under 1, 16 and 64 concurrent clients, against the raw signature forward.

Each client sends one JPEG per request, over loopback, and sends the next as soon as the
answer is back; the server is `tlkit serve` with its defaults, in a process of its own,
started anew for each row (so the mean batch it reports at its end is that row's).
The load comes from Debian's compiled generators, so the clients do not eat the two cores
the server needs: `wrk` for REST (a Lua script rotates through the request bodies) and
`h2load` (nghttp2) for gRPC, posting a framed `PredictRequest` to
`/tensorflow.serving.PredictionService/Predict` on HTTP/2 (one connection per client).
Both report every request's latency; the server's own count of predicted images checks that
every request was answered with a prediction.

The ceiling, "raw": the export's `serving_default` called in-process on batches of 32 of
the same encoded images (decoding and the forward pass, no server), and on one image at a
time for the single-client case, and on batches of the size the server made at 16 clients
(a server with no cost of its own would reach about that row's ratio). Two exports with
random weights (offline): the scratch CNN at 32 px, where the cost per request of HTTP, JSON
and base64 matters most, and MobileNetV2 at 160 px, where the forward pass does. Goal: REST and gRPC >= 0.8x raw for the
scratch CNN at 16 clients.

Needs: apt-get install -y wrk nghttp2-client.
Run: python -m benchmarks.serve  (about 4 minutes on 2 CPU cores; rewrites its section of
RESULTS.md). A part of it only prints its table, e.g. to compare two versions of the server,
each run from its own source tree:
python -m benchmarks.serve --case scratch --way gRPC --clients 16 --server-path /other/tree
"""

import argparse

import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402
from tlkit.config import ServeConfig  # noqa: E402
from tlkit.export import export_classifier  # noqa: E402
from tlkit.models import build_classifier  # noqa: E402

CASES = (("scratch", 32), ("mobilenet_v2", 160))  # backbone, image size
CLIENTS = (1, 16, 64)
SECONDS = 4  # per measurement, after a warm-up
RAW_SECONDS = 2  # per raw measurement, before and after each served one
RAW_BATCH = 32
IMAGES = 64
CLASSES = [f"class_{i}" for i in range(10)]
GOAL = 0.8  # served / raw for the scratch CNN at 16 clients, REST and gRPC
GOAL_CLIENTS = 16
SERVING = ServeConfig()  # tlkit serve's defaults
WRK_SCRIPT = """
local bodies, requests, i = {}, {}, 0
init = function(args)
  local n = tonumber(args[1])
  for k = 1, n do
    local f = io.open(args[2] .. "/body_" .. (k - 1) .. ".json", "rb")
    requests[k] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, f:read("*a"))
    f:close()
  end
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
"""


def jpegs(count, seed, side=240):
    """Photo-like JPEGs of `side` x `side` pixels, all of one size so every request costs
    the same to decode."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class Raw:
    """The in-process signature on batches of `batch` encoded images: `rate()` is images/s."""

    def __init__(self, export, images, batch):
        self.serve = tf.saved_model.load(str(export)).signatures["serving_default"]
        self.batches = [tf.constant(images[i:i + batch]) for i in range(0, len(images), batch)]
        self.serve(image_bytes=self.batches[0])["probabilities"].numpy()

    def rate(self, seconds=RAW_SECONDS):
        """(images/s, CPU ms of this process per image) over `seconds`."""
        done, started, cpu = 0, time.perf_counter(), cpu_seconds(os.getpid())
        while time.perf_counter() - started < seconds:
            for chunk in self.batches:
                self.serve(image_bytes=chunk)["probabilities"].numpy()
                done += int(chunk.shape[0])
        return (done / (time.perf_counter() - started),
                1000 * (cpu_seconds(os.getpid()) - cpu) / done)


def cpu_seconds(pid):
    """User and system CPU seconds a process has used, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url, folder, clients, seconds):
    """REST through wrk: (requests, images/s, p50 ms, p99 ms)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "--timeout", "30s",
         "-s", str(folder / "post.lua"), url, "--", str(IMAGES), str(folder)],
        capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    count = int(re.search(r"(\d+) requests in", out).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return count, rate, _wrk_ms(out, "50"), _wrk_ms(out, "99")


def _wrk_ms(out, percent):
    value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def h2load(port, body_file, clients, seconds, folder):
    """gRPC Predict through h2load: (requests, images/s, p50 ms, p99 ms)."""
    log = folder / f"h2load_{clients}.log"
    log.unlink(missing_ok=True)  # h2load appends to a log file that is there
    out = subprocess.run(
        ["h2load", "-c", str(clients), "-m", "1", "-D", str(seconds),
         "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
         "--log-file", str(log),
         f"http://127.0.0.1:{port}/tensorflow.serving.PredictionService/Predict"],
        capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    if done is None or int(done.group(3)) or int(done.group(4)):
        raise RuntimeError(f"h2load saw failed requests:\n{out}")
    latencies = np.array([int(line.split("\t")[2]) / 1000
                          for line in log.read_text().splitlines() if line.strip()])
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    return len(latencies), rate, float(np.median(latencies)), float(np.percentile(latencies,
                                                                                   99))


def load(way, server, folder, clients, seconds):
    """`clients` clients of `way` (REST or gRPC) on `server` for `seconds`: (requests,
    images/s, p50 ms, p99 ms)."""
    if way == "REST":
        return wrk(server.rest_url, folder, clients, seconds)
    return h2load(server.grpc_port, folder / "predict.grpc", clients, seconds, folder)


def grpc_body(image):
    """One gRPC message: a length-prefixed `PredictRequest` for one image."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "bench"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image]))
    data = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(data)) + data


class Server:
    """`tlkit serve` in a subprocess on free ports, with tlkit from the folder `source` when
    given (otherwise as this process finds it)."""

    def __init__(self, export, source=None, options=()):
        env = dict(os.environ)
        if source is not None:  # tlkit imported from that tree first
            env["PYTHONPATH"] = os.pathsep.join(
                [str(source)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tlkit.cli", "serve", "--model", str(export), "--port", "0",
             "--grpc-port", "0", *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env)
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


def measure(work, backbone, size, ways=("REST", "gRPC"), counts=CLIENTS, source=None,
            options=()):
    """One export served and measured under each of `ways` and client `counts`."""
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone, len(CLASSES), size, weights="none")
    export = export_classifier(model, CLASSES, work, "bench", image_size=size, resize="squash")
    del model
    images = jpegs(IMAGES, seed=size)
    folder = work / "load"
    folder.mkdir()
    (folder / "post.lua").write_text(WRK_SCRIPT)
    for i, image in enumerate(images):
        (folder / f"body_{i}.json").write_text(
            json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}))
    (folder / "predict.grpc").write_bytes(grpc_body(images[0]))
    single = Raw(export, images, 1).rate()[0]
    ceiling = Raw(export, images, RAW_BATCH)
    rows = []
    before = ceiling.rate()
    raws = [before]
    for way in ways:
        for clients in counts:  # a server of its own, so its batches are this row's
            server = Server(export, source, options)
            try:
                sent = load(way, server, folder, clients, 1)[0]  # warm-up
                cpu = cpu_seconds(server.process.pid)
                result = load(way, server, folder, clients, SECONDS)
                cpu = 1000 * (cpu_seconds(server.process.pid) - cpu) / result[0]
                sent += result[0]
            finally:
                served, passes = server.stop()
            if served < sent:
                raise RuntimeError(f"{sent} requests were answered but only {served} images "
                                   "predicted")
            after = ceiling.rate()
            raws.append(after)
            # the machine's other load drifts: compare with raw just before and after
            rows.append((way, clients, result[1], (before[0] + after[0]) / 2, *result[2:],
                         cpu, served / passes))
            before = after
    # the signature on batches of the size the server made at the goal's client count
    paired = {}
    for batch in sorted({max(1, round(row[-1])) for row in rows if row[1] == GOAL_CLIENTS}):
        raw = Raw(export, images, batch)
        paired[batch] = float(np.mean([raw.rate()[0] for _ in range(2)]))
    rates = [rate for rate, _ in raws]
    return {"backbone": backbone, "size": size, "raw": float(np.mean(rates)),
            "raw_spread": (min(rates), max(rates)), "raw_cpu": float(np.mean([c for _, c in raws])),
            "single": single, "paired": paired, "rows": rows}


def parse_args(argv=None):
    """The command line: which models, ways and client counts to measure (default: all,
    and then the RESULTS.md section is rewritten), and which tlkit serves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=[name for name, _ in CASES],
                        help="models to measure [default: all]")
    parser.add_argument("--way", nargs="+", choices=["REST", "gRPC"],
                        help="APIs to measure [default: both]")
    parser.add_argument("--clients", nargs="+", type=int,
                        help=f"concurrent client counts [default: {' '.join(map(str, CLIENTS))}]")
    parser.add_argument("--server-path", type=Path,
                        help="run the server with tlkit from this source tree (the folder "
                             "holding tlkit/); only prints [default: this tlkit]")
    parser.add_argument("--batch-timeout-ms", type=float,
                        help="the server's --batch-timeout-ms; only prints [default: its own]")
    args = parser.parse_args(argv)
    if args.batch_timeout_ms is not None and args.batch_timeout_ms < 0:
        parser.error(f"--batch-timeout-ms must be at least 0. Received: {args.batch_timeout_ms}")
    if args.clients is not None and min(args.clients) < 1:
        parser.error(f"--clients must be at least 1. Received: {args.clients}")
    if args.server_path is not None and not (args.server_path / "tlkit").is_dir():
        parser.error(f"--server-path must hold a tlkit/ folder. Received: {args.server_path}")
    return args


def main(argv=None):
    """Measures and prints the table; a full run with this tlkit also rewrites the
    RESULTS.md section. Returns the exit code (0 if the goal was met, or for a part)."""
    args = parse_args(argv)
    chosen = [case for case in CASES if args.case is None or case[0] in args.case]
    ways = tuple(args.way or ("REST", "gRPC"))
    counts = tuple(args.clients or CLIENTS)
    partial = ((len(chosen), ways, counts) != (len(CASES), ("REST", "gRPC"), CLIENTS)
               or args.server_path is not None or args.batch_timeout_ms is not None)
    options = (() if args.batch_timeout_ms is None
               else ("--batch-timeout-ms", str(args.batch_timeout_ms)))
    work = Path(tempfile.mkdtemp(prefix="tlkit-serve-"))
    load, started = os.getloadavg()[0], time.perf_counter()
    try:
        cases = [measure(work / case[0], *case, ways, counts, args.server_path, options)
                 for case in chosen]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_time = time.perf_counter() - started
    lines = [
        "## Serving concurrent clients (benchmarks/serve.py)",
        "",
        f"Machine: {machine()}. Run time: {run_time:.0f} s. 1-minute load average before it "
        f"started: {load:.1f}.",
        "",
        f"Each client sends one {240}x{240} JPEG per request over loopback and the next as "
        f"soon as it has the answer, for {SECONDS} s after a warm-up; exports with random "
        "weights. Load from compiled generators, not Python: `wrk` (REST, JSON with base64) "
        "and `h2load` (gRPC `Predict`, one HTTP/2 connection per client). `tlkit serve` runs "
        f"with its defaults (batches of up to {SERVING.max_batch_size} images, a "
        f"{SERVING.batch_timeout_ms:g} ms window) in a process of its own for each row, "
        "after a 1 s warm-up; mean batch: the images per forward pass it reports at the end. "
        f"raw: the export's `serving_default` in-process on batches of {RAW_BATCH} (no "
        f"server), {RAW_SECONDS} s before and after each served measurement; served / raw "
        "compares each with the mean of those two, as other work on the machine drifts. "
        "CPU ms/image: CPU time of the server process (of the raw loop's process for raw), "
        "all threads, per image; it shows the cost of serving even when other work shares "
        "the cores. raw on batches of the mean batch served at "
        f"{GOAL_CLIENTS} clients: what the signature itself does with batches of that size, "
        "so about the ratio a server with no cost of its own would reach there.",
        "",
        "| model | way | clients | images/s | served / raw | p50 ms | p99 ms | CPU ms/image "
        "| mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    goal = {}
    for case in cases:
        name = f"{case['backbone']} {case['size']} px"
        ceiling = case["raw"]
        low, high = case["raw_spread"]
        lines.append(f"| {name} | raw, batches of {RAW_BATCH} (mean of {len(case['rows']) + 1};"
                     f" {low:,.0f}-{high:,.0f}) | | {ceiling:,.0f} | 1.00x | | | "
                     f"{case['raw_cpu']:.2f} | {RAW_BATCH} |")
        lines.append(f"| {name} | raw, one image per call | | {case['single']:,.0f} | "
                     f"{case['single'] / ceiling:.2f}x | | | | 1 |")
        for batch, rate in case["paired"].items():
            lines.append(f"| {name} | raw, batches of {batch} (served at {GOAL_CLIENTS} "
                         f"clients; mean of 2) | | {rate:,.0f} | {rate / ceiling:.2f}x | | | | "
                         f"{batch} |")
        for way, clients, rate, near, p50, p99, cpu, batch in case["rows"]:
            lines.append(f"| {name} | {way} | {clients} | {rate:,.0f} | {rate / near:.2f}x"
                         f" | {p50:.1f} | {p99:.1f} | {cpu:.2f} | {batch:.1f} |")
            if case["backbone"] == "scratch" and clients == GOAL_CLIENTS:
                goal[way] = rate / near
    met = all(ratio >= GOAL for ratio in goal.values()) and len(goal) == 2
    if partial:
        print("\n".join(lines[6:]))
        for way, ratio in goal.items():
            print(f"{way} at {GOAL_CLIENTS} clients (scratch): {ratio:.2f}x raw")
        return 0
    lines += ["", f"Goal: REST and gRPC >= {GOAL:g}x raw for the scratch CNN at {GOAL_CLIENTS}"
                  f" clients: {'met' if met else 'NOT met'} (REST {goal.get('REST', 0):.2f}x, "
                  f"gRPC {goal.get('gRPC', 0):.2f}x)."]
    return publish("serve", lines, met)


if __name__ == "__main__":
    sys.exit(main())
