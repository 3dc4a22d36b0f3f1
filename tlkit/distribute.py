"""Training on several devices or machines with `tf.distribute`, and mixed precision.

tlkit does not run a distributed engine of its own: it uses TensorFlow's.

    none          tf.distribute.get_strategy()            this process, its default device
    mirrored      tf.distribute.MirroredStrategy          every GPU of this machine
    multi-worker  tf.distribute.MultiWorkerMirroredStrategy  the machines listed in TF_CONFIG

The trainer runs the same step through `strategy.run` in every case (the default strategy
is the "none" case), so the staged schedule, early stopping, best weights, rollback and the
resume state behave alike everywhere. Keras 3's `model.fit` fails under
MultiWorkerMirroredStrategy (keras-team/keras#20585); tlkit's own loop does not use it.

In a multi-worker run every worker reads the whole data folder, and the workers check with
a collective that they agree on the class names, the split, the settings and the initial
weights before training, so that a worker with other data fails at once, naming itself.
Each global batch is split between the workers. Only the chief (`chief:0` in TF_CONFIG,
else `worker:0`) writes the run folder, TensorBoard logs, reports and the export; every
other worker keeps its resume state in `<run folder>/worker-<index>/`. A worker that dies
is noticed by TensorFlow's coordination service (heartbeats, about 10 s); a worker that
stops answering makes the others' collectives time out after `TLKIT_COLLECTIVE_TIMEOUT`
seconds (default 60). Either way the others stop with a `ClusterError` that says how to
resume.
"""

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tlkit.errors import ClusterError, ConfigError
from tlkit.runtime import cpu_flags

TIMEOUT_ENV = "TLKIT_COLLECTIVE_TIMEOUT"
STARTUP_TIMEOUT_ENV = "TLKIT_STARTUP_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds a collective waits for the other workers while training
DEFAULT_STARTUP_TIMEOUT = 1800.0  # seconds to wait for every worker to have read its data
_NAME_BYTES = 256  # longest text `chief_text` sends


def tf_config():
    """The cluster described by the `TF_CONFIG` environment variable, or None without one.

    Returns:
        A dict with `"cluster"` (job name -> list of `host:port`) and `"task"` (`"type"`,
        `"index"`), as TensorFlow reads it.

    Raises:
        ConfigError: if TF_CONFIG is set but is not such a JSON object.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
        cluster, task = value["cluster"], value["task"]
        _ = cluster[task["type"]][int(task["index"])]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(
            "TF_CONFIG must be JSON like {\"cluster\": {\"worker\": [\"host1:port\", "
            "\"host2:port\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}. "
            f"Received: TF_CONFIG={text!r}"
        ) from None
    return value


def _workers(config):
    """The training tasks of a TF_CONFIG, in worker order: the chief first, if any."""
    cluster = config["cluster"]
    return [("chief", 0)] * len(cluster.get("chief", [])[:1]) + [
        ("worker", index) for index in range(len(cluster.get("worker", [])))]


def worker_index():
    """This process's index among the workers of TF_CONFIG (0: the chief); 0 without one."""
    config = tf_config()
    if config is None:
        return 0
    task = (config["task"]["type"], int(config["task"]["index"]))
    workers = _workers(config)
    return workers.index(task) if task in workers else 0


def worker_folder(run_dir, index):
    """Where worker `index` keeps its own files of a run: the run folder for the chief,
    `<run folder>/worker-<index>` for the others."""
    return Path(run_dir) if index == 0 else Path(run_dir) / f"worker-{index}"


def gpu_count():
    """Number of GPUs TensorFlow sees."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def cpu_has_bfloat16():
    """Whether the CPU computes bfloat16 natively (x86 AVX512_BF16 or AMX, Arm BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_distribute(distribute):
    """Resolves `distribute="auto"` for this machine and checks the explicit values.

    `"auto"` is `"multi-worker"` when TF_CONFIG lists more than one worker, else
    `"mirrored"` when there is more than one GPU, else `"none"`.

    Args:
        distribute: `"auto"`, `"none"`, `"mirrored"` or `"multi-worker"`.

    Returns:
        One of `"none"`, `"mirrored"`, `"multi-worker"`.

    Raises:
        ConfigError: `"multi-worker"` without a TF_CONFIG that lists the workers.
    """
    config = tf_config()
    workers = len(_workers(config)) if config else 0
    if distribute == "auto":
        if workers > 1:
            return "multi-worker"
        return "mirrored" if gpu_count() > 1 else "none"
    if distribute == "multi-worker" and not workers:
        raise ConfigError(
            "`distribute='multi-worker'` needs the TF_CONFIG environment variable: the "
            "cluster's workers and this process's task (see the README, 'Scaling out'). "
            "Received: distribute='multi-worker' and no TF_CONFIG"
        )
    return distribute


def resolve_jit(jit, distribute):
    """Resolves `jit="auto"` the way Keras's `jit_compile="auto"` does: XLA on with a GPU,
    off on CPU-only machines and under a distribution strategy. On this project's CPU, XLA
    made an epoch 3.8x slower (benchmarks/jit.py); the GPU choice is Keras's, not measured
    here.

    Returns:
        `"on"` or `"off"`.
    """
    if jit != "auto":
        return jit
    return "on" if distribute == "none" and gpu_count() else "off"


def precision_policy(mixed_precision):
    """The Keras dtype policy for training.

    Args:
        mixed_precision: False for float32; True for float16 compute on a GPU
            (`"mixed_float16"`, with loss scaling) or bfloat16 on a CPU that has it
            (`"mixed_bfloat16"`). Variables, the `predictions` layer and the loss stay float32.

    Returns:
        `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`.

    Raises:
        ConfigError: mixed precision asked for on a machine with neither.
    """
    if not mixed_precision:
        return "float32"
    if gpu_count():
        return "mixed_float16"
    if cpu_has_bfloat16():
        return "mixed_bfloat16"
    raise ConfigError(
        "`mixed_precision` needs a GPU (float16) or a CPU with bfloat16 instructions "
        "(AVX512_BF16, AMX or Arm BF16); this machine has neither, and emulated low "
        "precision would only be slower. Received: mixed_precision=True"
    )


def _seconds(name, default):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ConfigError(f"{name} must be a number of seconds > 0. Received: {name}={text!r}")
    return value


@dataclass
class Cluster:
    """The strategy a run trains under, and this process's place in it."""

    strategy: object  # the tf.distribute.Strategy
    kind: str  # "none", "mirrored" or "multi-worker"
    worker: int  # this process's worker index (0: the chief)
    workers: int  # number of workers (processes)
    timeout: float  # seconds a collective waits for the other workers while training

    @property
    def is_chief(self):
        """Whether this worker writes the run folder and the export."""
        return self.worker == 0

    @property
    def replicas(self):
        """Replicas (devices) over all workers that each take a share of a batch."""
        return self.strategy.num_replicas_in_sync

    def describe(self, batch_size, learning_rate, policy, jit):
        """One line for the start of a run: strategy, replicas, batch, learning rate,
        precision and XLA."""
        where = (f", worker {self.worker} of {self.workers}"
                 f"{' (the chief)' if self.is_chief else ' (chief: worker 0)'}"
                 if self.workers > 1 else "")
        return (f"Strategy: {self.kind}{where}, {self.replicas} replica(s) in sync; global "
                f"batch {batch_size} = {batch_size // self.replicas} per replica; learning "
                f"rate {learning_rate:g} as given (not scaled); precision {policy}; XLA {jit}.")


def connect(distribute):
    """Creates the strategy of a run. Call it before any other TensorFlow operation: a
    multi-worker strategy starts this process's server and joins the cluster of TF_CONFIG.

    Args:
        distribute: `"none"`, `"mirrored"` or `"multi-worker"` (resolved, see
            `resolve_distribute`).

    Returns:
        A `Cluster`.
    """
    import tensorflow as tf

    timeout = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    if distribute == "multi-worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=timeout))
        return Cluster(strategy, distribute, worker_index(), len(_workers(tf_config())),
                       timeout)
    strategy = (tf.distribute.MirroredStrategy() if distribute == "mirrored"
                else tf.distribute.get_strategy())
    return Cluster(strategy, distribute, 0, 1, timeout)


def check_batch_size(cluster, batch_size):
    """Raises ConfigError unless the global batch splits evenly over the replicas."""
    if batch_size % cluster.replicas:
        raise ConfigError(
            f"`batch_size` is the global batch and must be divisible by the "
            f"{cluster.replicas} replicas in sync. Received: batch_size={batch_size}"
        )


def for_training(model, cluster, policy):
    """The model to train: `model` itself when there is nothing to change, else a copy with
    the same weights whose layers compute in `policy` and whose variables belong to the
    cluster's strategy.

    Args:
        model: a tlkit classifier built in float32 outside any strategy.
        cluster: a `Cluster`.
        policy: a dtype policy name (see `precision_policy`).

    Returns:
        A `keras.Model`.
    """
    from tlkit.models import copy_classifier

    if cluster.kind == "none" and policy == "float32":
        return model
    with cluster.strategy.scope():
        return copy_classifier(model, policy)


def _digest(value):
    """A 63-bit hash: positive in an int64, so that a sum of them all-reduces exactly."""
    return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big") >> 1


def _gather(cluster, values, when):
    """Every worker's int64 vector `values`, as a list of lists in worker order: a
    collective of the start of a run, which waits up to `TLKIT_STARTUP_TIMEOUT` seconds
    for every worker (`when` says what for, in the error if one does not come)."""
    import numpy as np
    import tensorflow as tf

    strategy = cluster.strategy
    size = strategy.num_replicas_in_sync
    timeout = _seconds(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    row = tf.constant(values, tf.int64)

    @tf.function
    def gather():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            rows = tf.one_hot(context.replica_id_in_sync_group, size, dtype=tf.int64)
            return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      rows[:, None] * row[None, :], options=options)

        return strategy.run(replica_fn)

    with _failures(cluster, when, "Start every worker again.", timeout, STARTUP_TIMEOUT_ENV):
        table = np.asarray(strategy.experimental_local_results(gather())[0])
    per_worker = size // cluster.workers
    return [list(map(int, table[index * per_worker])) for index in range(cluster.workers)]


def check_agreement(cluster, items):
    """Checks that every worker has the same value of each item, before training starts.

    The first collective of a run: it waits up to `TLKIT_STARTUP_TIMEOUT` seconds (default
    1800) for every worker to have read its data.

    Args:
        cluster: a `Cluster`.
        items: an ordered dict, what -> text, e.g. `{"class names": "cat\\ndog", ...}`.

    Raises:
        ClusterError: on every worker, naming the workers and the items that differ from
            the chief's, or when a worker does not answer.
    """
    table = _gather(cluster, [_digest(text) for text in items.values()],
                    "while the workers compared their data")
    differences = [f"worker {index}: " + ", ".join(
        name for name, value, chief in zip(items, row, table[0]) if value != chief)
        for index, row in enumerate(table) if row != table[0]]
    if differences:
        raise ClusterError(
            "The workers differ from the chief (worker 0) in: " + "; ".join(differences)
            + ". Every worker needs the same data folder content, settings and initial "
            f"weights. (This is worker {cluster.worker}.)"
        )


def chief_text(cluster, text):
    """The chief's `text` (up to 256 UTF-8 bytes), on every worker."""
    data = text.encode()[:_NAME_BYTES] if cluster.is_chief else b""
    row = _gather(cluster, list(data.ljust(_NAME_BYTES, b"\0")),
                  "while the chief named the run folder")[0]
    return bytes(row).rstrip(b"\0").decode()


def agreed_resume_point(cluster, points):
    """The resume point every worker can reach: the earliest of the workers' latest states.

    Args:
        cluster: a `Cluster`.
        points: this worker's saved states as `(stage_index, epochs_done)` pairs, latest
            first (its current and previous state).

    Returns:
        The agreed pair.

    Raises:
        ClusterError: if some worker has no state at that point.
    """
    encoded = [epochs * 1000 + stage for stage, epochs in points][:2]
    encoded += [-1] * (2 - len(encoded))
    table = _gather(cluster, encoded, "while the workers compared their saved states")
    target = min(row[0] for row in table)
    missing = [index for index, row in enumerate(table) if target not in row]
    if target < 0 or missing:
        raise ClusterError(
            "The workers' saved states are too far apart to resume together: latest "
            + ", ".join(f"worker {i}: {row[0] // 1000} epoch(s)" for i, row in
                        enumerate(table)) + ". Start a new run."
        )
    return target % 1000, target // 1000


_PEER = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)")


@contextlib.contextmanager
def _failures(cluster, when, remedy, timeout, variable):
    """Turns TensorFlow's errors about unreachable or silent peers into a ClusterError;
    `timeout` is the collective timeout in force, set by the environment `variable`."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError, tf.errors.CancelledError) as e:
        if cluster.workers == 1:
            raise
        lines = [line.strip().rstrip(":") for line in str(e.message).splitlines()
                 if line.strip() and not line.strip().startswith("[[")]
        reason = next((line for line in lines if "abort" in line.lower()
                       or "timed out" in line.lower()), lines[0] if lines else type(e).__name__)
        tasks = _workers(tf_config())
        peers = sorted({tasks.index((job, int(task))) for job, task in
                        _PEER.findall(str(e.message)) if (job, int(task)) in tasks}
                       - {cluster.worker})
        cause = (f"no answer within the collective timeout of {timeout:g} s ({variable})"
                 if isinstance(e, tf.errors.DeadlineExceededError) else
                 "lost contact with " + (", ".join(f"worker {p}" for p in peers) or "the "
                                         "cluster"))
        raise ClusterError(
            f"Worker {cluster.worker} of {cluster.workers} stopped {when}: {cause}. "
            f"TensorFlow: {reason[:300]}.\n{remedy}"
        ) from None


def failures(cluster, run_dir):
    """A context manager for the training loop: a dead or silent worker becomes a
    `ClusterError` that says how to resume from the last saved epoch."""
    return _failures(cluster, "training", "Every completed epoch is saved; restart every "
                     f"worker with `resume={str(run_dir)!r}`.", cluster.timeout, TIMEOUT_ENV)
