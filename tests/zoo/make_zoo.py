"""The bad-input zoo: small broken files kd3 must refuse clearly (or read correctly), made on demand.

Every maker writes into a folder it is given (the tests pass a tmp dir) and returns the path(s);
nothing here touches the network. ``python tests/zoo/make_zoo.py DIR`` writes the whole zoo into
DIR, to try kd3 on by hand. docs/reliability.md lists each case, kd3's outcome and its test.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


# ------------------------------------------------------------------------------------------- images
def png16(folder: Path) -> tuple[Path, Path]:
    """A 16-bit grey PNG using the whole 0..65535 range, and its 8-bit copy (high byte, rounded)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    wide, narrow = folder / "grey16.png", folder / "grey8.png"
    Image.fromarray(values).save(wide)
    Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)).save(narrow)
    return wide, narrow


def png_bytes(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- evaluation sets
def npz_float_labels(folder: Path) -> Path:
    """Labels 1.7 and 3.9 (would be truncated to 1 and 3 by astype(int))."""
    path = folder / "float_labels.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8), labels=np.array([1.7, 3.9]))
    return path


def npz_rgba(folder: Path) -> Path:
    """Four-channel (RGBA) images [N, H, W, 4]."""
    path = folder / "rgba.npz"
    np.savez(path, images=np.zeros((3, 8, 8, 4), np.uint8), labels=np.array([0, 1, 2]))
    return path


def labelled_tar(path: Path, n: int = 6) -> Path:
    """A webdataset shard of ``n`` labelled 8x8 grey PNGs (cls field)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", png_bytes(np.full((8, 8), 20 * i, np.uint8))), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its size (an interrupted copy)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return path


def truncated_tar(folder: Path, keep: float = 0.33) -> Path:
    """A labelled shard cut inside a member's data (0.33 of 20 KiB), or at a member boundary (keep=0.3)."""
    return truncate(labelled_tar(folder / "truncated.tar"), keep)


# ------------------------------------------------------------------------------------------ checkpoints
def pickled_checkpoint(folder: Path) -> Path:
    """A kd3-looking checkpoint that also pickles an arbitrary object (whose unpickling would run code)."""
    import torch

    path = folder / "pickled.pt"
    torch.save({"kd3_checkpoint": 1, "model": {"arch": "small_cnn"}, "state_dict": {}, "extra": Exploit()}, path)
    return path


class Exploit:
    """Unpickling calls print: stands for any code a pickle can run."""

    def __reduce__(self):
        return (print, ("unpickled: a weights-only load would never do this",))


def raw_pickle(folder: Path) -> Path:
    """A plain pickle file, not a torch checkpoint at all."""
    path = folder / "raw_pickle.pt"
    path.write_bytes(pickle.dumps({"kd3_checkpoint": 1, "extra": Exploit()}))
    return path


def other_teacher(teacher: Path, folder: Path, num_classes: int | None = None) -> Path:
    """Another kd3 teacher of the same architecture: the same with perturbed weights, or a fresh one
    with ``num_classes`` classes."""
    import torch

    from kd3.models import ModelMeta, build_model, load_model, save_checkpoint

    model, meta, _ = load_model(teacher)
    if num_classes is not None:
        meta = ModelMeta(arch=meta.arch, options=meta.options, num_classes=num_classes,
                         class_names=[str(i) for i in range(num_classes)], input=meta.input)
        model = build_model(meta.arch, num_classes, meta.input.channels, meta.options)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    path = folder / f"other_teacher_{num_classes or 'same'}.pt"
    save_checkpoint(path, model, meta)
    return path


def wrong_architecture(teacher: Path, folder: Path) -> Path:
    """The teacher's weights under another architecture's name (wider small_cnn)."""
    import torch

    payload = torch.load(teacher, weights_only=True)
    payload["model"]["options"] = {**payload["model"].get("options", {}), "widths": [8, 8, 8]}
    path = folder / "wrong_arch.pt"
    torch.save(payload, path)
    return path


# ------------------------------------------------------------------------------------ configs, lists
CONFIGS = {
    "bad_yaml.yaml": "run: {seed: 0\n",
    "unknown_key.yaml": "run: {seed: 0, sede: 1}\n",
    "wrong_type.yaml": "run: {seed: zero}\n",
    "out_of_range.yaml": "train: {epochs: 0}\n",
    "bool_as_int.yaml": "train: {epochs: true}\n",
}


def configs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, text in CONFIGS.items():
        (folder / name).write_text(text)
        out[name] = folder / name
    return out


def url_lists(folder: Path) -> dict[str, Path]:
    """An empty list, one with only blank URLs, one with img2dataset's reserved columns, one without a url column."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    out = {"empty": folder / "empty.txt", "blank": folder / "blank.csv", "reserved": folder / "reserved.parquet",
           "no_url": folder / "no_url.csv"}
    out["empty"].write_text("# nothing here\n")
    out["blank"].write_text("url\n\n\n")
    pd.DataFrame({"url": ["http://127.0.0.1/a.png"], "status": ["x"]}).to_parquet(out["reserved"])
    out["no_url"].write_text("link\nhttp://127.0.0.1/a.png\n")
    return out


# ------------------------------------------------------------------------------------------ run folders
def truncate_shard(run_dir: Path, keep: float = 0.1) -> Path:
    """Cut the first download shard of a run (after download finished)."""
    shard = sorted((Path(run_dir) / "download" / "shards").glob("*.tar"))[0]
    return truncate(shard, keep)


def forget_outputs(run_dir: Path, stage: str) -> None:
    """Drop a stage's recorded output fingerprints, as a stage folder written by an older kd3 has none."""
    meta_path = Path(run_dir) / stage / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("outputs", None)
    meta_path.write_text(json.dumps(meta, indent=2))


def make_all(folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = [*png16(folder / "images"), npz_float_labels(folder), npz_rgba(folder), truncated_tar(folder),
            pickled_checkpoint(folder), raw_pickle(folder)]
    made += list(configs(folder / "configs").values()) + list(url_lists(folder / "url_lists").values())
    return made


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/zoo/make_zoo.py DIR")
    for made_path in make_all(Path(sys.argv[1])):
        print(made_path)
