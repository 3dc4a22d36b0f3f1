"""Real ImageNet weights: MobileNet v1 behind tlkit's image contract sees real photos as
ImageNet does, and `tlkit fit` transfers from it.

The weights are Google's ImageNet MobileNet v1, made offline from a PyPI sdist by the
`imagenet_mobilenet` fixture and loaded through Keras's own `weights="imagenet"` path. The
photos ship with scikit-image and matplotlib. These tests guard the classic transfer bug:
the wrong preprocessing (or resize) makes every photo look like one class.
"""

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import skimage
from click.testing import CliRunner
from PIL import Image

from tlkit.cli import main as cli
from tlkit.models import build_backbone

# ImageNet-1k class indices (Keras's order) of what each photo shows.
ESPRESSO, MILITARY_UNIFORM = 967, 652
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
TWO_WHEELERS = {665, 670}  # moped, motor scooter


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    for name, pixels in (("coffee", skimage.data.coffee()), ("chelsea", skimage.data.chelsea()),
                         ("motorcycle", skimage.data.stereo_motorcycle()[0])):
        paths[name] = folder / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    paths["grace_hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return paths


def test_imagenet_mobilenet_sees_real_photos_as_imagenet_does(imagenet_mobilenet, photos):
    from benchmarks.mobilenet_weights import classify_photo

    top1 = {name: classify_photo(path)[0] for name, path in photos.items()}
    assert top1["coffee"][0] == ESPRESSO and top1["coffee"][1] > 0.9
    assert top1["chelsea"][0] in CATS and top1["chelsea"][1] > 0.5
    assert top1["grace_hopper"][0] == MILITARY_UNIFORM
    assert top1["motorcycle"][0] in TWO_WHEELERS
    assert len({index for index, _ in top1.values()}) == len(top1)


def test_tlkit_backbone_is_keras_imagenet_network_at_every_size(imagenet_mobilenet, photos):
    import keras

    from tlkit.images import load_image
    from tlkit.layers import Preprocess

    full = keras.applications.MobileNet(weights="imagenet")
    features = keras.Model(full.input, full.get_layer("conv_pw_13_relu").output)
    pixels = load_image(photos["coffee"], 224).astype("float32")[None]
    inputs = Preprocess("tf")(pixels)
    ours = build_backbone("mobilenet", 224, "imagenet")
    np.testing.assert_allclose(ours(inputs), features(inputs), atol=1e-5)
    # Sizes without a weights file of their own (96) and with one (160) hold the same values.
    for size in (96, 160):
        for mine, reference in zip(build_backbone("mobilenet", size, "imagenet").get_weights(),
                                   ours.get_weights()):
            np.testing.assert_array_equal(mine, reference)


def crops(pixels, count, size, rng):
    height, width = pixels.shape[:2]
    for _ in range(count):
        top, left = rng.integers(0, height - size), rng.integers(0, width - size)
        yield pixels[top:top + size, left:left + size]


def test_fit_on_photos_transfers_from_imagenet_by_default(imagenet_mobilenet, tmp_path):
    rng = np.random.default_rng(0)
    sources = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    for split, count in (("data", 10), ("unseen", 3)):
        for name, pixels in sources.items():
            (tmp_path / split / name).mkdir(parents=True)
            for index, crop in enumerate(crops(pixels, count, 240, rng)):
                Image.fromarray(crop).save(tmp_path / split / name / f"{index}.jpg")
    fit = CliRunner().invoke(cli, [
        "fit", str(tmp_path / "data"), "--image-size", "96", "--epochs", "8", "--unfreeze",
        "0", "--export-dir", str(tmp_path / "sm"), "--runs-dir", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache")])
    assert fit.exit_code == 0, fit.output
    assert "auto backbone: mobilenet with ImageNet weights (the images are 240 px" in fit.output
    predict = CliRunner().invoke(cli, ["predict", str(tmp_path / "unseen"), "--model",
                                       str(tmp_path / "sm" / "data"), "--format", "json"])
    assert predict.exit_code == 0, predict.output
    rows = json.loads(predict.stdout)
    assert len(rows) == 6
    assert all(Path(row["file"]).parent.name == row["labels"][0] for row in rows), rows
