"""Grad-CAM: the heatmap finds the class evidence, from an export alone."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkit
from tlkit.errors import ConfigError
from tlkit.explain import explain_files
from tlkit.gradcam import default_layer, make_gradcam
from tlkit.images import load_image
from tlkit.models import build_classifier

SIZE = 32


def corner_image(rng, with_square):
    image = rng.integers(0, 90, (SIZE, SIZE, 3), dtype=np.uint8)
    if with_square:
        image[2:12, 2:12] = 230
    return image


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    """A scratch CNN that tells 'a bright square in the top-left corner' from 'no square'."""
    root = tmp_path_factory.mktemp("corner")
    rng = np.random.default_rng(0)
    for name, with_square in (("corner", True), ("plain", False)):
        (root / "data" / name).mkdir(parents=True)
        for index in range(40):
            Image.fromarray(corner_image(rng, with_square)).save(
                root / "data" / name / f"{index}.png")
    cwd = os.getcwd()
    os.chdir(root)  # a relative runs_dir: the export must still find its run folder
    try:
        result = tlkit.fit(root / "data", backbone="scratch", image_size=SIZE, epochs=6,
                           augment="none", flip="none", verbose=0, runs_dir="runs",
                           export_dir=root / "sm")
    finally:
        os.chdir(cwd)
    assert result.metrics["val"]["accuracy"] >= 0.9
    return root, result


def quadrant_masses(heatmap):
    half = heatmap.shape[0] // 2
    return {"top-left": heatmap[:half, :half].sum(), "top-right": heatmap[:half, half:].sum(),
            "bottom-left": heatmap[half:, :half].sum(),
            "bottom-right": heatmap[half:, half:].sum()}


def test_heatmap_mass_sits_on_the_class_evidence(corner_run):
    root, result = corner_run
    explain = tlkit.load(result.export_path).signature("explain_images")
    rng = np.random.default_rng(99)
    images = np.stack([corner_image(rng, True) for _ in range(6)]).astype("float32")
    corner_id = ["corner", "plain"].index("corner")
    out = explain(images=tf.constant(images), class_ids=tf.constant([corner_id] * 6, tf.int64))
    heatmaps = out["heatmaps"].numpy()
    assert heatmaps.shape == (6, SIZE, SIZE)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 + 1e-6
    for heatmap in heatmaps:
        masses = quadrant_masses(heatmap)
        assert max(masses, key=masses.get) == "top-left", masses
        assert masses["top-left"] > 0.4 * sum(masses.values())


def test_bytes_signature_equals_image_signature_and_top_class(corner_run, tmp_path):
    root, result = corner_run
    classifier = tlkit.load(result.export_path)
    file = next((root / "data" / "corner").glob("*.png"))
    image = load_image(file, SIZE)
    by_bytes = classifier.signature("explain")(
        image_bytes=tf.constant([file.read_bytes()]), class_ids=tf.constant([-1], tf.int64))
    by_image = classifier.signature("explain_images")(
        images=tf.constant(image[None], tf.float32), class_ids=tf.constant([-1], tf.int64))
    np.testing.assert_allclose(by_bytes["heatmaps"], by_image["heatmaps"], atol=1e-5)
    predicted = classifier.predict_arrays(image[None])
    assert int(by_image["class_ids"][0]) == int(predicted.argmax())
    np.testing.assert_allclose(by_image["probabilities"], predicted, atol=1e-5)


def test_explain_files_writes_pngs_and_checks_arguments(corner_run, tmp_path):
    root, result = corner_run
    files = sorted((root / "data" / "plain").glob("*.png"))[:2]
    items = explain_files(files, result.export_path, class_name="corner",
                          output_dir=tmp_path / "out")
    assert [item["class"] for item in items] == ["corner", "corner"]
    for item in items:
        with Image.open(item["png"]) as png:
            assert png.format == "PNG" and png.width >= 400 and png.height >= 200
    custom = explain_files(files[:1], result.export_path, layer="block1_pool",
                           output_dir=tmp_path / "custom")
    assert custom[0]["class"] == "plain"  # run from another folder than fit's
    with pytest.raises(ConfigError, match="`class_name` must be one of"):
        explain_files(files, result.export_path, class_name="dog", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="`layer` must be one of"):
        explain_files(files, result.export_path, layer="nope", output_dir=tmp_path)


def test_files_with_the_same_name_get_their_own_heatmap(corner_run, tmp_path):
    root, result = corner_run
    data = root / "data"
    files = [data / "corner" / "0.png", data / "plain" / "0.png", data / "plain" / "1.png",
             data / "plain" / "1.png"]
    items = explain_files(files, result.export_path, output_dir=tmp_path)
    assert [Path(item["png"]).name for item in items] == [
        "corner_0_gradcam.png", "plain_0_gradcam.png", "plain_1_3_gradcam.png",
        "plain_1_4_gradcam.png"]
    assert [item["class"] for item in items] == ["corner", "plain", "plain", "plain"]
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_default_layers():
    assert default_layer(build_classifier("lenet5", 2, 32)) == "s4"
    scratch = build_classifier("scratch", 2, 32)
    assert default_layer(scratch) == "block3_dropout"
    _, layer = make_gradcam(build_classifier("vgg16", 2, 32))
    assert layer == "block5_conv3"  # 2x2 at 32 px; block5_pool is 1x1
