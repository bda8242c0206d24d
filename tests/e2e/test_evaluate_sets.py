"""evaluate at toy scale on an image folder and a webdataset made from the private test split:
the same images give the same numbers as the .npz; per-class accuracy, reliability PNGs and the
distillation-data rows are written."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from kd3.cli import main
from tests.conftest import DEMO_CONFIG

pytestmark = pytest.mark.slow
N = 60


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_sets(source, dest):
    """The first N private test images as an .npz, an image folder and a two-shard webdataset."""
    with np.load(source) as data:
        images, labels = data["images"][:N], data["labels"][:N]
    np.savez(dest / "subset.npz", images=images, labels=labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = dest / "folder" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(png(image))
    (dest / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(dest / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard, N, 2):
                # labels as a class name (json) in one shard, as an index (.cls) in the other
                files = {"png": png(images[i]), **({"cls": str(int(labels[i])).encode()} if shard else
                                                  {"json": json.dumps({"label": str(int(labels[i]))}).encode()})}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_folder_and_webdataset_sets_match_the_npz_and_report_everything(toy_run, tmp_path):
    run_dir, overrides = toy_run
    for folder in ("download", "score"):
        shutil.copytree(run_dir / folder, tmp_path / folder)
    make_sets(run_dir / "demo-data" / "private_test.npz", tmp_path)
    datasets = (f"evaluate.datasets=[{{name: npz, path: {tmp_path / 'subset.npz'}}}, "
                f"{{name: folder, path: {tmp_path / 'folder'}}}, {{name: wds, path: {tmp_path / 'shards'}}}]")
    args = ["evaluate", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
            f"evaluate.teacher={run_dir / 'demo-data' / 'teacher.pt'}", datasets, "evaluate.distillation_samples=40",
            f"evaluate.students={{kd3: {run_dir / 'train' / 'last.pt'}, kd3-wakd: {run_dir / 'average' / 'wakd.pt'}}}"]
    assert main(args) == 0
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    rows = {(r["dataset"], r["model"]): r for r in report["rows"]}
    for model in ("teacher", "kd3", "kd3-wakd"):
        reference = rows[("npz", model)]
        assert reference["n"] == N
        for name in ("folder", "wds"):
            row = rows[(name, model)]
            for metric in ("top1", "top5", "ece", "agreement", "kl"):
                assert row.get(metric) == pytest.approx(reference.get(metric), abs=1e-6), (name, model, metric)
            assert row["per_class"] == pytest.approx(reference["per_class"], abs=1e-9, nan_ok=True)
        assert len(reference["per_class"]) == 10 and len(reference["reliability"]["count"]) == 15
        assert sum(reference["reliability"]["count"]) == N
    for name in ("npz", "folder", "wds"):
        assert (tmp_path / "evaluate" / f"reliability_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    distillation = {r["model"]: r for r in report["distillation_rows"]}
    assert set(distillation) == {"kd3", "kd3-wakd"} and distillation["kd3"]["n"] == 40
    assert 0 <= distillation["kd3"]["agreement"] <= 1 and distillation["kd3"]["kl"] >= 0
    assert [r["model"] for r in report["comparison"]] == ["teacher", "kd3", "kd3-wakd"]
    md = (tmp_path / "evaluate" / "report.md").read_text()
    assert "| kd3-wakd |" in md and "Per-class accuracy: wds" in md and "reliability_folder.png" in md


def test_unknown_class_folder_fails_before_any_work(toy_run, tmp_path, capsys):
    run_dir, overrides = toy_run
    (tmp_path / "folder" / "seven").mkdir(parents=True)
    args = ["evaluate", "--config", str(DEMO_CONFIG), "--run-dir", str(tmp_path), *overrides,
            f"evaluate.teacher={run_dir / 'demo-data' / 'teacher.pt'}",
            f"evaluate.students={{kd3: {run_dir / 'train' / 'last.pt'}}}",
            f"evaluate.datasets=[{{name: shifted, path: {tmp_path / 'folder'}}}]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluate.datasets.shifted" in err and "'seven'" in err and err.count("\n") == 0
    assert not (tmp_path / "evaluate").exists()
