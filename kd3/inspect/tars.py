"""Streaming webdataset tar shards a member at a time, keeping only the wanted samples' bytes.

Used by contact sheets and export instead of :func:`kd3.data.shards.iter_raw_samples`, which
decodes every sample and imports torch: here a sample's data is read only when its key is wanted,
so picking a few hundred tiles out of a large pool costs one sequential read of the needed shards.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from kd3.errors import Kd3Error

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's rule: the key is the path up to the first dot of the file name, the rest the extension
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member(name: str) -> Optional[tuple[str, str]]:
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


def iter_samples(tar_path: Path, want: Optional[Callable[[str], bool]] = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample in file order; only keys for which ``want(key)`` holds are read."""
    try:
        tar = tarfile.open(tar_path, mode="r|*")  # stream mode: no index, no seeking, constant memory
    except (OSError, tarfile.TarError) as exc:
        raise Kd3Error(f"{tar_path}: not a readable tar shard ({exc})") from None
    key: Optional[str] = None
    files: dict[str, bytes] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = split_member(member.name)
            if parts is None:
                continue  # e.g. a stray file without extension
            if parts[0] != key:
                if files:
                    yield key, files  # type: ignore[misc]
                key, files = parts[0], {}
            if want is not None and not want(parts[0]):
                continue  # skipping = not reading the member; the stream moves past it
            handle = tar.extractfile(member)
            if handle is not None:
                files[parts[1]] = handle.read()
    if files:
        yield key, files  # type: ignore[misc]


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
    return _base(key)


def _base(key: str) -> str:
    """A sample key without folders inside the tar (img2dataset writes none, other tools may)."""
    return key.rsplit("/", 1)[-1]


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
        if shard and key and (shards_dir / f"{shard}.tar").is_file():
            by_shard.setdefault(shard, {})[key] = uid
        else:
            loose.add(uid)
    for shard in sorted(by_shard):
        keys = by_shard[shard]
        for key, files in iter_samples(shards_dir / f"{shard}.tar", want=lambda k, keys=keys: _base(k) in keys):
            base = _base(key)
            uid = keys[base]
            if sample_uid(key, files) != uid:
                loose.add(uid)
                continue
            yield uid, shard, base, files
    if not loose:
        return
    for path in sorted(shards_dir.glob("*.tar")):
        for key, files in iter_samples(path):
            uid = sample_uid(key, files)
            if uid in loose:
                loose.discard(uid)
                yield uid, path.stem, _base(key), files
        if not loose:
            return
