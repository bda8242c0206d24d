"""kd3.data.tars: the shard reader every stage uses — same members as tarfile, plain keys only,
corrupt and truncated shards refused with a one-line error (issue 15: names from data never become paths)."""

from __future__ import annotations

import io
import tarfile

import pytest

from kd3.data.tars import TarFormatError, TarReadStats, is_plain_key, iter_members, iter_samples, split_member


def _tar(path, members, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes tarfile write a PAX record in PAX format
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_the_same_members_as_tarfile_in_every_format(tmp_path, fmt):
    members = [("000001.png", b"\x89PNG" * 300), ("000001.json", b'{"uid": "a"}'), ("000002.JPG", b""),
               ("000002.json", b"{}"), ("k" * 120 + ".txt", b"long name")]
    if fmt == tarfile.USTAR_FORMAT:
        members = members[:-1]  # ustar cannot store a 124-character name without a folder
    path = _tar(tmp_path / "a.tar", members, fmt)
    got = list(iter_members(path))
    assert got == [("000001", "png", b"\x89PNG" * 300), ("000001", "json", b'{"uid": "a"}'),
                   ("000002", "jpg", b""), ("000002", "json", b"{}"),
                   *([("k" * 120, "txt", b"long name")] if fmt != tarfile.USTAR_FORMAT else [])]
    assert [k for k, _ in iter_samples(path)] == ["000001", "000002"] + (["k" * 120] if fmt != tarfile.USTAR_FORMAT else [])


def test_member_names_that_are_not_plain_keys_are_skipped_and_counted(tmp_path):
    evil = ["../../../../x.png", "/etc/x.png", "dir/000003.png", "noext", ".hidden", "a b.png", "k\u00e9y.png"]
    path = _tar(tmp_path / "a.tar", [("000001.png", b"ok"), *[(name, b"bad") for name in evil]])
    stats = TarReadStats()
    assert list(iter_members(path, stats=stats)) == [("000001", "png", b"ok")]
    assert stats.refused_names == evil


def test_key_rules_golden():
    assert split_member("has.dot.png") == ("has", "dot.png")  # webdataset's rule: key up to the first dot
    assert split_member("000001.tar.gz") == ("000001", "tar.gz")
    assert split_member("../x.png") is None and split_member("a/b.png") is None and split_member("x.") is None
    assert is_plain_key("u0" + "f" * 30) and is_plain_key("a_b-C9")
    assert not any(is_plain_key(k) for k in ("", "has.dot", "../x", "a/b", "a b", "x" * 129))


def test_want_filter_reads_only_wanted_keys(tmp_path):
    path = _tar(tmp_path / "a.tar", [("000001.png", b"1"), ("000002.png", b"2"), ("000003.png", b"3")])
    assert [k for k, _ in iter_samples(path, want=lambda k: k != "000002")] == ["000001", "000003"]


def test_truncated_shard_yields_what_is_complete_then_a_one_line_error(tmp_path):
    path = _tar(tmp_path / "a.tar", [("000001.png", b"1" * 600), ("000002.png", b"2" * 5000)])
    data = path.read_bytes()
    path.write_bytes(data[:512 * 4])  # header 1, 2 data blocks, header 2, then cut inside member 2
    reader = iter_members(path)
    assert next(reader) == ("000001", "png", b"1" * 600)
    with pytest.raises(TarFormatError, match=r"a\.tar: truncated tar shard \(member '000002.png'"):
        next(reader)


def test_corrupt_header_is_refused_by_its_checksum(tmp_path):
    path = _tar(tmp_path / "a.tar", [("000001.png", b"1")])
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # flip bits inside the name field
    path.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match="bad header checksum at byte 0"):
        list(iter_members(path))
    (tmp_path / "empty.tar").write_bytes(b"")
    assert list(iter_members(tmp_path / "empty.tar")) == []
