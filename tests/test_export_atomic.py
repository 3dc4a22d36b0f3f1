"""Exports are atomic: an export that fails midway leaves no version behind."""

import errno

import numpy as np
import pytest

import tlkit
from tlkit.errors import ExportError
from tlkit.export import export_classifier, next_version
from tlkit.models import build_classifier


@pytest.fixture(scope="module")
def model():
    return build_classifier("lenet5", 2, 32)


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_disk_full_midway_leaves_nothing_and_the_next_export_takes_version_1(
        model, tmp_path, monkeypatch):
    import tensorflow as tf

    real_save = tf.saved_model.save

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)  # the files exist, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(ExportError, match="No space left on device"):
        export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32, resize="squash")
    assert visible(tmp_path / "m") == []
    assert list((tmp_path / "m").iterdir()) == []  # the staging folder is gone too
    monkeypatch.undo()

    path = export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32, resize="squash")
    assert path.name == "1" and visible(tmp_path / "m") == ["1"]
    assert next_version(tmp_path / "m") == 2


def test_interrupt_during_verification_leaves_no_version(model, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tlkit.export.verify_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32, resize="squash")
    assert list((tmp_path / "m").iterdir()) == []


def test_an_export_that_does_not_reproduce_the_model_is_not_published(model, tmp_path):
    other = build_classifier("lenet5", 2, 32)  # different random weights, same shapes
    from tlkit.export import _write, verify_export

    _write(other, ["a", "b"], tmp_path / "candidate", 32, "squash", {})
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ExportError, match="does not reproduce the model"):
        verify_export(tmp_path / "candidate", model, images)
    verify_export(tmp_path / "candidate", other, images)
    # Probabilities computed beforehand (by the evaluation) are checked the same way.
    with pytest.raises(ExportError, match="does not reproduce the model"):
        verify_export(tmp_path / "candidate", other, images, np.asarray(model(images)))
    verify_export(tmp_path / "candidate", other, images, np.asarray(other(images)))
    with pytest.raises(ExportError, match="verify_probabilities"):
        verify_export(tmp_path / "candidate", other, images, np.asarray(other(images))[:2])


def test_unwritable_export_dir_is_a_clear_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="Cannot create export folder"):
        export_classifier(model, ["a", "b"], blocker / "sub", "m", image_size=32,
                          resize="squash")


def test_not_a_tlkit_export_is_a_clear_error(tmp_path):
    with pytest.raises(tlkit.TlkitError, match="is not a tlkit export"):
        tlkit.load(tmp_path)


def test_overwrite_replaces_a_version_only_once_the_new_one_is_verified(model, tmp_path,
                                                                         monkeypatch):
    first = export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32,
                              resize="squash", version=3)
    with pytest.raises(ExportError, match="pass `overwrite`"):
        export_classifier(model, ["a", "b"], tmp_path, "m", image_size=32, resize="squash",
                          version=3)
    other = build_classifier("lenet5", 2, 32)

    def broken(*args, **kwargs):
        raise ExportError("verification failed")

    monkeypatch.setattr("tlkit.export.verify_export", broken)
    with pytest.raises(ExportError):
        export_classifier(other, ["x", "y"], tmp_path, "m", image_size=32, resize="squash",
                          version=3, overwrite=True)
    assert tlkit.load(first).class_names == ["a", "b"]  # the old version is untouched
    monkeypatch.undo()

    replaced = export_classifier(other, ["x", "y"], tmp_path, "m", image_size=32,
                                 resize="squash", version=3, overwrite=True)
    assert replaced == first and tlkit.load(replaced).class_names == ["x", "y"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["3"]


def test_fit_overwrite_flag(image_folder, tmp_path):
    from click.testing import CliRunner

    from tlkit.cli import main

    folder = image_folder(per_class=4, size=16)
    args = ["fit", str(folder), "--image-size", "16", "--epochs", "1", "--augment", "none",
            "--flip", "none", "--export-dir", str(tmp_path / "sm"), "--runs-dir",
            str(tmp_path / "runs"), "--version", "1", "-q"]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "already exists" in refused.stderr
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
