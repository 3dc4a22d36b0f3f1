"""Scaling out: tf.distribute strategies, multi-worker runs on loopback, mixed precision, XLA."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
from tlkit.api import resolve_config
from tlkit.config import TrainConfig
from tlkit.distribute import (Cluster, check_batch_size, cpu_has_bfloat16, gpu_count,
                              resolve_distribute, resolve_jit, worker_index)
from tlkit.errors import ConfigError
from tlkit.models import build_backbone, build_classifier, copy_classifier
from tlkit.training import Trainer

from benchmarks._common import loopback_cluster
from conftest import DIGITS_RUN, write_image_folder

PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"

WORKER_SCRIPT = """
import json, sys
import numpy as np
import tlkit
result = tlkit.fit(**json.loads(sys.argv[1]))
np.savez(sys.argv[2], *result.model.get_weights())
print("EXPORT", result.export_path)
"""
LIMIT = 240  # seconds any multi-worker test may take before its processes are killed
MIXED = pytest.mark.skipif(not (cpu_has_bfloat16() or gpu_count()),
                           reason="mixed precision needs a GPU or a CPU with bfloat16")


def start_workers(command, cwd, env_of=lambda index: {}, name="fit"):
    """Starts two worker processes of one TF_CONFIG cluster on loopback ports; each writes
    its stdout and stderr to `<cwd>/<name>-<index>.log`."""
    processes = []
    for index, tf_config in enumerate(loopback_cluster(2)):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env_of(index),
               "TF_CONFIG": tf_config}
        with open(cwd / f"{name}-{index}.log", "w") as log:
            processes.append(subprocess.Popen(command(index), cwd=cwd, env=env, text=True,
                                              stdout=log, stderr=subprocess.STDOUT))
    return processes


def wait(processes, seconds):
    """Waits up to `seconds` in all for the processes; kills the ones still running then."""
    deadline = time.monotonic() + seconds
    try:
        for process in processes:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # the return code (-9) tells the test
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def logs(cwd, name="fit"):
    return [(cwd / f"{name}-{index}.log").read_text() for index in range(2)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "shapes",
                              classes=("a", "b", "c"), per_class=16, size=16)


def test_two_workers_train_a_staged_schedule_alike_and_only_the_chief_exports(shapes,
                                                                                tmp_path):
    backbone = tmp_path / "backbone.weights.h5"  # "pretrained" weights: head, then block2
    build_backbone("scratch", 16).save_weights(backbone)
    (tmp_path / "worker.py").write_text(WORKER_SCRIPT)
    options = dict(data_dir=str(shapes), image_size=16, weights=str(backbone), unfreeze=1,
                   epochs=2, fine_tune_epochs=2, patience=5, augment="light", flip="none",
                   batch_size=8, seed=5, verbose=2, distribute="multi-worker",
                   cache_dir="cache", runs_dir="runs", export_dir="exports")
    processes = start_workers(
        lambda i: [sys.executable, "worker.py", json.dumps(options), f"weights{i}.npz"],
        tmp_path)
    wait(processes, LIMIT)
    outputs = logs(tmp_path)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-5000:]
    assert "EXPORT exports/shapes/1" in outputs[0]
    assert "EXPORT None" in outputs[1]  # the other worker did not export

    chief, other = np.load(tmp_path / "weights0.npz"), np.load(tmp_path / "weights1.npz")
    assert len(chief.files) == len(other.files) > 10
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key])

    run = next((tmp_path / "runs" / "shapes").iterdir())
    history = json.loads((run / "history.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in history] == [
        ("head", 1), ("head", 2), ("block2", 1), ("block2", 2)]
    assert sorted(p.name for p in (run / "worker-1").iterdir()) == ["config.json",
                                                                    "splits.csv"]
    assert [p.name for p in (tmp_path / "exports" / "shapes").iterdir()] == ["1"]

    model = build_classifier("scratch", 3, 16)
    model.set_weights([other[key] for key in other.files])
    images = np.stack([np.asarray(keras.utils.load_img(p)) for p in
                       sorted(shapes.glob("*/*.png"))[::8]])
    exported = tlkit.load(tmp_path / "exports" / "shapes" / "1")
    probabilities = exported.predict_arrays(images)
    np.testing.assert_allclose(probabilities, model.predict(images.astype("float32"),
                                                            verbose=0), atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert exported.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_failed_worker_stops_the_other_with_a_clear_error_then_the_job_resumes(
        failure, shapes, tmp_path):
    fit = [sys.executable, "-m", "tlkit.cli", "fit"]
    args = ["--image-size", "16", "--epochs", "3", "--patience", "5", "--augment", "none",
            "--flip", "none", "--batch-size", "8", "--seed", "3", "--cache-dir", "cache"]
    marker = tmp_path / "paused"
    paused = [sys.executable, str(PAUSED_CLI), "all:2:1", str(marker), "fit"]
    timeout = {"TLKIT_COLLECTIVE_TIMEOUT": "10"} if failure == "hung" else {}
    processes = start_workers(lambda i: [*(paused if i == 1 else fit), str(shapes), *args],
                              tmp_path, lambda i: timeout)
    chief, other = processes
    try:
        deadline = time.monotonic() + LIMIT
        while not marker.exists():  # worker 1 waits at epoch 2, batch 1
            assert chief.poll() is None and other.poll() is None, "a worker ended early"
            assert time.monotonic() < deadline, "worker 1 never reached epoch 2"
            time.sleep(0.2)
        stopped = time.monotonic()
        if failure == "killed":
            other.send_signal(signal.SIGKILL)
        chief.wait(timeout=60)
        seconds = time.monotonic() - stopped
    finally:
        wait(processes, 0)
    error = logs(tmp_path)[0]
    print(f"worker 0 stopped {seconds:.1f} s after worker 1 was {failure}")
    assert chief.returncode == 1, error[-5000:]
    cause = ("no answer within the collective timeout of 10 s" if failure == "hung"
             else "lost contact with worker 1")
    assert f"Error: Worker 0 of 2 stopped training: {cause}" in error
    assert seconds < (30 if failure == "hung" else 45)
    run = next((tmp_path / "runs" / "shapes").iterdir())
    assert f"restart every worker with `--resume {run.relative_to(tmp_path)}`" in error
    if failure == "hung":
        return

    resumed = start_workers(lambda i: [*fit, "--resume", str(run)], tmp_path, name="resume")
    wait(resumed, LIMIT)
    outputs = logs(tmp_path, "resume")
    for process, output in zip(resumed, outputs):
        assert process.returncode == 0, output[-5000:]
    assert "Resuming at stage 1/1, after epoch 1" in outputs[1]
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert (tmp_path / "saved_models" / "shapes" / "1" / "saved_model.pb").exists()
    assert not list(run.rglob("state*.npz"))


def test_workers_with_other_data_stop_at_once_naming_what_differs(shapes, tmp_path):
    renamed = write_image_folder(tmp_path / "renamed", classes=("a", "b", "d"), per_class=16,
                                 size=16)  # the same images; the third class named otherwise
    folders = [shapes, renamed]
    args = ["--image-size", "16", "--epochs", "1", "--augment", "none", "--flip", "none",
            "--batch-size", "8"]
    processes = start_workers(lambda i: [sys.executable, "-m", "tlkit.cli", "fit",
                                         str(folders[i]), *args], tmp_path)
    wait(processes, LIMIT)
    for index, (process, output) in enumerate(zip(processes, logs(tmp_path))):
        assert process.returncode == 1, output[-5000:]
        assert ("Error: The workers differ from the chief (worker 0) in: worker 1: class "
                f"names. Every worker needs the same data folder content, settings and "
                f"initial weights. (This is worker {index}.)") in output
    assert not list((tmp_path / "runs").rglob("state.npz"))


def test_options_are_validated_like_keras():
    with pytest.raises(ConfigError, match=r"`distribute` must be one of \['auto', 'none', "
                                          r"'mirrored', 'multi-worker'\]\. Received: "
                                          r"distribute='horovod'"):
        TrainConfig(distribute="horovod")
    with pytest.raises(ConfigError, match=r"`jit` must be one of \['auto', 'on', 'off'\]"):
        TrainConfig(jit=True)
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="yes")
    cluster = Cluster(SimpleNamespace(num_replicas_in_sync=3), "mirrored", 0, 1, 60.0)
    with pytest.raises(ConfigError, match="divisible by the 3 replicas in sync. Received: "
                                          "batch_size=32"):
        check_batch_size(cluster, 32)
    check_batch_size(cluster, 33)


def test_auto_resolves_from_tf_config_and_the_devices(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr("tlkit.distribute.gpu_count", lambda: 0)
    assert resolve_distribute("auto") == "none"
    assert resolve_jit("auto", "none") == "off"  # CPU: measured slower (benchmarks/jit.py)
    with pytest.raises(ConfigError, match="needs the TF_CONFIG environment variable"):
        resolve_distribute("multi-worker")
    monkeypatch.setattr("tlkit.distribute.gpu_count", lambda: 2)
    assert resolve_distribute("auto") == "mirrored"
    assert resolve_jit("auto", "none") == "on"  # Keras's choice with a GPU
    assert resolve_jit("auto", "mirrored") == "off"  # and under tf.distribute
    assert resolve_jit("off", "none") == "off"
    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert resolve_distribute("auto") == "multi-worker"
    assert worker_index() == 2  # the chief is worker 0
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG must be JSON"):
        resolve_distribute("auto")

    monkeypatch.delenv("TF_CONFIG")
    config = tlkit.build_config(data_dir=str(tmp_path), distribute="auto", jit="auto")
    train = resolve_config(config).train
    assert (train.distribute, train.jit) == ("mirrored", "off")


def test_a_saved_config_without_the_new_fields_still_loads(tmp_path):
    config = tlkit.build_config(data_dir=str(tmp_path)).to_dict()
    for key in ("distribute", "mixed_precision", "jit"):
        del config["train"][key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tlkit.FitConfig.load(tmp_path / "config.json").train
    assert (loaded.distribute, loaded.mixed_precision, loaded.jit) == ("auto", False, "auto")


def small_dataset(size=16, n=40, classes=3):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    images[labels == 1, : size // 2] *= 0.3
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8), images, labels


def history(strategy=None, policy="float32", **options):
    """Losses and accuracies of 3 epochs of LeNet-5 (no dropout: XLA draws other random
    numbers) built in `strategy`'s scope, computing in `policy`."""
    keras.utils.set_random_seed(2)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = copy_classifier(build_classifier("lenet5", 3, 32, dropout=0.0), policy)
    dataset, _, _ = small_dataset(size=32)
    result = Trainer(model, verbose=0, strategy=strategy, **options).train_stage(
        dataset, dataset, epochs=3, learning_rate=1e-3)
    return [float(h[k]) for h in result.history for k in ("loss", "accuracy", "val_loss")]


def test_mirrored_strategy_on_one_device_trains_like_no_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    plain = history()
    assert history(strategy) == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert history(strategy, jit_compile=True) == pytest.approx(plain, rel=1e-3, abs=1e-4)


def test_a_model_must_be_built_in_the_strategy_scope():
    with pytest.raises(ConfigError, match=r"must be built inside `strategy.scope\(\)`"):
        Trainer(build_classifier("lenet5", 2, 32),
                strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))


@MIXED
def test_mixed_precision_computes_in_low_precision_with_output_and_loss_in_float32():
    _, images, labels = small_dataset()
    model = build_classifier("scratch", 3, 16)
    mixed = copy_classifier(model, "mixed_bfloat16")
    conv = mixed.get_layer("backbone").get_layer("block1_conv1")
    assert (conv.compute_dtype, conv.kernel.dtype) == ("bfloat16", "float32")
    assert mixed.get_layer("predictions").compute_dtype == "float32"
    probabilities = mixed(images, training=False)
    loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    assert (probabilities.dtype, loss.dtype) == (tf.float32, tf.float32)
    np.testing.assert_allclose(probabilities, model(images, training=False), atol=0.02)
    back = copy_classifier(mixed)  # what the export is made from
    assert {layer.dtype_policy.name for layer in back._flatten_layers()} == {"float32"}
    np.testing.assert_array_equal(back(images), model(images))

    half = copy_classifier(model, "mixed_float16")
    optimizers = []
    dataset, _, _ = small_dataset()
    result = Trainer(half, verbose=0).train_stage(
        dataset, dataset, epochs=2, learning_rate=1e-3,
        on_epoch_end=lambda p: optimizers.append(p.optimizer))
    assert isinstance(optimizers[0], keras.optimizers.LossScaleOptimizer)  # float16 scales
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert history(policy="mixed_bfloat16") == pytest.approx(history(), rel=0.1, abs=0.05)


@pytest.mark.slow
@MIXED
def test_mixed_precision_reaches_float32_accuracy_on_digits(digits_dir, digits_run, tmp_path):
    """The shared float32 digits run, trained again in bfloat16 with the same settings."""
    result = tlkit.fit(digits_dir, runs_dir=tmp_path / "runs", export_dir=tmp_path / "ex",
                       name="mixed", mixed_precision=True, **DIGITS_RUN)
    float32 = json.loads((digits_run.run_dir / "result.json").read_text())["metrics"]
    first = json.loads((digits_run.run_dir / "history.json").read_text())[0]
    assert result.history[0]["loss"] != first["loss"]  # another computation
    for split in ("val", "test"):
        reference = float32[split]["accuracy"]
        accuracy = result.metrics[split]["accuracy"]
        print(f"mixed precision: {split} accuracy {accuracy:.4f}, float32 {reference:.4f}")
        assert reference > 0.9
        assert abs(accuracy - reference) <= 0.02


def test_fit_with_jit_on_trains_through_xla_like_without(shapes, tmp_path):
    """`jit="on"` reaches the trainer: the history is another computation (XLA rounds
    differently) that follows the one without XLA (test_trainer_options checks the train
    step itself). LeNet-5 without dropout: XLA draws other random numbers."""
    common = dict(backbone="lenet5", dropout=0.0, epochs=2, augment="none", flip="none",
                  batch_size=8,
                  seed=3, verbose=0, runs_dir=tmp_path / "runs", export_dir=tmp_path / "ex")
    plain = tlkit.fit(shapes, name="plain", jit="off", **common)
    xla = tlkit.fit(shapes, name="xla", jit="on", **common)
    saved = json.loads((xla.run_dir / "config.json").read_text())
    assert (saved["train"]["jit"], saved["requested"]["train"]["jit"]) == ("on", "on")
    keys = ("loss", "accuracy", "val_loss")
    losses = [[h[k] for h in result.history for k in keys] for result in (plain, xla)]
    assert losses[1] != losses[0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-4)
