"""tlkit: a folder of images in, a TensorFlow SavedModel image classifier out.

    >>> import tlkit
    >>> result = tlkit.fit("data/digits", flip="none")
    >>> tlkit.load(result.export_path).predict("photo.png")[0].label

The heavy modules (TensorFlow, Keras) load on first use of an attribute, so `tlkit --help`
and `tlkit --version` answer at once.
"""

import importlib
import os
import sys

_keras = sys.modules.get("keras")
if _keras is not None and _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "tlkit needs Keras's TensorFlow backend, but Keras was already imported with the "
        f"{_keras.backend.backend()!r} backend. Set KERAS_BACKEND=tensorflow (or import tlkit "
        "before keras)."
    )
# tlkit trains and exports through TensorFlow: its SavedModels are TensorFlow graphs.
os.environ["KERAS_BACKEND"] = "tensorflow"

__version__ = "0.1.0"

_LAZY = {
    "fit": "tlkit.api",
    "FitResult": "tlkit.api",
    "load": "tlkit.predict",
    "Classifier": "tlkit.predict",
    "Prediction": "tlkit.predict",
    "export_tflite": "tlkit.tflite",
    "FitConfig": "tlkit.config",
    "build_config": "tlkit.config",
    "build_classifier": "tlkit.models",
    "list_backbones": "tlkit.backbones",
    "TlkitError": "tlkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
