"""Helpers shared by the benchmark scripts: machine description and RESULTS.md sections."""

import os
import platform
import re
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
