"""Contact sheets: which tiles per class, image lookup by uid, and the rendered PNG."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from kd3.inspect.manifests import ManifestRef, pick_manifests
from kd3.inspect.sheets import build_sheets, pick_tiles
from kd3.inspect.tars import find_samples, iter_samples

from tests.unit.test_inspect_fixtures import CLASS_NAMES, UIDS, build_run


def _last(run):
    return pick_manifests(run, "last")[0]


def test_tiles_per_class_split_top_bottom_and_rejected_without_repeats(tmp_path):
    run = build_run(tmp_path)
    picks, rows = pick_tiles(_last(run), [0, 1, 2], top_n=1, bottom_n=1, rejected_n=1)
    sections = {k: [(t.section, t.uid[:2]) for t in tiles] for k, tiles in picks.items()}
    assert sections == {0: [("top", "u0"), ("bottom", "u1")],
                        1: [("rejected", "u2")],
                        2: [("top", "u4"), ("bottom", "u3"), ("rejected", "u5")]}
    assert sorted(rows["uid"]) == sorted(UIDS)
    # with room for 16 on top, the bottom row does not repeat them
    picks, _ = pick_tiles(_last(run), [2], top_n=16, bottom_n=8, rejected_n=0)
    assert [(t.section, t.uid[:2]) for t in picks[2]] == [("top", "u4"), ("top", "u3")]


def test_sheets_tile_count_images_found_and_png_written(tmp_path):
    run = build_run(tmp_path)
    out = tmp_path / "sheets"
    sheets = build_sheets(_last(run), run / "download" / "shards", out, CLASS_NAMES, [0, 1, 2], [2, 0, 2],
                          top_n=16, bottom_n=8, rejected_n=8, size=32)
    assert [len(s.tiles) for s in sheets] == [2, 1, 3]
    assert sum(len(s.tiles) for s in sheets) == 6
    assert all(t.status == "ok" for s in sheets for t in s.tiles)
    assert [s.path.name for s in sheets] == ["class_000.png", "class_001.png", "class_002.png"]
    with Image.open(sheets[2].path) as img:
        assert img.width >= 8 * 32 and img.height > 32


def test_tiles_missing_from_the_shards_are_marked_not_fatal(tmp_path):
    run = build_run(tmp_path)
    frame = pd.read_parquet(run / "train" / "selection" / "epoch_001.parquet")
    frame.loc[0, "uid"] = "not-in-any-shard"
    frame.loc[1, ["shard", "key"]] = [None, None]  # no pointer: found by scanning for its uid
    path = tmp_path / "edited.parquet"
    frame.to_parquet(path, index=False)
    sheets = build_sheets(ManifestRef(path, 1), run / "download" / "shards", tmp_path / "s", CLASS_NAMES, [0], [2],
                          top_n=4, bottom_n=0, rejected_n=0, size=16)
    assert {t.uid[:2]: t.status for t in sheets[0].tiles} == {"no": "missing", "u1": "ok"}


def test_tar_streaming_reads_only_wanted_members(tmp_path):
    run = build_run(tmp_path)
    samples = list(iter_samples(run / "download" / "shards" / "00000.tar", want=lambda key: key == "00000001"))
    assert [(key, sorted(files)) for key, files in samples] == [("00000001", ["json", "png"])]
    found = list(find_samples(run / "download" / "shards", [(UIDS[4], "00001", "00000004")]))
    assert [(uid, shard, key) for uid, shard, key, _ in found] == [(UIDS[4], "00001", "00000004")]
