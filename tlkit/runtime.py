"""What every tlkit process sets up first: the version, Keras's backend, TensorFlow's logs.

TensorFlow's C++ log lines (oneDNN and CPU-feature notices, CUDA probes such as "failed call
to cuInit" on a machine without a GPU) are hidden: importing tlkit sets
`TF_CPP_MIN_LOG_LEVEL=3` unless it is set already, and `import_tensorflow` applies that
level also to the lines TensorFlow prints while it loads, before it reads the variable.
`TLKIT_TF_LOGS=1` (or `tlkit --verbose`) shows them all.
"""

import atexit
import gc
import os
import re
import sys

_keras = sys.modules.get("keras")
if _keras is not None and _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "tlkit needs Keras's TensorFlow backend, but Keras was already imported with the "
        f"{_keras.backend.backend()!r} backend. Set KERAS_BACKEND=tensorflow (or import tlkit "
        "before keras)."
    )
# tlkit trains and exports through TensorFlow: its SavedModels are TensorFlow graphs.
os.environ["KERAS_BACKEND"] = "tensorflow"

__version__ = "0.1.0"

TF_LOGS_ENV = "TLKIT_TF_LOGS"
"""Environment variable: `1` shows TensorFlow's C++ log lines, which tlkit hides by default."""

_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
_SEVERITIES = "IWEF"  # TensorFlow's C++ log levels 0..3, the first letter of each line
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
_EARLY_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"
_LEVEL_SET_HERE = False
if os.environ.get(TF_LOGS_ENV, "") in ("", "0") and _LOG_LEVEL_ENV not in os.environ:
    os.environ[_LOG_LEVEL_ENV] = "3"
    _LEVEL_SET_HERE = True


def exit_without_final_collection():
    """Makes this process skip Python's final garbage collection at exit. That collection
    walks every object TensorFlow and Keras made: 0.75-0.85 s of CPU at each command's exit,
    several seconds on a loaded machine (enough to keep a stopped `tlkit serve` from exiting
    in time).

    `gc.freeze` runs as an exit handler (exit handlers run in reverse order of registration,
    so after those registered later, such as TensorFlow's, and before logging's flush and the
    other handlers registered earlier); the final collection comes after all of them and
    skips the frozen objects. Objects freed by reference counting are still finalized, so
    files closed by their owner or by an exit handler are unaffected; an object caught in a
    reference cycle is left to the operating system unfinalized, which is why tlkit closes
    its files (and removes its temporary ones) explicitly. Idempotent."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def show_tensorflow_logs():
    """Lets TensorFlow's C++ log lines through (what `tlkit --verbose` does); call it before
    TensorFlow is imported."""
    os.environ[TF_LOGS_ENV] = "1"
    if _LEVEL_SET_HERE and os.environ.get(_LOG_LEVEL_ENV) == "3":
        del os.environ[_LOG_LEVEL_ENV]


def import_tensorflow():
    """Imports TensorFlow and returns it, holding back the C++ log lines it prints while it
    loads that `TF_CPP_MIN_LOG_LEVEL` asks to hide (TensorFlow applies the level only to
    the lines it logs afterwards). Everything else it writes to stderr is passed on."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        level = int(os.environ.get(_LOG_LEVEL_ENV, "0"))
    except ValueError:
        level = 0
    if level <= 0:
        import tensorflow

        return tensorflow
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            os.write(2, _shown_lines(captured.read(), level))
    return tensorflow


def _shown_lines(text, level):
    """The lines of `text` that are not C++ log lines below `level`, nor the banner of
    such lines."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = _LOG_LINE.match(line)
        if match and _SEVERITIES.index(match.group(1).decode()) < level:
            continue
        if line.startswith(_EARLY_BANNER):
            continue
        kept.append(line)
    return b"".join(kept)


def cpu_flags():
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo, as a set; an
    empty set where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()
