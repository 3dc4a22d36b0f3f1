"""ImageNet MobileNet v1 weights for Keras, made offline from a PyPI source package.

Keras downloads `keras.applications.MobileNet`'s ImageNet weights from the network, which
this project's machines cannot reach. The PyPI sdist `nudity==0.2.3` ships
`nudity/files/retrained_graph.pb`, a TensorFlow 1 graph that keeps Google's TF-slim
MobileNet v1 (1.0, 224) ImageNet weights (Apache-2.0) as Const nodes. This tool reads that
graph with `tf.compat.v1.GraphDef` (the package's own TF1 code is never imported), maps each
tensor one to one onto the Keras layers and writes Keras's legacy h5 weight files under the
names Keras caches its downloads as:

    $KERAS_HOME/models/mobilenet_1_0_224_tf.h5              (with the 1000-class top)
    $KERAS_HOME/models/mobilenet_1_0_{128,160,192,224}_tf_no_top.h5

`keras.applications.MobileNet(weights="imagenet")` (and so `tlkit fit --backbone mobilenet
--weights imagenet`) then loads them exactly as if it had downloaded them. The weights are
made when a test or benchmark needs them and never committed.

    python -m benchmarks.mobilenet_weights KERAS_HOME     # make the files, check on a photo

The check classifies scikit-image's `coffee` photo through tlkit's image contract and the
registry's preprocessing: ImageNet class 967, espresso.
"""

import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "nudity==0.2.3"
GRAPH_MEMBER = "nudity/files/retrained_graph.pb"
SIZES = (128, 160, 192, 224)
TOP_FILE = "mobilenet_1_0_224_tf.h5"
NO_TOP_FILE = "mobilenet_1_0_{size}_tf_no_top.h5"
BLOCKS = 13
SLIM = "MobilenetV1"
# The few ImageNet-1k classes (0-based, Keras's order) the checks name.
IMAGENET_CLASSES = {967: "espresso", 285: "Egyptian cat", 281: "tabby", 282: "tiger cat",
                    652: "military uniform"}


def weight_files(keras_home):
    """The paths of every weights file Keras's MobileNet (alpha 1.0) looks for."""
    models = Path(keras_home) / "models"
    return [models / TOP_FILE] + [models / NO_TOP_FILE.format(size=s) for s in SIZES]


def download_sdist(folder):
    """The `nudity` sdist in `folder`, fetched from PyPI with pip when it is not there yet.

    Raises:
        RuntimeError: if pip cannot fetch it; the message has pip's own output.
    """
    folder = Path(folder)
    found = sorted(folder.glob("nudity-0.2.3.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", str(folder), SDIST]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("nudity-0.2.3.tar.gz"))
    if done.returncode or not found:
        raise RuntimeError(f"Could not download {SDIST} from PyPI (`{' '.join(command)}`):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return found[0]


def read_slim_weights(sdist):
    """Every Const tensor under `MobilenetV1/` of the sdist's graph, by node name."""
    import tensorflow as tf

    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(GRAPH_MEMBER))
        graph = tf.compat.v1.GraphDef.FromString(archive.extractfile(member).read())
    return {node.name: tf.make_ndarray(node.attr["value"].tensor) for node in graph.node
            if node.op == "Const" and node.name.startswith(f"{SLIM}/")}


def keras_layer_weights(slim):
    """The Keras MobileNet layers' weights, in Keras's order, from the slim tensors.

    Returns:
        A list of `(layer name, [(weight name, array)])` in the model's layer order, the
        1000-class `conv_preds` last (slim's 1001 logits without index 0, "background").
    """
    def batchnorm(scope):
        return [(name, slim[f"{scope}/BatchNorm/{name}"])
                for name in ("gamma", "beta", "moving_mean", "moving_variance")]

    layers = [("conv1", [("kernel", slim[f"{SLIM}/Conv2d_0/weights"])]),
              ("conv1_bn", batchnorm(f"{SLIM}/Conv2d_0"))]
    for block in range(1, BLOCKS + 1):
        dw, pw = f"{SLIM}/Conv2d_{block}_depthwise", f"{SLIM}/Conv2d_{block}_pointwise"
        layers += [(f"conv_dw_{block}", [("depthwise_kernel", slim[f"{dw}/depthwise_weights"])]),
                   (f"conv_dw_{block}_bn", batchnorm(dw)),
                   (f"conv_pw_{block}", [("kernel", slim[f"{pw}/weights"])]),
                   (f"conv_pw_{block}_bn", batchnorm(pw))]
    logits = f"{SLIM}/Logits/Conv2d_1c_1x1"
    layers.append(("conv_preds", [("kernel", slim[f"{logits}/weights"][..., 1:]),
                                  ("bias", slim[f"{logits}/biases"][1:])]))
    return layers


def write_legacy_h5(path, layers):
    """Writes `layers` in Keras's legacy (Keras 2) h5 weights layout, which Keras 3 reads by
    layer order: root attribute `layer_names`, one group per layer with `weight_names`."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with h5py.File(partial, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for name, weights in layers:
            group = f.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{w}:0".encode() for w, _ in weights]
            for weight, value in weights:
                group.create_dataset(f"{name}/{weight}:0", data=value.astype("float32"))
    os.replace(partial, path)


def make_weight_files(keras_home, sdist_dir=None):
    """Writes MobileNet's ImageNet weight files into `keras_home/models` (see the module
    docstring), downloading the sdist into `sdist_dir` first if needed.

    Returns:
        The paths written.
    """
    sdist_dir = sdist_dir or Path(keras_home) / "sdist"
    layers = keras_layer_weights(read_slim_weights(download_sdist(sdist_dir)))
    top, *no_top = weight_files(keras_home)
    write_legacy_h5(top, layers)
    for path in no_top:
        write_legacy_h5(path, layers[:-1])
    return [top, *no_top]


def ensure_weight_files(keras_home, sdist_dir=None):
    """Makes the weight files unless every one of them is already in `keras_home`.

    Processes that call this at once (pytest-xdist's workers) take turns on a lock file in
    `keras_home`: the first makes the files, the others find them made.
    """
    files = weight_files(keras_home)
    if all(path.is_file() for path in files):
        return files
    Path(keras_home).mkdir(parents=True, exist_ok=True)
    with open(Path(keras_home) / ".mobilenet_weights.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(path.is_file() for path in files):
            return files
        return make_weight_files(keras_home, sdist_dir)


def classify_photo(image, top=5):
    """ImageNet top-`top` `(class index, probability)` of a photo file, with Keras's MobileNet
    (`weights="imagenet"`, from the current KERAS_HOME) behind tlkit's image contract (the
    one resize rule at 224 px) and the registry's preprocessing."""
    import numpy as np
    import keras

    from tlkit.backbones import get_backbone
    from tlkit.images import load_image
    from tlkit.layers import Preprocess

    network = keras.applications.MobileNet(weights="imagenet")
    pixels = load_image(image, 224).astype("float32")[None]
    inputs = Preprocess(get_backbone("mobilenet").preprocessing)(pixels)
    probabilities = np.asarray(network(inputs, training=False))[0]
    order = np.argsort(probabilities)[::-1][:top]
    return [(int(i), float(probabilities[i])) for i in order]


def main(argv):
    if len(argv) != 1:
        sys.exit(__doc__)
    keras_home = Path(argv[0]).resolve()
    os.environ["KERAS_HOME"] = str(keras_home)  # before Keras is imported
    for path in make_weight_files(keras_home):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    import skimage

    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "coffee.png"
        skimage.io.imsave(photo, skimage.data.coffee())
        ranked = classify_photo(photo)
    print("coffee.png:", ", ".join(f"{IMAGENET_CLASSES.get(i, i)} {p:.3f}" for i, p in ranked))
    return 0 if ranked[0][0] == 967 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
