"""The training report: TensorBoard logs per epoch and a model card in the export."""

import importlib.util

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkit
from tlkit.errors import ConfigError


def scalars(folder):
    values = {}
    for event_file in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") \
                    else value.simple_value
                values.setdefault(value.tag, []).append((event.step, float(number)))
    return values


def test_tensorboard_logs_and_model_card(image_folder, tmp_path):
    folder = image_folder(per_class=8, size=16)
    result = tlkit.fit(folder, image_size=16, epochs=3, patience=5, augment="none",
                       flip="none", test_split=0.2, tensorboard=True, verbose=0,
                       runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm")
    logged = scalars(result.run_dir / "tensorboard")
    assert [step for step, _ in logged["loss"]] == list(range(1, len(result.history) + 1))
    np.testing.assert_allclose([v for _, v in logged["val_loss"]],
                               [h["val_loss"] for h in result.history], rtol=1e-5)

    card = (result.export_path / "assets" / "MODEL_CARD.md").read_text()
    for section in ("# Model card", "## Data", "## Training", "## Metrics", "## Limitations"):
        assert section in card
    assert "| a |" in card and "| b |" in card
    accuracy = result.metrics["test"]["accuracy"]
    assert f"{accuracy:.4f}" in card
    with Image.open(result.run_dir / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width >= 800


def test_tensorboard_is_off_by_default(image_folder, tmp_path):
    result = tlkit.fit(image_folder(per_class=6, size=16), image_size=16, epochs=1,
                       augment="none", flip="none", verbose=0, runs_dir=tmp_path / "runs",
                       export_dir=tmp_path / "sm")
    assert not (result.run_dir / "tensorboard").exists()


def test_tensorboard_without_its_package_says_how_to_install_it(image_folder, tmp_path,
                                                               monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard"
                        else find_spec(name, *args))
    with pytest.raises(ConfigError, match="needs the tensorboard package: pip install"):
        tlkit.fit(image_folder(per_class=6, size=16), image_size=16, epochs=1,
                  tensorboard=True, augment="none", flip="none", verbose=0,
                  runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm")
