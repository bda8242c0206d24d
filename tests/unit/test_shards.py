"""Shard canonicalisation: sample order depends on content, not on download completion order."""

import json
import tarfile

import webdataset as wds

from kd3.data.shards import canonicalize_shard, iter_raw_samples


def write_shard(path, keys):
    with wds.TarWriter(str(path)) as sink:
        for key in keys:
            sink.write({"__key__": key, "png": f"img-{key}".encode(), "json": json.dumps({"uid": f"u{key}"}).encode()})


def test_canonical_order_is_independent_of_write_order(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, ["0003", "0001", "0002"])
    write_shard(b, ["0002", "0003", "0001"])
    assert canonicalize_shard(a) == 3 and canonicalize_shard(b) == 3
    order_a = [s["uid"] for s in iter_raw_samples([a])]
    order_b = [s["uid"] for s in iter_raw_samples([b])]
    assert order_a == order_b == ["u0001", "u0002", "u0003"]
    # bytes survive and a second pass changes nothing
    assert [s["bytes"] for s in iter_raw_samples([a])] == [b"img-0001", b"img-0002", b"img-0003"]
    before = a.read_bytes()
    canonicalize_shard(a)
    assert a.read_bytes() == before
    with tarfile.open(a) as tar:
        assert [m.name for m in tar.getmembers()] == ["0001.json", "0001.png", "0002.json", "0002.png",
                                                      "0003.json", "0003.png"]
        # plain headers: webdataset's TarWriter writes a PAX record per member (float mtime), which
        # doubles the header blocks every later reading of the shard parses
        assert not any(m.pax_headers for m in tar.getmembers())
