"""The serving graph reads image sizes from headers and refuses decompression bombs."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import png_header_only
from tlkit.images import decode_bytes, header_size


def encoded(fmt, mode, size=(37, 23), **options):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, mode, options", [
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "L", {}), ("JPEG", "RGB", {}),
    ("JPEG", "L", {}), ("GIF", "P", {}), ("BMP", "RGB", {}), ("BMP", "P", {}),
    ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"lossless": True}),
    ("WEBP", "RGB", {"quality": 80}), ("WEBP", "RGBA", {"quality": 80}),
])
def test_header_size_reads_width_and_height(fmt, mode, options):
    for size in [(37, 23), (5, 300)]:
        height, width = header_size(tf.constant(encoded(fmt, mode, size, **options)))
        assert (int(width), int(height)) == size


def test_header_size_of_unknown_formats_is_zero():
    assert [int(v) for v in header_size(tf.constant(encoded("TIFF", "RGB")))] == [0, 0]
    assert [int(v) for v in header_size(tf.constant(b"hello"))] == [0, 0]


def test_a_png_claiming_100000_squared_pixels_is_refused_before_decoding():
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"100000 x 100000 pixels is over the limit"):
        decode_bytes(tf.constant(png_header_only(100000, 100000)))


def test_a_real_20000_squared_png_is_refused_and_a_small_limit_applies():
    bomb = encoded("PNG", "1", (20000, 20000))
    assert len(bomb) < 100_000  # a tiny file for 400 million pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="20000 x 20000 pixels"):
        decode_bytes(tf.constant(bomb))
    small = encoded("PNG", "RGB", (40, 30))
    with pytest.raises(tf.errors.InvalidArgumentError, match="40 x 30 pixels"):
        decode_bytes(tf.constant(small), max_pixels=1000)
    assert decode_bytes(tf.constant(small), max_pixels=1200).shape == (30, 40, 3)


def test_bomb_check_works_inside_a_traced_serving_function():
    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def serve(data):
        return tf.shape(decode_bytes(data))

    np.testing.assert_array_equal(serve(tf.constant(encoded("JPEG", "RGB"))), [23, 37, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="decompression bomb"):
        serve(tf.constant(png_header_only(30000, 30000)))
