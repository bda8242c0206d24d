"""Checkpoints: save/load round trips, safe loading, and importing a user's bare state dict."""

import argparse
import collections

import pytest
import torch
import torchvision

from kd3.cli import main as kd3_main
from kd3.errors import Kd3Error
from kd3.models import (InputSpec, ModelMeta, build_model, import_state_dict, load_model, read_checkpoint,
                        read_state_dict, save_checkpoint)

RGB32 = InputSpec(image_size=32, channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


class NotATensor:
    """Stands for any object a weights-only loader must refuse to unpickle."""


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("arch, options, channels", [
    ("small_cnn", {"widths": [8, 16]}, 1),
    ("cifar_resnet18", {}, 3),
    ("wrn_16_2", {"dropout": 0.3}, 3),
    ("torchvision/resnet18", {}, 3),
    ("timm/test_resnet", {}, 3),
])
def test_save_load_round_trip_gives_identical_logits(tmp_path, arch, options, channels):
    torch.manual_seed(0)
    model = build_model(arch, 4, channels, options).eval()
    spec = InputSpec(image_size=16, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    meta = ModelMeta(arch=arch, options=options, num_classes=4, class_names=["a", "b", "c", "d"], input=spec)
    save_checkpoint(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta, payload = load_model(tmp_path / "m.pt")
    x = torch.randn(2, channels, 16, 16)
    assert torch.equal(_logits(model, x), _logits(loaded, x))
    assert loaded_meta == meta and payload["kd3_checkpoint"] == 1


def test_checkpoint_of_another_arch_is_a_clear_one_line_error(tmp_path):
    model = build_model("cifar_resnet18", 10, 3)
    save_checkpoint(tmp_path / "m.pt", model, ModelMeta("cifar_resnet18", {}, 10, [], RGB32))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["model"]["arch"] = "cifar_resnet34"
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(Kd3Error) as info:
        load_model(tmp_path / "wrong.pt")
    message = str(info.value)
    assert "wrong.pt: weights do not fit the architecture: missing keys ['layer1.2.conv1.weight'" in message
    assert "\n" not in message


def test_pickled_arbitrary_object_is_refused(tmp_path):
    torch.save({"kd3_checkpoint": 1, "payload": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(Kd3Error, match=r"evil.pt: not loadable as a plain-weights file: it contains a pickled "
                                       r"\S*NotATensor object, and arbitrary objects are never unpickled") as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    # a whole pickled module (torch.save(model)) is refused the same way, naming its class
    torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / "whole_model.pth")
    with pytest.raises(Kd3Error, match=r"pickled torchvision\.models\.resnet\.ResNet object.*model\.state_dict\(\)"):
        import_state_dict(tmp_path / "whole_model.pth", "torchvision/resnet18", 10, RGB32, None)


@pytest.fixture(scope="module")
def user_resnet18():
    """A user's torchvision ResNet-18 trained on 10 classes: (native model, its bare state dict)."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong load would show in the logits
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net, net.state_dict()


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "net_with_metrics", "ddp", "timm_train"])
def test_import_state_dict_accepts_common_layouts(tmp_path, wrap):
    torch.manual_seed(2)
    state = torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()  # small: six files to write
    payload = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 90},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "net_with_metrics": {"net": state, "acc": 95.1, "epoch": 200},  # pytorch-cifar layout
        "ddp": collections.OrderedDict((f"module.{k}", v) for k, v in state.items()),
        # timm's train.py / torchvision's references: the argparse Namespace rides along
        "timm_train": {"epoch": 5, "arch": "resnet18", "state_dict": state, "args": argparse.Namespace(lr=0.1)},
    }[wrap]
    torch.save(payload, tmp_path / "user.pth")
    model, meta = import_state_dict(tmp_path / "user.pth", "torchvision/mobilenet_v3_small", 10, RGB32, None)
    loaded = model.net.state_dict()  # logits equality is checked once, in the command test below
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and not model.training
    assert meta.arch == "torchvision/mobilenet_v3_small" and meta.class_names == [str(i) for i in range(10)]


def test_import_wrong_class_count_or_arch_names_the_offending_keys(tmp_path, user_resnet18):
    torch.save(user_resnet18[1], tmp_path / "user.pth")
    with pytest.raises(Kd3Error) as info:
        import_state_dict(tmp_path / "user.pth", "torchvision/resnet18", 100, RGB32, None)
    message = str(info.value)
    assert ("user.pth: weights do not fit the architecture: shape mismatch "
            "['fc.weight (10, 512) vs model (100, 512)'") in message
    assert "check --arch/--num-classes" in message and "\n" not in message
    with pytest.raises(Kd3Error, match=r"missing keys \['layer1\.2\.conv1\.weight'"):
        import_state_dict(tmp_path / "user.pth", "torchvision/resnet34", 10, RGB32, None)


def test_import_fills_missing_batchnorm_counters_and_rejects_non_tensor_entries(tmp_path):
    model = build_model("cifar_resnet18", 10, 3)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    imported, _ = import_state_dict(tmp_path / "old.pth", "cifar_resnet18", 10, RGB32, None)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(imported, x), _logits(model, x))
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, tmp_path / "odd.pth")
    with pytest.raises(Kd3Error, match="entry 'note' is a str, not a tensor"):
        read_state_dict(tmp_path / "odd.pth")


def test_import_checkpoint_command_writes_a_loadable_teacher(tmp_path, user_resnet18, capsys):
    net, state = user_resnet18
    torch.save({"state_dict": state}, tmp_path / "user.pth")
    (tmp_path / "classes.txt").write_text("\n".join(f"class_{i}" for i in range(10)) + "\n")
    args = ["import-checkpoint", "--weights", str(tmp_path / "user.pth"), "--arch", "torchvision/resnet18",
            "--class-names", str(tmp_path / "classes.txt"), "--image-size", "32", "--channels", "3",
            "--mean", "0.49", "0.48", "0.45", "--std", "0.25", "0.24", "0.26", "--out", str(tmp_path / "teacher.pt")]
    assert kd3_main(args) == 0
    assert "wrote" in capsys.readouterr().out
    teacher, meta, payload = load_model(tmp_path / "teacher.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(teacher, x), _logits(net, x))
    assert meta.class_names[3] == "class_3" and meta.input == RGB32 and "imported_from" in payload
    # --out exists: refused without --overwrite
    assert kd3_main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # a wrong class count fails with one clear line and writes nothing
    bad = [a if a != str(tmp_path / "teacher.pt") else str(tmp_path / "bad.pt") for a in args]
    (tmp_path / "classes.txt").write_text("\n".join(f"class_{i}" for i in range(7)))
    assert kd3_main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape mismatch ['fc.weight (10, 512) vs model (7, 512)'" in err
    assert not (tmp_path / "bad.pt").exists()


def test_import_checkpoint_command_checks_the_input_spec(tmp_path, capsys):
    torch.save(build_model("wrn_16_2", 10, 3).state_dict(), tmp_path / "wrn.pth")
    base = ["import-checkpoint", "--weights", str(tmp_path / "wrn.pth"), "--arch", "wrn",
            "--options", "{depth: 16, widen_factor: 2}", "--num-classes", "10", "--image-size", "32",
            "--out", str(tmp_path / "t.pt")]
    assert kd3_main(base + ["--mean", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"]) == 2
    assert "input mean has 2 values for 3 channels" in capsys.readouterr().err
    assert kd3_main(base + ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"]) == 0
    assert load_model(tmp_path / "t.pt")[1].options == {"depth": 16, "widen_factor": 2}
