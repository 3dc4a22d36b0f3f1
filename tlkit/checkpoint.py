"""Run state saved after every epoch, so an interrupted run resumes where it stopped.

Keras's `BackupAndRestore` is not enough for a staged run: it does not restore early-stopping
state or the history, and deletes its checkpoint when `fit` ends. tlkit saves its own state
instead: the stage and epoch reached, the weights, the optimizer's variables, the stage's best
weights and early-stopping counter, the weights to roll back to, and the history. It is one
`.npz` file in the run folder, written to a temporary name and renamed over the old one, so a
kill at any moment leaves either the previous state or the new one, never half of one.

A multi-worker run also keeps each worker's state of the epoch before (`state.previous.npz`):
workers stopped by a failure may have saved one epoch apart, and then resume together from
the earlier one (`tlkit.distribute.agreed_resume_point`).
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlkit.errors import TlkitError
from tlkit.files import write_atomically
from tlkit.schedule import StageProgress, StageResult

STATE_FILE = "state.npz"
PREVIOUS_STATE_FILE = "state.previous.npz"
_GROUPS = ("current", "rollback", "stage_best", "optimizer")


@dataclass
class RunState:
    """Where a staged run is, after its last completed epoch."""

    stage_index: int  # the stage in progress (== number of stages when all are done)
    finished: list  # StageResult of every completed stage
    best: float  # lowest val_loss of the completed stages (the rollback threshold)
    rollback_weights: list | None  # model weights to roll back to
    stage: StageProgress = field(default_factory=StageProgress)  # the stage in progress
    current_weights: list | None = None  # model weights after the last completed epoch

    @property
    def epochs_done(self):
        """Completed epochs over all stages."""
        return sum(len(r.history) for r in self.finished) + self.stage.epoch


def save_state(folder, state, keep_previous=False):
    """Writes `state` to `<folder>/state.npz` atomically (temporary file, then rename).

    Args:
        folder: the run folder (or a worker's folder).
        state: a `RunState`.
        keep_previous: first rename the state saved before to `state.previous.npz`.
    """
    folder = Path(folder)
    meta = {"stage_index": state.stage_index, "best": state.best,
            "finished": [dataclasses.asdict(r) for r in state.finished],
            "stage": state.stage.to_dict()}
    arrays = {"meta": np.array(json.dumps(meta))}
    optimizer = state.stage.optimizer
    optimizer_state = ([v.numpy() for v in optimizer.variables] if optimizer is not None
                       else state.stage.optimizer_state)
    for group, values in zip(_GROUPS, (state.current_weights, state.rollback_weights,
                                       state.stage.best_weights, optimizer_state)):
        for index, value in enumerate(values or []):
            arrays[f"{group}/{index}"] = np.asarray(value)
    if keep_previous and (folder / STATE_FILE).exists():
        os.replace(folder / STATE_FILE, folder / PREVIOUS_STATE_FILE)
    write_atomically(folder / STATE_FILE, lambda f: np.savez(f, **arrays))


def load_state(folder, previous=False):
    """Reads the state saved in a run folder, or returns None if there is none.

    Args:
        folder: the run folder (or a worker's folder).
        previous: read the state of the epoch before (`save_state(keep_previous=True)`).

    Raises:
        TlkitError: if the state file exists but cannot be read.
    """
    path = Path(folder) / (PREVIOUS_STATE_FILE if previous else STATE_FILE)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            groups = {g: [] for g in _GROUPS}
            for key in saved.files:
                if "/" in key:
                    group, index = key.split("/")
                    groups[group].append((int(index), saved[key]))
    except (OSError, ValueError, KeyError) as e:
        raise TlkitError(f"Cannot read the saved run state {str(path)!r}: {e}") from None
    arrays = {g: [a for _, a in sorted(v, key=lambda item: item[0])] or None
              for g, v in groups.items()}
    stage = StageProgress(**meta["stage"], best_weights=arrays["stage_best"],
                          optimizer_state=arrays["optimizer"])
    return RunState(meta["stage_index"], [StageResult(**r) for r in meta["finished"]],
                    meta["best"], arrays["rollback"], stage, arrays["current"])


def clear_state(folder):
    """Removes the saved state of a finished run."""
    for name in (STATE_FILE, PREVIOUS_STATE_FILE):
        (Path(folder) / name).unlink(missing_ok=True)
