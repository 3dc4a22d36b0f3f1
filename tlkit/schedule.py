"""Staged schedules and their progress, as plain data: no TensorFlow here.

A schedule is a tuple of `Stage`: what trains (the head, an unfreeze group and everything
above it, or all layers), for how many epochs, at which learning rate. It is written as
`"head:5@1e-3,block5:3@1e-4"` (`parse_stages`) or planned from a few settings
(`plan_stages`). `StageProgress` and `StageResult` are what `tlkit.training` reports and
`tlkit.checkpoint` saves, so that settings and checkpoints can use them without loading
TensorFlow.
"""

import math
import re
from dataclasses import dataclass, field

from tlkit.errors import ConfigError
from tlkit.validation import check_number


@dataclass
class StageProgress:
    """How far a stage has got: what a checkpoint stores to resume it."""

    epoch: int = 0  # last completed epoch of the stage
    history: list = field(default_factory=list)  # its per-epoch logs so far
    best: float = math.inf  # lowest val_loss so far
    best_epoch: int = 0  # the epoch that reached it
    waited: int = 0  # epochs since then (early-stopping counter)
    best_weights: list | None = None  # model weights of the best epoch
    optimizer_state: list | None = None  # optimizer variables to restore on resume
    optimizer: object = field(default=None, repr=False)  # the live optimizer (not saved)

    def to_dict(self):
        """The JSON part (weights and optimizer state are stored as arrays beside it)."""
        return {"epoch": self.epoch, "history": self.history, "best": self.best,
                "best_epoch": self.best_epoch, "waited": self.waited}


@dataclass
class StageResult:
    """What one training stage did."""

    name: str  # stage name
    history: list  # one dict per epoch: stage, epoch, loss, accuracy, val_*, lr, seconds
    best_epoch: int  # 1-based epoch whose weights were kept
    best: dict = field(default_factory=dict)  # metrics of the best epoch
    stopped_early: bool = False  # ended by patience before `epochs`
    rolled_back: bool = False  # its best was worse than the previous stage's: undone
    diverged: bool = False  # every val_loss was NaN: rolled back, nothing kept
    learning_rate: float = 0.0  # the stage's learning rate
    trainable_weights: int = 0  # number of trainable weight tensors during the stage


HEAD = "head"
ALL = "all"


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule: what is trainable, for how long, how fast."""

    target: str  # "head" (backbone frozen), an unfreeze group (it and all above it), "all"
    epochs: int  # most epochs (early stopping may end it sooner)
    learning_rate: float  # Adam's learning rate for the stage

    def __str__(self):
        return f"{self.target}:{self.epochs}@{self.learning_rate:g}"


_STAGE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*:\s*(\d+)\s*@\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*$")


def parse_stages(text, group_names=None):
    """Parses a schedule string such as `"head:5@1e-3,block5:3@1e-4,block4:3@1e-5"`.

    Each comma-separated item is `TARGET:EPOCHS@LEARNING_RATE`, where TARGET is `head`
    (train the head, backbone frozen), `all` (every layer), or an unfreeze group name (that
    group and every group above it train).

    Args:
        text: the schedule string.
        group_names: allowed group names, top first; `None` accepts any name.

    Returns:
        A tuple of `Stage`.

    Raises:
        ConfigError: naming the malformed item and the expected form.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("`stages` must be like 'head:5@1e-3,block5:3@1e-4'. "
                          f"Received: stages={text!r}")
    stages = []
    for item in text.split(","):
        match = _STAGE.match(item)
        if not match:
            raise ConfigError(
                f"`stages` item {item.strip()!r} must be TARGET:EPOCHS@LEARNING_RATE, e.g. "
                f"'head:5@1e-3'. Received: stages={text!r}"
            )
        target, epochs, rate = match.group(1), int(match.group(2)), float(match.group(3))
        allowed = None if group_names is None else [HEAD, *group_names, ALL]
        if allowed is not None and target not in allowed:
            raise ConfigError(
                f"`stages` target must be one of {allowed}. Received: {target!r} in "
                f"stages={text!r}"
            )
        if epochs < 1 or not 0 < rate <= 10:
            raise ConfigError(
                f"`stages` item {item.strip()!r} needs epochs >= 1 and 0 < learning rate "
                f"<= 10. Received: stages={text!r}"
            )
        stages.append(Stage(target, epochs, rate))
    return tuple(stages)


def plan_stages(group_names, pretrained, epochs, learning_rate, unfreeze=1,
                fine_tune_epochs=None, lr_factor=0.1):
    """The default schedule: the head first, then one stage per unfrozen group.

    With a pretrained backbone: `head:epochs@lr`, then `unfreeze` stages, each unfreezing
    the next group from the top at `lr_factor` times the previous learning rate. With a
    randomly initialised backbone a frozen stage is meaningless, so everything trains in one
    stage: `all:epochs@lr`.

    Args:
        group_names: the backbone's unfreeze groups, top first.
        pretrained: whether the backbone starts from trained weights.
        epochs: epochs of the first stage.
        learning_rate: learning rate of the first stage.
        unfreeze: number of groups to unfreeze after the head stage.
        fine_tune_epochs: epochs per unfreezing stage; `None`: same as `epochs`.
        lr_factor: learning-rate factor from one stage to the next.

    Returns:
        A tuple of `Stage`.
    """
    if not pretrained:
        return (Stage(ALL, epochs, learning_rate),)
    check_number("unfreeze", unfreeze, 0, len(group_names), integer=True)
    stages = [Stage(HEAD, epochs, learning_rate)]
    for index, group in enumerate(group_names[:unfreeze], start=1):
        stages.append(Stage(group, fine_tune_epochs or epochs,
                            float(f"{learning_rate * lr_factor ** index:.6g}")))
    return tuple(stages)
