"""Argument checks shared by every module: one error template, Keras's.

Each check raises `ConfigError` naming the argument, what it must be, and the value received:
"`epochs` must be an integer >= 1. Received: epochs=0".
"""

import math
import numbers

from tlkit.errors import ConfigError


def check_choice(name, value, choices):
    """Checks that argument `name` is one of `choices`.

    Raises:
        ConfigError: "`name` must be one of [...]. Received: name=value".
    """
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")


def check_bool(name, value):
    """Checks that argument `name` is True or False (not 1 or 0: a setting says what it
    means).

    Raises:
        ConfigError: "`name` must be True or False. Received: name=value".
    """
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be True or False. Received: {name}={value!r}")


def check_number(name, value, low, high=math.inf, *, integer=False, low_open=False):
    """Checks that argument `name` is a number (not a bool) within `low`..`high`.

    Args:
        name: the argument's name, for the message.
        value: the value received.
        low: the smallest value allowed (excluded if `low_open`).
        high: the largest value allowed.
        integer: the value must be an integer.
        low_open: `low` itself is not allowed.

    Raises:
        ConfigError: "`name` must be an integer >= low. Received: name=value".
    """
    kind = numbers.Integral if integer else numbers.Real
    bad_type = isinstance(value, bool) or not isinstance(value, kind)
    if bad_type or value < low or value > high or (low_open and value == low):
        span = f"{'>' if low_open else '>='} {low}"
        if high != math.inf:
            span += f" and <= {high}"
        what = "an integer" if integer else "a number"
        raise ConfigError(f"`{name}` must be {what} {span}. Received: {name}={value!r}")


def check_thresholds(thresholds, num_classes):
    """Checks a multi-label model's decision thresholds: one value in [0, 1] per class.

    Returns:
        The thresholds as float32-exact Python floats (as a graph holds them).

    Raises:
        ConfigError: "`thresholds` must hold one value in [0, 1] per class (n). Received:
            thresholds=[...]".
    """
    import numpy as np  # here: the other checks, and config.py, need no numpy

    values = np.asarray(thresholds, np.float64)
    if values.shape != (num_classes,) or not np.all((values >= 0) & (values <= 1)):
        raise ConfigError(f"`thresholds` must hold one value in [0, 1] per class "
                          f"({num_classes}). Received: thresholds={list(thresholds)!r}")
    return [float(np.float32(v)) for v in values]
