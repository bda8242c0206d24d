"""The hard scenario's per-digit shifts (kd3/data/demo.py) and its config keys, on hand-made images."""

from pathlib import Path

import numpy as np
import pytest

from kd3.config import DemoDataSection, DigitShift, load_config
from kd3.data.demo import _hue_color, private_digits, shift_digit, shift_digits

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
BAR = np.zeros((28, 28), np.uint8)
BAR[10:18, 12:15] = 255  # a vertical stroke 3 px wide, 8 px tall


def _width(image):
    return int((image > 127).sum(axis=1).max())


@pytest.mark.parametrize("stroke, width", [(0, 3), (1, 4), (2, 5), (-1, 2), (-2, 1)])
def test_stroke_widens_or_narrows_by_k_pixels(stroke, width):
    out = shift_digit(BAR, DigitShift(stroke=[stroke]), np.random.default_rng(0))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert _width(out) == width


def test_contrast_and_background_levels():
    full = np.full((28, 28), 255, np.uint8)
    empty = np.zeros((28, 28), np.uint8)
    shift = DigitShift(contrast=[0.2, 0.2], background=[0.4, 0.4])
    # background 0.4 → 102; ink 0.4 + 0.2 = 0.6 → 153
    assert np.abs(shift_digit(empty, shift, np.random.default_rng(0)).astype(int) - 102).max() <= 1
    assert np.abs(shift_digit(full, shift, np.random.default_rng(0)).astype(int) - 153).max() <= 1


def test_scale_places_the_digit_inside_a_smaller_box():
    full = np.full((28, 28), 255, np.uint8)
    out = shift_digit(full, DigitShift(canvas=40, scale=[0.5, 0.5]), np.random.default_rng(3))
    rows, cols = np.nonzero(out > 127)
    assert out.shape == (40, 40)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 20


def test_hue_colours():
    assert _hue_color(0.0, 1.0).tolist() == pytest.approx([1, 0, 0])
    assert _hue_color(1 / 3, 1.0).tolist() == pytest.approx([0, 1, 0])
    assert _hue_color(2 / 3, 1.0).tolist() == pytest.approx([0, 0, 1])
    assert _hue_color(0.5, 0.5).tolist() == pytest.approx([0.5, 1, 1])
    assert _hue_color(0.25, 0.0).tolist() == pytest.approx([1, 1, 1])


def test_tint_writes_rgb_and_is_seeded():
    shift = DigitShift(tint=[1.0, 1.0], blur=[0.5, 1.0], scale=[0.7, 1.0], stroke=[-1, 0, 1])
    digits = np.stack([BAR, BAR.T, 255 - BAR])
    a = shift_digits(digits, shift, np.random.default_rng(5))
    b = shift_digits(digits, shift, np.random.default_rng(5))
    assert a.shape == (3, 28, 28, 3) and np.array_equal(a, b)
    # saturation 1: every pixel has one channel at 0 (within rounding)
    assert a.min(axis=-1).max() <= 1
    assert shift_digits(digits[:0], shift, np.random.default_rng(5)).shape == (0, 28, 28, 3)


def test_private_digits_in_colour_scale_each_channel():
    grey = private_digits(8, 0.3, 0)[0]
    colour = private_digits(8, 0.3, 0, color=[255, 128, 1])[0]
    assert colour.shape == (grey.shape[0], 3, 8, 8)
    assert np.array_equal(colour[:, 0].numpy(), grey[:, 0].numpy())
    expected_g = np.round(grey[:, 0].numpy().astype(np.float32) * (128 / 255)).astype(np.uint8)
    assert np.abs(colour[:, 1].numpy().astype(int) - expected_g).max() <= 1


def test_config_rejects_bad_ranges():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="scale"):
        DigitShift(scale=[0.9, 0.5])
    with pytest.raises(ValidationError, match="stroke"):
        DigitShift(stroke=[])
    with pytest.raises(ValidationError, match="private_color"):
        DemoDataSection(private_color=[0, 10, 10])
    assert DemoDataSection().web_shift is None and DemoDataSection().channels == 1


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_file_validates(path):
    load_config(path)
