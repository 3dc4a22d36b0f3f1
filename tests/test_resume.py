"""Interrupted runs resume: SIGKILL mid-epoch loses at most that epoch."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tlkit
from tlkit.checkpoint import STATE_FILE, load_state
from tlkit.errors import ConfigError

from conftest import write_image_folder

PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"

EPOCHS = 4
# Nothing random in an epoch but the shuffle, and one batch per epoch, so its order does not
# change the step: a resumed run then repeats the uninterrupted one epoch for epoch (a new
# dataset's shuffle and a new dropout seed state would otherwise start over on resume).
FIT_ARGS = ["--backbone", "lenet5", "--image-size", "32", "--dropout", "0", "--epochs",
            str(EPOCHS), "--patience", "10", "--augment", "none", "--flip", "none",
            "--batch-size", "64", "--seed", "3", "--lr", "3e-4"]


def run_tlkit(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tlkit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=("a", "b"),
                              per_class=24, size=16)


@pytest.mark.slow
def test_sigkill_during_epoch_2_then_resume_matches_an_uninterrupted_run(folder, tmp_path):
    reference = run_tlkit(["fit", str(folder), *FIT_ARGS, "--name", "ref", "-q"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    ref_run = next((tmp_path / "runs" / "ref").iterdir())
    ref_history = json.loads((ref_run / "history.json").read_text())

    marker = tmp_path / "paused"
    process = subprocess.Popen([sys.executable, str(PAUSED_CLI), "all:2:1", str(marker), "fit",
                                str(folder), *FIT_ARGS, "--name", "killed", "-q"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, "fit ended before reaching the pause point"
            assert time.monotonic() < deadline, "fit never reached epoch 2, batch 1"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    run = next((tmp_path / "runs" / "killed").iterdir())
    state = load_state(run)
    assert state.stage_index == 0 and state.stage.epoch == 1  # epoch 1 saved, 2 was lost
    assert not (tmp_path / "saved_models" / "killed").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".state-")]

    resumed = run_tlkit(["fit", "--resume", str(run), "-q"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    metrics = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert [h[k] for h in history for k in metrics] == pytest.approx(
        [h[k] for h in ref_history for k in metrics], rel=1e-5)
    assert not list(run.glob("state*"))  # cleared once the run finished, bases too
    export = resumed.stdout.strip().splitlines()[-1]
    assert tlkit.load(tmp_path / export).class_names == ["a", "b"]


def test_ctrl_c_in_stage_2_then_resume_finishes_the_schedule(folder, tmp_path):
    common = dict(image_size=16, augment="none", flip="none", batch_size=8, seed=5,
                  verbose=0, runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm")
    first = tlkit.fit(folder, epochs=2, patience=10, name="a", **common)
    staged = dict(weights=str(first.run_dir / "backbone.weights.h5"), epochs=2,
                  fine_tune_epochs=3, unfreeze=1, patience=10, name="b", **common)

    def interrupt(stage, epoch, batch):
        if (stage, epoch, batch) == ("block2", 2, 1):
            raise KeyboardInterrupt

    with pytest.raises(tlkit.api.Interrupted, match="Resume with `resume='"):
        tlkit.fit(folder, on_batch_end=interrupt, **staged)
    run = next((tmp_path / "runs" / "b").iterdir())
    state = load_state(run)
    assert (state.stage_index, state.stage.epoch, state.epochs_done) == (1, 1, 3)
    assert state.stage.optimizer_state is not None

    done = tlkit.fit(resume=run, verbose=0)
    assert [(h["stage"], h["epoch"]) for h in done.history] == [
        ("head", 1), ("head", 2), ("block2", 1), ("block2", 2), ("block2", 3)]
    schedule = json.loads((run / "schedule.json").read_text())
    assert [s["stage"] for s in schedule] == ["head", "block2"]
    assert not list(run.glob("state*"))
    with pytest.raises(ConfigError, match="already finished"):
        tlkit.fit(resume=run)
    with pytest.raises(ConfigError, match="only `verbose`"):
        tlkit.fit(folder, resume=run)


def test_state_round_trip_is_exact(tmp_path):
    import keras

    from tlkit.checkpoint import RunState, save_state
    from tlkit.schedule import StageProgress, StageResult

    optimizer = keras.optimizers.Adam(1e-3)
    variable = keras.Variable(np.ones((2, 3), "float32"))
    optimizer.build([variable])
    optimizer.apply([np.full((2, 3), 0.5, "float32")], [variable])
    progress = StageProgress(epoch=3, history=[{"loss": 1.0}], best=0.5, best_epoch=2,
                             waited=1, best_weights=[np.arange(4.0)])
    progress.optimizer = optimizer
    finished = [StageResult("head", [{"loss": 2.0}], 1, {"val_loss": 0.7})]
    save_state(tmp_path, RunState(1, finished, 0.7, [np.zeros(2)], progress, [np.ones(3)]))
    state = load_state(tmp_path)
    assert state.stage_index == 1 and state.best == 0.7
    assert state.finished[0].name == "head" and state.finished[0].best == {"val_loss": 0.7}
    assert (state.stage.epoch, state.stage.best_epoch, state.stage.waited) == (3, 2, 1)
    np.testing.assert_array_equal(state.stage.best_weights[0], np.arange(4.0))
    np.testing.assert_array_equal(state.current_weights[0], np.ones(3))
    np.testing.assert_array_equal(state.rollback_weights[0], np.zeros(2))
    saved = [v.numpy() for v in optimizer.variables]
    assert len(state.stage.optimizer_state) == len(saved)
    for a, b in zip(state.stage.optimizer_state, saved):
        np.testing.assert_array_equal(a, b)
    assert state.epochs_done == 4



def test_state_writer_writes_unchanged_weights_once_and_states_load_exactly(tmp_path):
    from tlkit.checkpoint import BASE_PREFIX, PREVIOUS_STATE_FILE, RunState, StateWriter
    from tlkit.schedule import StageProgress

    rng = np.random.default_rng(0)
    frozen = rng.normal(size=(256, 256)).astype("float32")  # 256 kB: the "backbone"

    def weights(head):
        return [frozen, np.full(4, head, "float32")]

    def state(head, best_head, rollback_head=None):
        progress = StageProgress(epoch=1, best_weights=weights(best_head))
        rollback = weights(rollback_head) if rollback_head is not None else None
        return RunState(0, [], 0.5, rollback, progress, weights(head))

    def check(loaded, expected):
        for got, want in zip((loaded.current_weights, loaded.stage.best_weights,
                              loaded.rollback_weights),
                             (expected.current_weights, expected.stage.best_weights,
                              expected.rollback_weights)):
            assert (got is None) == (want is None)
            for a, b in zip(got or [], want or []):
                np.testing.assert_array_equal(a, b)

    writer = StateWriter(tmp_path, keep_previous=True)
    first = state(1.0, 1.0)
    writer.save(first)
    bases = sorted(p.name for p in tmp_path.glob(f"{BASE_PREFIX}*"))
    assert bases == [f"{BASE_PREFIX}1.npz"]
    check(load_state(tmp_path), first)
    second = state(2.0, 1.0, rollback_head=3.0)  # the head trained on; the backbone did not
    writer.save(second)
    assert sorted(p.name for p in tmp_path.glob(f"{BASE_PREFIX}*")) == bases
    assert (tmp_path / STATE_FILE).stat().st_size < frozen.nbytes / 4  # the head only
    check(load_state(tmp_path), second)
    check(load_state(tmp_path, previous=True), first)

    frozen = rng.normal(size=(256, 256)).astype("float32")  # a stage changed the backbone
    third = state(4.0, 4.0)
    writer.save(third)
    check(load_state(tmp_path), third)
    check(load_state(tmp_path, previous=True), second)  # its base is kept for it
    assert len(list(tmp_path.glob(f"{BASE_PREFIX}*"))) == 2
    writer.save(third)
    assert [p.name for p in tmp_path.glob(f"{BASE_PREFIX}*")] == [f"{BASE_PREFIX}2.npz"]
    check(load_state(tmp_path, previous=True), third)
    assert (tmp_path / PREVIOUS_STATE_FILE).exists()


def test_run_folder_json_is_replaced_whole_never_rewritten_in_place(tmp_path):
    from tlkit.api import _write_json

    path = tmp_path / "result.json"
    _write_json(path, {"run": 1})
    with open(path) as reader:  # a reader of the old file (`--resume` checking it, say)
        _write_json(path, {"run": 2, "more": "x" * 100})
        assert json.loads(reader.read()) == {"run": 1}
    assert json.loads(path.read_text())["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
