"""Evaluation-set readers: image folders (class names → teacher classes), webdataset shards, .npz."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kd3.data.eval_sets import detect_format, fingerprint, open_eval_set, parse_label
from kd3.errors import Kd3Error

CLASSES = ["cat", "dog", "fish"]


def png(value: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def collect(data, batch_size=2):
    images, labels = [], []
    for batch, y in data.batches(batch_size):
        images += list(batch)
        labels += y.tolist()
    return images, labels


def test_image_folder_maps_class_folders_to_teacher_classes_and_keeps_sizes(tmp_path):
    for i, (name, size) in enumerate([("dog", 8), ("fish", 12), ("dog", 20)]):
        (tmp_path / name / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "sub" / f"{i}.png").write_bytes(png(10 * i, size))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "fish" / "broken.jpg").write_bytes(b"not really")
    assert detect_format(tmp_path) == "folder"
    data = open_eval_set("shift", tmp_path, CLASSES)
    images, labels = collect(data)
    assert labels == [1, 1, 2]  # dog, dog, fish (sorted folders, then files)
    assert [tuple(im.shape) for im in images] == [(1, 8, 8), (1, 20, 20), (1, 12, 12)]
    assert data.skipped == 1  # the undecodable .jpg


def test_unknown_class_folder_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "wolf").mkdir()
    with pytest.raises(Kd3Error, match=r"\['wolf'\].*not teacher classes.*cat, dog, fish") as err:
        open_eval_set("x", tmp_path, CLASSES)
    assert "\n" not in str(err.value)


def test_webdataset_labels_from_cls_json_or_a_named_key(tmp_path):
    write_tar(tmp_path / "a.tar", [("000", {"png": png(1, 8), "cls": b"2"}),
                                   ("001", {"png": png(2, 8), "json": json.dumps({"label": "dog"}).encode()})])
    write_tar(tmp_path / "b.tar", [("002", {"jpg": png(3, 9), "cls": b"cat"})])
    assert detect_format(tmp_path) == "webdataset" and detect_format(tmp_path / "a.tar") == "webdataset"
    for path in (tmp_path, tmp_path / "{a,b}.tar", tmp_path / "*.tar"):
        _, labels = collect(open_eval_set("w", path, CLASSES))
        assert labels == [2, 1, 0], path
    write_tar(tmp_path / "c.tar", [("003", {"png": png(1, 8), "txt": b"fish"})])
    _, labels = collect(open_eval_set("w", tmp_path / "c.tar", CLASSES, label_key="txt"))
    assert labels == [2]
    with pytest.raises(Kd3Error, match="no label field"):
        collect(open_eval_set("w", tmp_path / "c.tar", CLASSES))


def test_label_parsing_and_npz(tmp_path):
    assert parse_label(b" 1\n", CLASSES, "here") == 1 and parse_label("fish", CLASSES, "here") == 2
    with pytest.raises(Kd3Error, match="outside 0..2"):
        parse_label(7, CLASSES, "here")
    with pytest.raises(Kd3Error, match="'wolf' is not a teacher class"):
        parse_label("wolf", CLASSES, "here")
    np.savez(tmp_path / "set.npz", images=np.zeros((5, 4, 4), np.uint8), labels=np.array([0, 1, 2, 0, 1]))
    data = open_eval_set("n", tmp_path / "set.npz", CLASSES)
    batches = list(data.batches(2))
    assert [tuple(b.shape) for b, _ in batches] == [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2, 0, 1]
    assert fingerprint(tmp_path / "set.npz") == fingerprint(tmp_path / "set.npz", "npz")
    with pytest.raises(Kd3Error, match="not found"):
        detect_format(tmp_path / "missing")
