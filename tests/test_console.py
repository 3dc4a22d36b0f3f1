"""What a user of the `tlkit` command sees: no TensorFlow C++ log lines unless asked for, and
`fit` ending with where its time went. Each command runs in a fresh process, as a user runs it."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import write_image_folder

TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ", re.M)
ABSL_BANNER = "All log messages before absl::InitializeLog()"


def without_log_settings():
    """This process's environment without TensorFlow's and tlkit's log settings."""
    return {k: v for k, v in os.environ.items()
            if k not in ("TF_CPP_MIN_LOG_LEVEL", "TLKIT_TF_LOGS")}


def tlkit(*args, **env):
    """Runs `tlkit ARGS` in a new process, with none of TensorFlow's log settings inherited."""
    return subprocess.run([sys.executable, "-c", "from tlkit.cli import main; main()",
                           *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**without_log_settings(), **env})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    base = tmp_path_factory.mktemp("console")
    data = write_image_folder(base / "shapes", classes=("circle", "square"), per_class=6,
                              size=20)
    done = tlkit("fit", data, "--image-size", 16, "--epochs", 1, "--augment", "none",
                 "--flip", "none", "--export-dir", base / "exports", "--runs-dir",
                 base / "runs")
    assert done.returncode == 0, done.stderr
    return base, done


def test_fit_prints_no_tensorflow_log_line(fitted):
    _, done = fitted
    assert not TF_LOG_LINE.search(done.stderr), done.stderr
    assert ABSL_BANNER not in done.stderr


def test_fit_ends_with_where_the_time_went(fitted):
    base, done = fitted
    line = [line for line in done.stdout.splitlines() if line.startswith("Time: ")]
    assert len(line) == 1, done.stdout
    for step in ("decode", "epochs", "evaluation", "export"):
        assert re.search(rf"\b{step} \d+\.\d s", line[0]), line[0]
    result = json.loads(next((base / "runs").glob("*/*/result.json")).read_text())
    seconds = result["seconds"]
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items()
                                                 if k != "total"), abs=0.05)


@pytest.mark.parametrize("ask", ["flag", "env"])  # not asked: the test below
def test_predict_shows_tensorflow_logs_when_asked(fitted, ask):
    base, _ = fitted
    image = next((base / "shapes" / "circle").iterdir())
    flags = ["--verbose"] if ask == "flag" else []
    env = {"TLKIT_TF_LOGS": "1"} if ask == "env" else {}
    done = tlkit(*flags, "predict", image, "--model", base / "exports" / "shapes", **env)
    assert done.returncode == 0, done.stderr
    assert "circle" in done.stdout or "square" in done.stdout
    # TensorFlow logs at least its oneDNN or CUDA notice at start-up
    assert TF_LOG_LINE.search(done.stderr), done.stderr


def test_predict_is_quiet_and_exits_without_a_final_garbage_collection(fitted, tmp_path):
    """No TensorFlow log line unless asked. And Python's last collection walks everything
    TensorFlow made (0.8 s of CPU per command, seconds on a loaded machine): the CPU the
    process spends after its first exit handler (which prints its own CPU time) until it
    has exited (wait4's account of it) stays small."""
    base, _ = fitted
    image = next((base / "shapes" / "circle").iterdir())
    marker = ("import atexit, time; atexit.register(lambda: print('EXITING', "
              "time.process_time(), flush=True)); from tlkit.cli import main; main()")
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", marker, "predict", str(image),
                                    "--model", str(base / "exports" / "shapes")],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=without_log_settings())
    try:
        lines = list(process.stdout)  # to its end: the process has closed its stdout
        marker_lines = [line for line in lines if line.startswith("EXITING")]
        assert marker_lines, f"no exit marker: {lines}"
        at_marker = float(marker_lines[0].split()[1])
        deadline = time.monotonic() + 60
        while True:  # wait4, bounded in time
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            assert time.monotonic() < deadline, "the process did not exit"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()  # reaps it when wait4 did not
        process.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert "circle" in "".join(lines) or "square" in "".join(lines)
    stderr = (tmp_path / "stderr").read_text()
    assert not TF_LOG_LINE.search(stderr), stderr
    assert ABSL_BANNER not in stderr
    assert usage.ru_utime + usage.ru_stime - at_marker < 0.3


def test_import_tensorflow_passes_on_other_stderr_lines():
    from tlkit.runtime import _shown_lines

    text = (b"WARNING: All log messages before absl::InitializeLog() is called are written "
            b"to STDERR\n"
            b"I0000 00:00:1796162731.562001    3628 port.cc:153] oneDNN custom operations\n"
            b"a warning of the user's own\n"
            b"E0000 00:00:1796162735.925389    3628 cuda_platform.cc:52] failed call to cuInit\n")
    assert _shown_lines(text, 3) == b"a warning of the user's own\n"
    assert _shown_lines(text, 1) == (b"a warning of the user's own\n"
                                     b"E0000 00:00:1796162735.925389    3628 "
                                     b"cuda_platform.cc:52] failed call to cuInit\n")
