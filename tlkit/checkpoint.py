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
BASE_PREFIX = "state.base-"  # `StateWriter`'s files of weights written once
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


class StateWriter:
    """Saves a run's state after every epoch, writing unchanged weights only once.

    The weights of a state (the current ones, the stage's best, the ones to roll back to)
    are mostly the same arrays: while a stage trains the head, the backbone's tens of
    megabytes never change. The writer keeps a base, the current weights written once to
    `state.base-<n>.npz`; each `state.npz` stores only the arrays that differ from it, and
    names its base. A new base is written when less than half of the weights' bytes still
    match the old one (a stage unfroze more). Files are written atomically, the base before
    the state that names it, so a kill at any moment leaves a readable state; bases no state
    names are removed.

    Args:
        folder: the run folder (or a worker's folder).
        keep_previous: before each save, keep the state saved before as `state.previous.npz`.
    """

    def __init__(self, folder, keep_previous=False):
        self.folder = Path(folder)
        self.keep_previous = keep_previous
        self._base_name, self._base = None, None

    def save(self, state):
        """Writes `state` (a `RunState`) to `<folder>/state.npz`."""
        folder = self.folder
        meta = {"stage_index": state.stage_index, "best": state.best,
                "finished": [dataclasses.asdict(r) for r in state.finished],
                "stage": state.stage.to_dict()}
        optimizer = state.stage.optimizer
        optimizer_state = ([v.numpy() for v in optimizer.variables] if optimizer is not None
                           else state.stage.optimizer_state)
        groups = dict(zip(_GROUPS, (state.current_weights, state.rollback_weights,
                                    state.stage.best_weights, optimizer_state)))
        current = [np.asarray(w) for w in state.current_weights or []]
        same = self._matching(current)
        if current and 2 * sum(current[i].nbytes for i in same) < sum(w.nbytes for w in current):
            self._write_base(current)
            same = set(range(len(current)))
        arrays, from_base = {}, {}
        for group, values in groups.items():
            for index, value in enumerate(values or []):
                value = np.asarray(value)
                in_base = (index in same if group == "current" else
                           group != "optimizer" and self._in_base(index, value))
                if in_base:
                    from_base.setdefault(group, []).append(index)
                else:
                    arrays[f"{group}/{index}"] = value
        meta.update(base=self._base_name if from_base else None, from_base=from_base,
                    sizes={g: len(v or []) for g, v in groups.items()})
        arrays["meta"] = np.array(json.dumps(meta))
        if self.keep_previous and (folder / STATE_FILE).exists():
            os.replace(folder / STATE_FILE, folder / PREVIOUS_STATE_FILE)
        write_atomically(folder / STATE_FILE, lambda f: np.savez(f, **arrays))
        self._remove_unused_bases()

    def _in_base(self, index, value):
        base = self._base
        return (base is not None and index < len(base) and base[index].shape == value.shape
                and base[index].dtype == value.dtype and np.array_equal(base[index], value))

    def _matching(self, weights):
        """Indices of the arrays of `weights` equal to the base's (none if the base is of
        another model)."""
        if self._base is None or len(self._base) != len(weights):
            return set()
        return {i for i, w in enumerate(weights) if self._in_base(i, w)}

    def _write_base(self, weights):
        taken = {p.name for p in self.folder.glob(f"{BASE_PREFIX}*.npz")}
        number = 1
        while f"{BASE_PREFIX}{number}.npz" in taken:
            number += 1
        name = f"{BASE_PREFIX}{number}.npz"
        base = [np.array(w) for w in weights]  # a copy: the caller's arrays may change
        write_atomically(self.folder / name, lambda f: np.savez(
            f, **{str(i): a for i, a in enumerate(base)}))
        self._base_name, self._base = name, base

    def _remove_unused_bases(self):
        used = {_base_of(self.folder / name) for name in (STATE_FILE, PREVIOUS_STATE_FILE)}
        for path in self.folder.glob(f"{BASE_PREFIX}*.npz"):
            if path.name not in used:
                path.unlink(missing_ok=True)


def _base_of(path):
    """The base file a saved state names, or None."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return json.loads(str(saved["meta"])).get("base")
    except (OSError, ValueError, KeyError):
        return None


def save_state(folder, state, keep_previous=False):
    """Writes `state` to `<folder>/state.npz` atomically (temporary file, then rename); a
    one-off `StateWriter` (the weights the state's groups share are written once).

    Args:
        folder: the run folder (or a worker's folder).
        state: a `RunState`.
        keep_previous: first rename the state saved before to `state.previous.npz`.
    """
    StateWriter(folder, keep_previous).save(state)


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
            groups = {g: {} for g in _GROUPS}
            for key in saved.files:
                if "/" in key:
                    group, index = key.split("/")
                    groups[group][int(index)] = saved[key]
        if meta.get("base"):
            with np.load(path.parent / meta["base"], allow_pickle=False) as base:
                for group, indices in meta["from_base"].items():
                    for index in indices:
                        groups[group][index] = base[str(index)]
        sizes = meta.get("sizes") or {g: len(v) for g, v in groups.items()}
        arrays = {g: [groups[g][i] for i in range(sizes[g])] or None for g in _GROUPS}
    except (OSError, ValueError, KeyError) as e:
        raise TlkitError(f"Cannot read the saved run state {str(path)!r}: {e}") from None
    stage = StageProgress(**meta["stage"], best_weights=arrays["stage_best"],
                          optimizer_state=arrays["optimizer"])
    return RunState(meta["stage_index"], [StageResult(**r) for r in meta["finished"]],
                    meta["best"], arrays["rollback"], stage, arrays["current"])


def clear_state(folder):
    """Removes the saved state of a finished run (its base files too)."""
    for name in (STATE_FILE, PREVIOUS_STATE_FILE):
        (Path(folder) / name).unlink(missing_ok=True)
    for path in Path(folder).glob(f"{BASE_PREFIX}*.npz"):
        path.unlink(missing_ok=True)
