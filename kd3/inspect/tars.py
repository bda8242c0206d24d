"""Finding samples in webdataset tar shards by uid, keeping only the wanted samples' bytes.

Used by contact sheets and export instead of :func:`kd3.data.shards.iter_raw_samples`, which
imports torch: here a sample's data is copied only when its key is wanted
(:func:`kd3.data.tars.iter_samples`), so picking a few hundred tiles out of a large pool costs
one pass over the needed shards. Only plain ``key.ext`` members are ever read (kd3.data.tars).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from kd3.data.tars import is_plain_key, iter_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_entry(files: dict[str, bytes]) -> Optional[tuple[str, bytes]]:
    ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    return (ext, files[ext]) if ext else None


def sample_uid(key: str, files: dict[str, bytes]) -> str:
    """The uid a sample carries in its json (img2dataset's saved column), else its key."""
    if "json" in files:
        try:
            uid = json.loads(files["json"]).get("uid")
        except (json.JSONDecodeError, AttributeError):
            uid = None
        if uid:
            return str(uid)
    return key


def _text(value: object) -> Optional[str]:
    """A manifest cell as text; None for null/NaN (pandas turns missing strings into NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value) or None


def find_samples(shards_dir: Path, wanted: list[tuple[str, Optional[str], Optional[str]]]
                 ) -> Iterator[tuple[str, str, str, dict[str, bytes]]]:
    """(uid, shard, key, files) for each wanted (uid, shard, key) found in ``shards_dir``.

    The manifest's shard and key point at the sample; its json must carry the same uid (a stale
    manifest from another download would otherwise show the wrong image). Rows without a usable
    shard/key, or whose uid did not match, are looked for by uid in every shard, once at the end.
    Uids found nowhere are simply not yielded; callers count them.
    """
    shards_dir = Path(shards_dir)
    by_shard: dict[str, dict[str, str]] = {}
    loose: set[str] = set()
    for uid, shard, key in wanted:
        shard, key = _text(shard), _text(key)
        # a manifest cell never becomes a path unless it is a plain shard name
        if shard and key and is_plain_key(shard) and (shards_dir / f"{shard}.tar").is_file():
            by_shard.setdefault(shard, {})[key] = uid
        else:
            loose.add(uid)
    for shard in sorted(by_shard):
        keys = by_shard[shard]
        for key, files in iter_samples(shards_dir / f"{shard}.tar", want=lambda k, keys=keys: k in keys):
            uid = keys[key]
            if sample_uid(key, files) != uid:
                loose.add(uid)
                continue
            yield uid, shard, key, files
    if not loose:
        return
    for path in sorted(shards_dir.glob("*.tar")):
        for key, files in iter_samples(path):
            uid = sample_uid(key, files)
            if uid in loose:
                loose.discard(uid)
                yield uid, path.stem, key, files
        if not loose:
            return
