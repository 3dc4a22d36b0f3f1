"""Trainer options change speed, never results: several steps per call, XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlkit.models import build_classifier
from tlkit.training import Trainer


def dataset():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (70, 32, 32, 3)).astype("float32")
    labels = np.arange(70) % 3
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)  # 5 batches


def history(**options):
    keras.utils.set_random_seed(4)
    model = build_classifier("lenet5", 3, 32)
    result = Trainer(model, verbose=0, **options).train_stage(
        dataset(), dataset(), epochs=2, learning_rate=1e-3, patience=5)
    return [float(h[key]) for h in result.history for key in ("loss", "accuracy", "val_loss")]


@pytest.mark.parametrize("steps", [2, 3, 8])
def test_several_steps_per_call_give_the_same_training(steps):
    assert history(steps_per_execution=steps) == pytest.approx(history(), rel=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_xla_train_step_trains_alike(steps):
    assert history(jit_compile=True, steps_per_execution=steps) == pytest.approx(
        history(), rel=1e-3, abs=1e-4)


def test_steps_per_execution_is_checked():
    with pytest.raises(ValueError, match="steps_per_execution"):
        Trainer(build_classifier("lenet5", 2, 32), steps_per_execution=0)
