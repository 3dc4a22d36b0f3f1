"""The image contract shared by training, prediction and the exported serving graph.

One rule turns a file into the model's input, wherever it runs:

1. **Decode** to 8-bit RGB. The training loader and `tlkit predict` use Pillow (every format
   it opens, EXIF orientation applied, grayscale/palette/RGBA/CMYK converted, 16-bit samples
   scaled by 1/257). The serving graph uses TensorFlow's decoders set up to give the same
   pixels: JPEG with `dct_method="INTEGER_ACCURATE"` (libjpeg's default, which Pillow uses),
   PNG decoded at 16 bits and scaled by 1/257 (exact for 8-bit files). A JPEG at least twice
   the model's input on its short side is decoded at a reduced scale (libjpeg's DCT scaling:
   1/2, 1/4 or 1/8, the smallest that keeps both sides at least the input size;
   `jpeg_scale`): Pillow's `draft` and TensorFlow's `decode_jpeg(ratio=...)` give the same
   pixels at the same scale, and a 12-megapixel photo decodes several times faster.
2. **Resize** with `resize_image`, a TensorFlow function used by both paths: bilinear with
   antialiasing, under one of three policies (`RESIZE_POLICIES`), rounded back to uint8.

Because step 2 is literally the same code and step 1 is bit-exact for JPEG and PNG, the
tensor a model is trained on equals the tensor the export computes from the same file.
"""

import os


import numpy as np
import tensorflow as tf
from PIL import Image

from tlkit.config import RESIZE_POLICIES
from tlkit.errors import ImageError
from tlkit.validation import check_choice


DEFAULT_MAX_PIXELS = 89_478_485
"""Images with more pixels than this are refused (Pillow's own decompression-bomb limit)."""

SERVING_FORMATS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
                   b"RIFF")
"""How the formats the serving graph decodes begin (JPEG, PNG, GIF, BMP, WebP)."""

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow modes with samples wider than 8 bits: `decode_file` scales them to 8 (value / 257)."""


def check_resize_policy(resize):
    """Raises `ConfigError` (a `ValueError`) unless `resize` is one of `RESIZE_POLICIES`:
    `squash` stretches to a square; `crop` scales the short side and cuts the centre
    square; `pad` scales the long side and pads the rest with black."""
    check_choice("resize", resize, RESIZE_POLICIES)


def decode_file(path, max_pixels=DEFAULT_MAX_PIXELS, image_size=None):
    """Decodes an image file with Pillow into an RGB uint8 array of its own size.

    Applies EXIF orientation, takes the first frame of animations and multi-page files,
    converts grayscale, palette, alpha and CMYK modes to RGB and scales 16-bit samples to
    8 bits (value / 257, rounded) instead of clipping them.

    Args:
        path: path of the image file.
        max_pixels: largest accepted width x height, checked from the header before any
            pixel is decoded, so a decompression bomb never allocates its memory.
        image_size: the side the image will be resized to; a JPEG is then decoded at
            `1 / jpeg_scale(height, width, image_size)` of its size. `None`: full size.

    Returns:
        A `(height, width, 3)` uint8 numpy array (for a scaled JPEG, its scaled size:
        each side divided by the scale, rounded up).

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
            if image_size is not None and image.format == "JPEG":
                # Pillow picks the scale by `jpeg_scale`'s rule, as the serving graph does.
                image.draft(image.mode, (int(image_size), int(image_size)))
            image.load()
            pixels = _to_rgb_array(image, path)
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
        return orient(pixels, orientation)
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


JPEG_SCALES = (8, 4, 2, 1)
"""The DCT scales libjpeg decodes at (1/8 .. 1/1), largest first."""


def jpeg_scale(height, width, image_size):
    """The largest JPEG DCT scale (8, 4, 2 or 1) that leaves both sides of a `height` x
    `width` image at least `image_size` (Pillow's `draft` rule); 1 when none does."""
    room = min(int(height), int(width)) // max(int(image_size), 1)
    return next(s for s in JPEG_SCALES if s <= max(room, 1))


ORIENTATION_TAG = 0x0112
"""The EXIF tag of the orientation (1..8) that `decode_file` and `decode_bytes` apply."""

_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def orient(pixels, orientation):
    """Applies an EXIF orientation (1..8) to an `(h, w, c)` array, as cameras mean it."""
    transform = _ORIENTATIONS.get(orientation)
    return pixels if transform is None else np.ascontiguousarray(transform(pixels))


def is_16_bit_color_png(image, path):
    """Whether a Pillow `image` read from `path` is a PNG with 16-bit colour samples (Pillow
    keeps only their high byte; `decode_file` reads them whole and scales them to 8 bits)."""
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA"):
        return False
    with open(path, "rb") as f:
        header = f.read(26)
    return len(header) == 26 and header[24] == 16


def _to_rgb_array(image, path):
    if is_16_bit_color_png(image, path):
        # Pillow keeps only the high byte of 16-bit colour samples; TensorFlow's PNG decoder
        # reads them whole, so both paths scale by 1/257 the same way.
        with open(path, "rb") as f:
            return _png_16_to_8(tf.io.decode_png(f.read(), channels=3, dtype=tf.uint16)).numpy()
    if image.format == "GIF" and image.mode == "P" and "transparency" in image.info:
        # TensorFlow's GIF decoder paints transparent pixels black: do the same here.
        pixels = np.array(image.convert("RGB"))
        pixels[np.asarray(image) == image.info["transparency"]] = 0
        return pixels
    if image.mode in HIGH_BIT_MODES:
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
    """Decodes a file with Pillow (a large JPEG at a reduced DCT scale, see `decode_file`)
    and resizes it: the model input for one image file.

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
    pixels = decode_file(path, max_pixels, image_size)
    return resize_fn(resize, image_size)(pixels).numpy()


_RESIZE_FN_CACHE = {}


def resize_fn(resize, image_size):
    """The traced `resize_image` of one policy and size: one graph for any input shape,
    made once per `(resize, image_size)` and kept.

    Args:
        resize: one of `RESIZE_POLICIES`.
        image_size: side of the square output, in pixels.

    Returns:
        A `tf.function` from a uint8 `(h, w, 3)` tensor to `(image_size, image_size, 3)`.
    """
    key = (resize, int(image_size))
    if key not in _RESIZE_FN_CACHE:
        check_resize_policy(resize)
        _RESIZE_FN_CACHE[key] = tf.function(
            lambda image: resize_image(image, key[1], key[0]),
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)],
        )
    return _RESIZE_FN_CACHE[key]


def _png_16_to_8(samples):
    return tf.cast(tf.round(tf.cast(samples, tf.float32) / 257.0), tf.uint8)


def decode_bytes(data, max_pixels=DEFAULT_MAX_PIXELS, image_size=None):
    """Decodes encoded image bytes inside a TensorFlow graph, as `decode_file` would.

    JPEG, PNG, GIF (first frame), BMP (including 8-bit palette BMPs) and WebP, with the EXIF
    orientation of JPEG and PNG files applied. Meant for the exported serving graph, where
    Pillow is not available. The image's size is read from its header first, and an image
    over `max_pixels` is refused before any pixel is decoded, so a small file that claims a
    huge image (a decompression bomb) cannot exhaust the server's memory.

    Args:
        data: scalar tf.string tensor holding one encoded image.
        max_pixels: largest accepted width x height.
        image_size: the side the image will be resized to; a JPEG is then decoded at the
            scale `decode_file` uses (`jpeg_scale`), with the same pixels. `None`: full size.

    Returns:
        A uint8 tensor of shape `(height, width, 3)`.

    Raises:
        tf.errors.InvalidArgumentError: at run time, for an image over `max_pixels` (the
            message gives its size and the limit) or bytes no decoder accepts.
    """
    height, width = header_size(data)
    check = tf.debugging.Assert(
        height * width <= max_pixels,
        [tf.strings.format("Image of {} x {} pixels is over the limit of {} pixels "
                           "(possible decompression bomb); resize it before sending.",
                           (width, height, max_pixels))],
    )
    with tf.control_dependencies([check]):
        data = tf.identity(data)
    magic = tf.strings.substr(data, 0, 8)
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")
    is_bmp = tf.equal(tf.strings.substr(data, 0, 2), b"BM")

    def png():
        return _png_16_to_8(tf.io.decode_png(data, channels=3, dtype=tf.uint16))

    def jpeg_at(ratio):
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                         dct_method="INTEGER_ACCURATE")

    def jpeg():
        if image_size is None:
            return jpeg_at(1)()
        room = tf.minimum(height, width) // max(int(image_size), 1)
        index = tf.cast(tf.reduce_sum(tf.cast(room >= tf.constant([2, 4, 8], tf.int64),
                                              tf.int32)), tf.int32)
        return tf.switch_case(index, [jpeg_at(ratio) for ratio in (1, 2, 4, 8)])

    def bmp():
        return tf.cond(_bmp_bits_per_pixel(data) <= 8, lambda: _decode_palette_bmp(data),
                       lambda: _to_rgb(tf.io.decode_bmp(data)))

    def other():
        return _to_rgb(tf.io.decode_image(data, expand_animations=False))

    image = tf.case(
        [(is_png, png), (tf.io.is_jpeg(data), jpeg), (is_bmp, bmp)], default=other,
        exclusive=False,
    )
    image = _orient_graph(image, _exif_orientation(data, is_png))
    return tf.ensure_shape(image, [None, None, 3])


def header_size(data):
    """`(height, width)` of an encoded image read from its header alone, as int64 tensors.

    Knows PNG, JPEG, GIF, BMP and WebP; for anything else returns `(0, 0)` and leaves the
    decision to the decoder.
    """
    head = tf.strings.join([tf.strings.substr(data, 0, 64), b"\0" * 64])

    def dims(height, width):
        return lambda: tf.stack([height(), width()])

    def uint(position, size, little=True):
        return lambda: _read_uint(head, position, size, little)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[:2]

    def webp():
        kind = tf.strings.substr(head, 12, 4)
        vp8l = _read_uint(head, 21, 4)
        return tf.case([
            (tf.equal(kind, b"VP8X"), lambda: tf.stack([_read_uint(head, 27, 3) + 1,
                                                        _read_uint(head, 24, 3) + 1])),
            (tf.equal(kind, b"VP8L"), lambda: tf.stack([(vp8l // 16384) % 16384 + 1,
                                                        vp8l % 16384 + 1])),
            (tf.equal(kind, b"VP8 "), lambda: tf.stack([_read_uint(head, 28, 2) % 16384,
                                                        _read_uint(head, 26, 2) % 16384])),
        ], default=lambda: tf.zeros([2], tf.int64))

    def bmp():
        height = _read_uint(head, 22, 4)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # top-down BMPs
        return tf.stack([height, _read_uint(head, 18, 4)])

    size = tf.case([
        (tf.equal(tf.strings.substr(head, 0, 8), b"\x89PNG\r\n\x1a\n"),
         dims(uint(20, 4, False), uint(16, 4, False))),
        (tf.io.is_jpeg(data), jpeg),
        (tf.equal(tf.strings.substr(head, 0, 3), b"GIF"), dims(uint(8, 2), uint(6, 2))),
        (tf.equal(tf.strings.substr(head, 0, 2), b"BM"), bmp),
        (tf.equal(tf.strings.substr(head, 0, 4), b"RIFF")
         & tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"), webp),
    ], default=lambda: tf.zeros([2], tf.int64), exclusive=False)
    return size[0], size[1]


def _to_rgb(image):
    """Any channel count (gray, gray+alpha, RGB, RGBA) to RGB, dropping alpha like Pillow."""
    channels = tf.shape(image)[-1]
    return tf.cond(channels < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1),
                   lambda: image[..., :3])


def _read_uint(data, position, size, little_endian=True):
    """Unsigned integer of `size` bytes at `position` of a scalar string (padded by caller)."""
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, position, size), tf.uint8),
                  tf.int64)
    weights = tf.constant([256**i for i in range(size)], tf.int64)
    if not little_endian:
        weights = tf.reverse(weights, [0])
    return tf.reduce_sum(raw * weights)


def _bmp_bits_per_pixel(data):
    return _read_uint(tf.strings.join([tf.strings.substr(data, 0, 64), b"\0" * 64]), 28, 2)


def _decode_palette_bmp(data):
    """8-bit palette BMP: TensorFlow returns the indices; look them up in the colour table."""
    padded = tf.strings.join([data, b"\0" * 1024])
    header_size = _read_uint(padded, 14, 4)
    colors = _read_uint(padded, 46, 4)
    colors = tf.where(colors == 0, tf.constant(256, tf.int64), colors)
    table = tf.io.decode_raw(tf.strings.substr(padded, 14 + header_size, 4 * colors), tf.uint8)
    rgb = tf.reverse(tf.reshape(table, [-1, 4])[:, :3], [1])  # stored as BGRA
    indices = tf.io.decode_bmp(data, channels=0)[..., 0]
    return tf.gather(rgb, tf.cast(indices, tf.int32))


_EXIF_SCAN_BYTES = 65536


def _exif_orientation(data, is_png):
    """The EXIF orientation tag (1..8) of a JPEG (APP1) or PNG (eXIf chunk); 1 if absent."""
    head = tf.strings.join([tf.strings.substr(data, 0, _EXIF_SCAN_BYTES),
                            b"\0" * (_EXIF_SCAN_BYTES + 4096)])
    marker = tf.where(is_png, b"eXIf", b"Exif\x00\x00")
    parts = tf.strings.split(tf.reshape(head, [1]), marker, maxsplit=1)
    found = tf.equal(parts.row_lengths()[0], 2)
    tiff = tf.cast(tf.strings.length(parts.values[0]), tf.int64) + tf.cast(
        tf.strings.length(marker), tf.int64)
    tiff = tf.minimum(tiff, _EXIF_SCAN_BYTES)

    def read(little):
        ifd = tf.minimum(_read_uint(head, tiff + 4, 4, little), _EXIF_SCAN_BYTES)
        count = tf.minimum(_read_uint(head, tiff + ifd, 2, little), 256)
        entries = tf.io.decode_raw(tf.strings.substr(head, tiff + ifd + 2, 12 * count), tf.uint8)
        entries = tf.cast(tf.reshape(entries, [-1, 12]), tf.int64)
        low, high = (0, 1) if little else (1, 0)
        tags = entries[:, low] + 256 * entries[:, high]
        values = entries[:, 8 + low] + 256 * entries[:, 8 + high]
        match = tf.boolean_mask(values, tf.equal(tags, ORIENTATION_TAG))
        return tf.cond(tf.size(match) > 0, lambda: match[0], lambda: tf.constant(1, tf.int64))

    def orientation():
        order = tf.strings.substr(head, tiff, 2)
        return tf.case([(tf.equal(order, b"II"), lambda: read(True)),
                        (tf.equal(order, b"MM"), lambda: read(False))],
                       default=lambda: tf.constant(1, tf.int64))

    value = tf.cond(found, orientation, lambda: tf.constant(1, tf.int64))
    return tf.where((value >= 1) & (value <= 8), value, 1)


def _orient_graph(image, orientation):
    """`orient` for tensors: the same eight EXIF transforms."""
    transpose = lambda a: tf.transpose(a, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,
        lambda: image,
        lambda: image[:, ::-1],
        lambda: image[::-1, ::-1],
        lambda: image[::-1],
        lambda: transpose(image),
        lambda: tf.image.rot90(image, -1),
        lambda: transpose(tf.image.rot90(image, 2)),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(tf.cast(orientation, tf.int32), branches)
