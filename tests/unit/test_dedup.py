"""Pool hygiene (kd3.methods.dedup): digests, perceptual descriptors, range search and the removal rule."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from kd3.data.exclusions import read_uids
from kd3.methods import dedup as D


def test_pixel_digest_is_sha256_of_shape_and_bytes():
    image = np.array([[[0, 255]]], dtype=np.uint8)  # [1, 1, 2]
    assert D.pixel_digest(image) == hashlib.sha256(b"1x1x2\0" + b"\x00\xff").hexdigest()
    assert D.pixel_digest(torch.from_numpy(image)) == D.pixel_digest(image)
    # the same bytes in another shape are another image
    assert D.pixel_digest(image.reshape(1, 2, 1)) != D.pixel_digest(image)


def _blob(size: int = 8, top: int = 3, left: int = 2) -> np.ndarray:
    image = np.full((1, size, size), 40, np.uint8)
    image[0, top:top + 2, left:left + 3] = 200
    image[0, top + 2, left] = 120
    return image


def test_descriptor_ignores_brightness_and_contrast_and_grey_vs_rgb():
    a = _blob()
    d = D.perceptual_descriptors([a, a + 10, (a // 2), np.repeat(a, 3, axis=0)], size=2)
    assert d.shape == (4, 1, 3 * 2 * 2)
    np.testing.assert_allclose(np.linalg.norm(d[:, 0], axis=1), 1.0, atol=1e-6)
    for k in (1, 2, 3):  # +10 grey levels, half the contrast, the same image in RGB
        np.testing.assert_allclose(d[k, 0], d[0, 0], atol=1e-5)


def test_constant_image_has_a_zero_descriptor():
    d = D.perceptual_descriptors([np.full((3, 5, 5), 77, np.uint8)], size=2, max_shift=1)
    assert d.shape == (1, 9, 12) and not d.any()


def test_translated_view_matches_a_shifted_copy_exactly():
    # at size 2 the work image is 8 px (WORK_FACTOR 4): an 8-px image is used as it is, so a copy
    # moved down one pixel equals the original under the view that moves it back (dy = +1)
    assert D.WORK_FACTOR == 4
    a, b = _blob(top=3), _blob(top=4)
    views = D.perceptual_descriptors([b], size=2, max_shift=1)[0]
    base = D.perceptual_descriptors([a], size=2)[0, 0]
    offsets = [(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    cos = views @ base
    assert cos[offsets.index((1, 0))] == pytest.approx(1.0, abs=1e-6)
    assert cos[0] < 0.999  # untranslated, the copy is off by a pixel
    np.testing.assert_allclose(views[0], D.perceptual_descriptors([b], size=2)[0, 0], atol=1e-7)


def test_similar_pairs_range_search_and_best_view():
    db = D.unit_rows(np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32))
    i, j, s = D.similar_pairs(np.array([[1, 0]], np.float32), db, 0.5)
    assert i.tolist() == [0, 0] and j.tolist() == [0, 2]
    np.testing.assert_allclose(s, [1.0, 0.6], atol=1e-6)
    # two views per query: each pair at its best view, ties at the threshold kept
    views = np.array([[[0, 1], [1, 0]]], np.float32)
    i, j, s = D.similar_pairs(views, db, 0.8)
    assert j.tolist() == [0, 1, 2]
    np.testing.assert_allclose(s, [1.0, 1.0, 0.8], atol=1e-6)


def test_unit_rows_keeps_zero_rows_zero():
    out = D.unit_rows(np.array([[3, 4], [0, 0]], np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]


def _pairs(*triples):
    i, j, s = zip(*triples)
    return np.array(i), np.array(j), np.array(s, np.float32)


def test_plan_removal_golden():
    # rows:      0    1    2    3    4    5    6    7
    digests = ["a", "b", "a", "c", "d", "e", "f", "c"]
    eval_digests = ["z", "c"]
    pool_pairs = _pairs((1, 4, 0.99), (4, 1, 0.995),  # 4 copies 1 (best direction: 0.995)
                        (5, 4, 0.999), (5, 0, 0.997),  # 5 copies 4, which goes: its kept match is 0
                        (6, 1, 0.999),                 # 6 is contamination first
                        (2, 3, 0.996))                 # 2 stands for its representative 0; 3 is contaminated
    eval_pairs = _pairs((6, 0, 0.998), (6, 1, 0.990), (7, 0, 0.999))
    removal = D.plan_removal(digests, eval_digests, pool_pairs, eval_pairs)
    assert removal.reason == [None, None, D.EXACT, D.CONTAMINATION, D.NEAR, D.NEAR, D.CONTAMINATION, D.CONTAMINATION]
    assert removal.nearest.tolist() == [-1, -1, 0, 1, 1, 0, 0, 1]
    np.testing.assert_allclose(removal.similarity, [np.nan, np.nan, 1.0, 1.0, 0.995, 0.997, 0.998, 1.0], atol=1e-6)
    assert removal.kept.tolist() == [True, True, False, False, False, False, False, False]


def test_plan_removal_ties_go_to_the_earliest_match():
    removal = D.plan_removal(["a", "b", "c"], ["x", "y"], _pairs((2, 1, 0.99), (2, 0, 0.99)), None)
    assert removal.reason == [None, None, D.NEAR] and removal.nearest[2] == 0
    removal = D.plan_removal(["a"], ["x", "y"], None, _pairs((0, 1, 0.99), (0, 0, 0.99)))
    assert removal.reason == [D.CONTAMINATION] and removal.nearest[0] == 0


def test_many_urls_few_images_keep_one_per_image():
    # the 3000-URL list with 40 distinct images: exact digests alone keep 40
    digests = [f"img{k % 40}" for k in range(3000)]
    removal = D.plan_removal(digests, [])
    assert removal.kept.sum() == 40 and removal.kept[:40].all()
    assert set(removal.nearest[40:].tolist()) == set(range(40))


def test_read_uids_from_parquet_and_text(tmp_path):
    pd.DataFrame({"uid": ["u1", "u2"], "reason": ["x", "y"]}).to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.txt").write_text("# removed\nu3\n\n u4 \n")
    assert read_uids(tmp_path / "r.parquet") == {"u1", "u2"}
    assert read_uids(tmp_path / "r.txt") == {"u3", "u4"}
    pd.DataFrame({"id": ["u1"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(Exception, match="needs a 'uid' column"):
        read_uids(tmp_path / "bad.parquet")


def _grey(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # [1, 1, H, W]


_FOUR = [[0, 0, 0, 0],
         [0, 8, 0, 0],
         [0, 4, 4, 0],
         [0, 0, 0, 0]]


def test_aligned_similarity_finds_a_one_pixel_shift_golden():
    a = _grey(_FOUR)
    # the planted edit: moved down and right one pixel, the top row and left column repeated
    b = _grey(np.pad(np.array(_FOUR), ((1, 0), (1, 0)), mode="edge")[:4, :4].tolist())
    assert b[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 8, 0], [0, 0, 4, 4]]
    # at (dy, dx) = (1, 1) the overlaps a[0:3, 0:3] and b[1:4, 1:4] are the same 3×3 image
    s, where = D.aligned_similarity(a, b, [0], [0], max_shift=1)
    assert s[0] == pytest.approx(1.0, abs=1e-6) and where.tolist() == [[1, 1]]
    # untranslated, by hand: both have mean 1 over 16 pixels; Σab = 4·8 = 32, so the covariance is
    # 32 - 16 = 16 and each variance 64 + 16 + 16 - 16 = 80: correlation 16/80
    s, where = D.aligned_similarity(a, b, [0], [0], max_shift=0)
    assert s[0] == pytest.approx(0.2, abs=1e-6) and where.tolist() == [[0, 0]]
    # symmetric: b against a is the same score at the opposite translation
    s, where = D.aligned_similarity(b, a, [0], [0], max_shift=1)
    assert s[0] == pytest.approx(1.0, abs=1e-6) and where.tolist() == [[-1, -1]]


def test_aligned_similarity_is_blind_to_brightness_and_contrast_and_pairs_by_index():
    a = _grey(_FOUR)
    images = torch.cat([a, a + 10, 2 * a + 3, _grey([[0] * 4] * 4) + 7])
    s, where = D.aligned_similarity(images, images, [1, 2, 3, 0], [0, 0, 0, 0], max_shift=1)
    np.testing.assert_allclose(s[:2], [1.0, 1.0], atol=1e-6)
    assert where[:2].tolist() == [[0, 0], [0, 0]]  # untranslated: the earliest of the best
    assert s[2] == 0.0  # a constant image matches nothing
    assert s[3] == pytest.approx(1.0, abs=1e-6) and s.dtype == np.float32 and where.dtype == np.int64


def test_aligned_similarity_of_different_images_golden():
    # centred: a = [.75, -.25, -.25, -.25], b = [-.25, .75, -.25, -.25]; dot -0.25, each norm² 0.75
    s, _ = D.aligned_similarity(_grey([[1, 0], [0, 0]]), _grey([[0, 1], [0, 0]]), [0], [0], max_shift=0)
    assert s[0] == pytest.approx(-1 / 3, abs=1e-6)
    s, _ = D.aligned_similarity(_grey([[1, 0], [0, 0]]), _grey([[0, 1], [0, 0]]), [], [], max_shift=0)
    assert s.shape == (0,)


def test_aligned_similarity_adds_each_channels_moments():
    # two channels, each centred on its own: channel 0 identical, channel 1 of b negated → cov 0
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    b = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]]])
    s, _ = D.aligned_similarity(a, b, [0], [0], max_shift=0)
    # centred: a = [.5, -.5 | -1, 1], b = [.5, -.5 | 1, -1]: dot 0.5 - 2 = -1.5, norms² 2.5 → -0.6
    assert s[0] == pytest.approx(-0.6, abs=1e-6)


def test_verification_images_common_size_and_rgb():
    grey = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    out = D.verification_images([grey, np.repeat(grey, 3, axis=0), np.zeros((3, 8, 8), np.uint8)], 4)
    assert out.shape == (3, 3, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1]) and torch.equal(out[0, 2], torch.arange(16.0).reshape(4, 4))
    assert not out[2].any()
