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


def _pool(n=37, side=12, seed=0):
    """A two-shard pool in the pixel cache: grey and colour images mixed, rows in shard order."""
    import pandas as pd

    from kd3.data.pixel_cache import PoolPixels

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (1 if i % 3 else 3, side, side), dtype=np.uint8) for i in range(n)]
    pixels, channels = stack_padded(images, max_side=side)
    frame = pd.DataFrame({"uid": [f"u{i:03d}" for i in range(n)], "shard": ["00000"] * 20 + ["00001"] * (n - 20)})
    rows_by_shard = {s: np.flatnonzero(frame["shard"].to_numpy() == s) for s in ("00000", "00001")}
    return PoolPixels(pixels=pixels, channels=channels, uids=frame["uid"].to_numpy(), rows_by_shard=rows_by_shard)


def test_bulk_batches_equal_the_per_image_dataloader_batches():
    """CachedBatches (the fast path) gives exactly the batches the one-process DataLoader collates from
    the same ShardImages: same rows, uids and pixels (student and teacher views), same shuffled order."""
    from pathlib import Path

    import torch

    from kd3.data.shards import BatchCollate, CachedBatches, ShardImages, image_loader
    from kd3.models.spec import InputSpec

    pool = _pool()
    rows = {uid: i for i, uid in enumerate(pool.uids) if i % 5 != 2}  # a selection: some rows left out
    student = InputSpec(8, 1, (0.5,), (0.25,))
    teacher = InputSpec(16, 3, (0.5,) * 3, (0.25,) * 3)
    shards = [Path("00000.tar"), Path("00001.tar")]
    for shuffle in (False, True):
        dataset = ShardImages(shards, student, uid_to_row=rows, shuffle=shuffle, shuffle_buffer=7, seed=3, epoch=2,
                              teacher_spec=teacher, pixels=pool)
        # items prepared one by one (ShardImages' own path), collated by the DataLoader
        slow = list(torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=0, collate_fn=BatchCollate(dataset)))
        fast = list(CachedBatches(dataset, batch_size=8))
        assert isinstance(image_loader(dataset, 8, 0), CachedBatches)
        assert len(fast) == len(slow) == 4  # 30 rows selected, batches of 8
        for a, b in zip(fast, slow):
            assert a["uid"] == b["uid"] and torch.equal(a["row"], b["row"])
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["teacher_image"], b["teacher_image"])
    assert [b["uid"][0] for b in CachedBatches(dataset, 8)][:2] != ["u000", "u008"]  # shuffled indeed


def test_batch_prepared_decode_path_equals_image_by_image():
    """Without the cache, image_loader's DataLoader prepares each batch at once: the same tensors as
    preparing image by image (mixed grey/colour of one size, and a batch with two sizes)."""
    import torch

    from kd3.data.images import prepare_uint8
    from kd3.data.shards import _prepare_list
    from kd3.models.spec import InputSpec

    rng = np.random.default_rng(1)
    for spec in (InputSpec(8, 1, (0.5,), (0.25,)), InputSpec(16, 3, (0.5,) * 3, (0.25,) * 3)):
        same = [torch.from_numpy(rng.integers(0, 256, (c, 12, 12), dtype=np.uint8)) for c in (1, 3, 3, 1, 1)]
        mixed = same[:2] + [torch.from_numpy(rng.integers(0, 256, (3, 20, 9), dtype=np.uint8))]
        for images in (same, mixed):
            assert torch.equal(_prepare_list(images, spec), torch.stack([prepare_uint8(i, spec) for i in images]))
