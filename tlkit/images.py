"""The image contract shared by training, prediction and the exported serving graph.

One rule turns a file into the model's input, wherever it runs:

1. **Decode** to 8-bit RGB. The training loader and `tlkit predict` use Pillow (every format
   it opens, EXIF orientation applied, grayscale/palette/RGBA/CMYK converted, 16-bit samples
   scaled by 1/257). The serving graph uses TensorFlow's decoders set up to give the same
   pixels: JPEG with `dct_method="INTEGER_ACCURATE"` (libjpeg's default, which Pillow uses),
   PNG decoded at 16 bits and scaled by 1/257 (exact for 8-bit files).
2. **Resize** with `resize_image`, a TensorFlow function used by both paths: bilinear with
   antialiasing, under one of three policies (`RESIZE_POLICIES`), rounded back to uint8.

Because step 2 is literally the same code and step 1 is bit-exact for JPEG and PNG, the
tensor a model is trained on equals the tensor the export computes from the same file.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from tlkit.errors import ImageError

RESIZE_POLICIES = ("squash", "crop", "pad")
"""`squash` stretches to a square; `crop` scales the short side and cuts the centre square;
`pad` scales the long side and pads the rest with black."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Images with more pixels than this are refused (Pillow's own decompression-bomb limit)."""

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def check_resize_policy(resize):
    """Raises `ValueError` unless `resize` is one of `RESIZE_POLICIES`."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(
            f"`resize` must be one of {list(RESIZE_POLICIES)}. Received: resize={resize!r}"
        )


def decode_file(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes an image file with Pillow into an RGB uint8 array of its own size.

    Applies EXIF orientation, takes the first frame of animations and multi-page files,
    converts grayscale, palette, alpha and CMYK modes to RGB and scales 16-bit samples to
    8 bits (value / 257, rounded) instead of clipping them.

    Args:
        path: path of the image file.
        max_pixels: largest accepted width x height, checked from the header before any
            pixel is decoded, so a decompression bomb never allocates its memory.

    Returns:
        A `(height, width, 3)` uint8 numpy array.

    Raises:
        ImageError: naming the file and what is wrong with it (empty, not an image,
            truncated or corrupt, too large).
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    path,
                    f"{width}x{height} pixels is over the limit of {max_pixels:,} "
                    "(possible decompression bomb)",
                )
            image.load()
            return _to_rgb_array(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file does not exist") from None
    except PermissionError:
        raise ImageError(path, "permission denied (cannot read the file)") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"decompression bomb refused by Pillow ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image that Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e) or type(e).__name__
        raise ImageError(path, f"corrupt or truncated image: {reason}") from None


def _to_rgb_array(image):
    if image.mode in _HIGH_BIT_MODES:
        samples = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def resize_image(image, image_size, resize="squash"):
    """Resizes one RGB image to `image_size` x `image_size` under a resize policy.

    The one resize rule of tlkit: the training loader, `tlkit predict` and the exported
    serving graph all call this function, so they produce identical tensors.

    Args:
        image: uint8 tensor or array of shape `(height, width, 3)`.
        image_size: side of the square output, in pixels.
        resize: one of `RESIZE_POLICIES`.

    Returns:
        A uint8 tensor of shape `(image_size, image_size, 3)`.
    """
    check_resize_policy(resize)
    return _RESIZERS[resize](tf.convert_to_tensor(image, tf.uint8), int(image_size))


def _bilinear(image, height, width):
    resized = tf.image.resize(
        tf.cast(image, tf.float32), tf.stack([height, width]), antialias=True
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _scaled_dims(image, size, scale_to):
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    scale = tf.cast(size, tf.float64) / scale_to(shape)
    dims = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.maximum(dims, 1)


def _squash(image, size):
    return _bilinear(image, size, size)


def _crop(image, size):
    dims = tf.maximum(_scaled_dims(image, size, tf.reduce_min), size)
    resized = _bilinear(image, dims[0], dims[1])
    top, left = (dims[0] - size) // 2, (dims[1] - size) // 2
    return tf.ensure_shape(resized[top : top + size, left : left + size, :], [size, size, 3])


def _pad(image, size):
    dims = tf.minimum(_scaled_dims(image, size, tf.reduce_max), size)
    resized = _bilinear(image, dims[0], dims[1])
    top, left = (size - dims[0]) // 2, (size - dims[1]) // 2
    padded = tf.pad(resized, [[top, size - dims[0] - top], [left, size - dims[1] - left], [0, 0]])
    return tf.ensure_shape(padded, [size, size, 3])


_RESIZERS = {"squash": _squash, "crop": _crop, "pad": _pad}


def load_image(path, image_size, resize="squash", max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes a file with Pillow and resizes it: the model input for one image file.

    Args:
        path: path of the image file.
        image_size: side of the square output, in pixels.
        resize: one of `RESIZE_POLICIES`.
        max_pixels: largest accepted width x height (see `decode_file`).

    Returns:
        A uint8 numpy array of shape `(image_size, image_size, 3)`.

    Raises:
        ImageError: if the file cannot be decoded.
    """
    return _resize_fn(resize, image_size)(decode_file(path, max_pixels)).numpy()


_RESIZE_FN_CACHE = {}


def _resize_fn(resize, image_size):
    """A traced `resize_image` per (policy, size): one graph for any input shape."""
    key = (resize, int(image_size))
    if key not in _RESIZE_FN_CACHE:
        check_resize_policy(resize)
        _RESIZE_FN_CACHE[key] = tf.function(
            lambda image: resize_image(image, key[1], key[0]),
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
        )
    return _RESIZE_FN_CACHE[key]


def decode_bytes(data):
    """Decodes encoded image bytes inside a TensorFlow graph, as `decode_file` would.

    JPEG, PNG, GIF (first frame), BMP and WebP. Meant for the exported serving graph, where
    Pillow is not available.

    Args:
        data: scalar tf.string tensor holding one encoded image.

    Returns:
        A uint8 tensor of shape `(height, width, 3)`.
    """
    magic = tf.strings.substr(data, 0, 8)
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")

    def png():
        samples = tf.io.decode_png(data, channels=3, dtype=tf.uint16)
        return tf.cast(tf.round(tf.cast(samples, tf.float32) / 257.0), tf.uint8)

    def jpeg():
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    image = tf.case(
        [(is_png, png), (tf.io.is_jpeg(data), jpeg)], default=other, exclusive=False
    )
    return tf.ensure_shape(image, [None, None, 3])
