"""The decoded-pixel cache's packing: grey and colour images share one zero-padded array."""

import numpy as np

from kd3.data.pixel_cache import stack_padded


def test_stack_padded_keeps_each_images_channels():
    grey = np.full((1, 2, 2), 7, np.uint8)
    rgb = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    pixels, channels = stack_padded([grey, rgb], max_side=2)
    assert pixels.shape == (2, 3, 2, 2) and pixels.dtype == np.uint8
    assert channels.tolist() == [1, 3]
    assert (pixels[0, 0] == 7).all() and (pixels[0, 1:] == 0).all()  # padding, never read back
    assert np.array_equal(pixels[1], rgb)


def test_no_cache_for_mixed_sizes_or_large_images():
    assert stack_padded([np.zeros((1, 2, 2), np.uint8), np.zeros((1, 3, 2), np.uint8)], max_side=8) is None
    assert stack_padded([np.zeros((3, 65, 65), np.uint8)], max_side=64) is None
