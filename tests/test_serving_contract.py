"""The export works without tlkit: TensorFlow's saved_model_cli, a plain-TF program, Keras's
TFSMLayer inside a bigger model, TF Serving's b64 JSON body, and the README's serving
section run as written against `tlkit serve`."""

import base64
import contextlib
import io
import json
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
from conftest import DIGITS, REPO
from tlkit.serve import ModelServer

FILES = [DIGITS / str(c) / name for c, name in ((7, "7_0061.png"), (3, "3_0003.png"),
                                                (0, "0_0000.png"))]


@pytest.fixture(scope="module")
def classifier(digits_export):
    return tlkit.load(digits_export)


@pytest.fixture(scope="module")
def expected(classifier):
    return classifier.predict(FILES, top_k=10)


def probabilities_of(prediction, class_names):
    """A tlkit `Prediction`'s probabilities in class-index order."""
    by_label = dict(zip(prediction.labels, prediction.probabilities))
    return [by_label[name] for name in class_names]


def test_saved_model_cli_lists_and_runs_the_signatures(digits_export, classifier, tmp_path):
    shown = subprocess.run(["saved_model_cli", "show", "--all", "--dir", str(digits_export)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for signature in ("serving_default", "predict_images", "explain", "explain_images"):
        assert f"signature_def['{signature}']" in text
    serving = text.split("signature_def['serving_default']", 1)[1]
    assert re.search(r"inputs\['image_bytes'\] tensor_info:\s+dtype: DT_STRING\s+"
                     r"shape: \(-1\)", serving)
    for output, dtype in (("probabilities", "DT_FLOAT"), ("class_ids", "DT_INT64"),
                          ("class_names", "DT_STRING")):
        assert re.search(rf"outputs\['{output}'\] tensor_info:\s+dtype: {dtype}", serving)

    pixels = np.random.default_rng(5).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", pixels)
    ran = subprocess.run(["saved_model_cli", "run", "--dir", str(digits_export), "--tag_set",
                          "serve", "--signature_def", "predict_images", "--inputs",
                          f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    np.testing.assert_allclose(np.load(tmp_path / "probabilities.npy"),
                               classifier.predict_arrays(pixels), atol=1e-5)


PLAIN_TF = textwrap.dedent("""
    import json, sys
    sys.modules["tlkit"] = None  # any import of tlkit now fails: the export must not need it
    import tensorflow as tf

    model = tf.saved_model.load(sys.argv[1])
    data = tf.stack([tf.io.read_file(f) for f in sys.argv[2:]])
    out = model.signatures["serving_default"](image_bytes=data)
    labels = tf.io.read_file(sys.argv[1] + "/assets/labels.txt").numpy().decode().split()
    print(json.dumps({"names": [n.decode() for n in out["class_names"].numpy()],
                      "probabilities": out["probabilities"].numpy().tolist(),
                      "labels": labels}))
""")


def test_a_plain_tensorflow_program_calls_the_export_without_tlkit(digits_export, classifier,
                                                                     expected):
    run = subprocess.run([sys.executable, "-c", PLAIN_TF, str(digits_export), *map(str, FILES)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["labels"] == classifier.class_names
    assert out["names"] == [p.label for p in expected]
    np.testing.assert_allclose(out["probabilities"],
                               [probabilities_of(p, classifier.class_names) for p in expected],
                               atol=1e-5)


def test_tfsmlayer_inside_a_new_keras_model_predicts_the_same(digits_export, classifier,
                                                             expected):
    size = classifier.image_size
    pixels = np.random.default_rng(3).uniform(0, 255, (5, size, size, 3)).astype(np.float32)
    images = keras.Input((size, size, 3))
    layer = keras.layers.TFSMLayer(str(digits_export), call_endpoint="predict_images",
                                   trainable=False)
    probabilities = layer(images)["probabilities"]
    parity = keras.layers.Dense(2, activation="softmax", name="parity")(probabilities)
    model = keras.Model(images, {"digit": probabilities, "parity": parity})
    np.testing.assert_allclose(model(pixels)["digit"], classifier.predict_arrays(pixels),
                               atol=1e-5)

    # the bigger model trains its own head; the embedded export stays as it was
    model.compile(optimizer=keras.optimizers.Adam(0.1),
                  loss={"parity": "sparse_categorical_crossentropy"})
    head_before = model.get_layer("parity").get_weights()[0].copy()
    model.fit(pixels, {"parity": np.arange(5) % 2}, epochs=2, verbose=0)
    assert not np.allclose(model.get_layer("parity").get_weights()[0], head_before)
    np.testing.assert_allclose(model(pixels)["digit"], classifier.predict_arrays(pixels),
                               atol=1e-5)

    encoded = keras.Input((), dtype="string")
    served = keras.layers.TFSMLayer(str(digits_export), call_endpoint="serving_default",
                                    trainable=False)
    from_bytes = keras.Model(encoded, served(encoded)["probabilities"])
    got = from_bytes(tf.constant([f.read_bytes() for f in FILES]))
    np.testing.assert_allclose(got, [probabilities_of(p, classifier.class_names)
                                     for p in expected], atol=1e-5)


def test_the_b64_json_body_decodes_to_the_same_prediction(classifier, expected):
    """TF Serving's REST body, built as the README builds it, through the signature."""
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(f.read_bytes())
                                                      .decode()}} for f in FILES]})
    decoded = [base64.b64decode(instance["image_bytes"]["b64"])
               for instance in json.loads(body)["instances"]]
    out = classifier.signature("serving_default")(image_bytes=tf.constant(decoded))
    assert [n.decode() for n in out["class_names"].numpy()] == [p.label for p in expected]
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               [probabilities_of(p, classifier.class_names) for p in expected],
                               atol=1e-5)


def readme_serving_blocks():
    """The Python blocks of the README's "Serving and embedding" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Serving and embedding", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_serving_section_runs_as_written(digits_export, expected):
    """Each Python block runs against `tlkit serve`, with only the export path and the
    ports replaced by the test's own."""
    blocks = readme_serving_blocks()
    assert len(blocks) == 3
    with ModelServer(digits_export, port=0, grpc_port=0) as server:
        replacements = {"saved_models/digits/1": str(digits_export),
                        "localhost:8501": f"127.0.0.1:{server.rest_port}",
                        "localhost:8500": f"127.0.0.1:{server.grpc_port}"}
        outputs = []
        for block in blocks:
            for old, new in replacements.items():
                block = block.replace(old, new)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.chdir(REPO):
                exec(compile(block, "README.md", "exec"), {})
            outputs.append(printed.getvalue())
    seven = expected[0]  # the README's image
    label, probability = outputs[0].split()
    assert label == seven.label
    assert float(probability) == pytest.approx(seven.probabilities[0], abs=1e-5)
    assert outputs[1].strip() == f"[b'{seven.label}']"
    assert "parity" in outputs[2] and "Total params" in outputs[2]
