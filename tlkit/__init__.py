"""tlkit: a folder of images in, a TensorFlow SavedModel image classifier out.

    >>> import tlkit
    >>> result = tlkit.fit("data/digits", flip="none")
    >>> tlkit.load(result.export_path).predict("photo.png")[0].label

The heavy modules (TensorFlow, Keras) load on first use of an attribute, so `tlkit --help`
and `tlkit --version` answer at once.

TensorFlow's C++ log lines are hidden unless `TLKIT_TF_LOGS=1` (see `tlkit.runtime`).
"""

import importlib

from tlkit.runtime import __version__, import_tensorflow

_LAZY = {
    "fit": "tlkit.api",
    "FitResult": "tlkit.api",
    "load": "tlkit.predict",
    "Classifier": "tlkit.predict",
    "Prediction": "tlkit.predict",
    "export_tflite": "tlkit.tflite",
    "audit_labels": "tlkit.audit",
    "AuditConfig": "tlkit.config",
    "FitConfig": "tlkit.config",
    "build_config": "tlkit.config",
    "build_classifier": "tlkit.models",
    "list_backbones": "tlkit.backbones",
    "TlkitError": "tlkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import_tensorflow()
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
