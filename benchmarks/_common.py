"""Helpers shared by the benchmark scripts (and tests): machine description, RESULTS.md
sections, a multi-worker cluster on loopback ports."""

import json
import os
import platform
import re
import socket
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine():
    """One line describing the machine the numbers were measured on."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}")


def write_section(name, markdown):
    """Replaces (or appends) the section `name` of benchmarks/RESULTS.md with `markdown`."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by the scripts in this folder; each section is "
        "replaced when its script runs again.\n")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + block + "\n")
    RESULTS.write_text(text)


def publish(name, lines, met=True):
    """Prints a benchmark's report (`lines`, joined), writes it as section `name` of
    benchmarks/RESULTS.md and returns the script's exit code: 0 if its goal was `met`."""
    report = "\n".join(lines)
    print(report)
    write_section(name, report)
    return 0 if met else 1


def loopback_cluster(workers):
    """`TF_CONFIG` values for `workers` processes of one cluster on this machine, on free
    127.0.0.1 ports (worker 0 is the chief): multi-worker training tried on one host.

    Returns:
        A list of JSON strings, the one for worker `i` at index `i`.
    """
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return [json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
            for i in range(workers)]
