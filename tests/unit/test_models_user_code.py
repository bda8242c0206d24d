"""A user's own nn.Module as a kd3 model: the automatic split, its override, the CIFAR-stem
torchvision ResNet, and the rule that a checkpoint alone never makes kd3 import code."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from kd3.config import parse_config
from kd3.errors import ConfigError, Kd3Error
from kd3.models import (InputSpec, ModelMeta, allow_user_code, build_model, check_checkpoint_code, import_state_dict,
                        load_model, save_checkpoint)
from kd3.models import user_code

NETS = textwrap.dedent('''
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes, width):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):  # functional pooling: no pool module to find
            return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


    def make_net(num_classes, width=4):
        return Net(num_classes, width)


    def sequential(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(8, num_classes))


    def no_linear(num_classes=10):
        return nn.Sequential(nn.Conv2d(3, num_classes, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


    def fixed_three_classes():
        return Net(3, 4)


    def not_a_module(num_classes=10):
        return "a string"
''')


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def build(arch, options=None, num_classes=10, size=16):
    with allow_user_code([arch]):
        return build_model(arch, num_classes, 3, options or {}, image_size=size)


def assert_consistent(model, size=16):
    """extract's triple reproduces the network's own forward and head(map) == logits."""
    model.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = model.extract(x)
    with torch.no_grad():
        reference = model.net(x)
    assert torch.allclose(out.logits, reference, atol=1e-5)
    assert torch.allclose(model.head(out.feature_map), reference, atol=1e-5)
    assert out.feature_map.shape[1] == model.feature_channels and out.pooled.shape[1] == model.feature_dim
    return out


def test_torchvision_resnet_split_is_layer4_and_fc():
    model = build("torchvision.models:resnet18", size=32)
    assert model.resolved_options == {"feature_map": "layer4", "classifier": "fc", "pool": "avg"}
    out = assert_consistent(model, 32)
    assert tuple(out.feature_map.shape[1:]) == (512, 1, 1)


def test_user_file_with_functional_pooling(nets):
    model = build(f"{nets}:make_net", {"width": 4})
    assert model.resolved_options == {"feature_map": "body", "classifier": "fc", "pool": "avg"}
    assert tuple(assert_consistent(model).feature_map.shape[1:]) == (8, 8, 8)
    assert model.num_classes == 10  # num_classes passed because the factory takes it


def test_sequential_cnn_with_max_pool_and_dropout(nets):
    model = build(f"{nets}:sequential")
    # the ReLU's output is the map (the pool's own 1x1 output is not), pooled by max; Dropout is skipped
    assert model.resolved_options == {"feature_map": "1", "classifier": "5", "pool": "max"}
    assert_consistent(model)


def test_a_model_without_linear_is_a_clear_error(nets):
    with pytest.raises(Kd3Error, match="no nn.Linear ran in the forward pass"):
        build(f"{nets}:no_linear")


def test_override_picks_the_named_module_and_a_wrong_one_is_refused(nets):
    model = build(f"{nets}:make_net", {"feature_map": "body.4"})  # the last ReLU: same tensor as "body"
    assert model.feature_name == "body.4"
    assert_consistent(model)
    with pytest.raises(Kd3Error, match=r"feature_map='body.2' does not give a \[B, 8, H, W\] map"):
        build(f"{nets}:make_net", {"feature_map": "body.2"})
    with pytest.raises(Kd3Error, match="names no sub-module"):
        build(f"{nets}:make_net", {"classifier": "head"})
    with pytest.raises(Kd3Error, match="is a ReLU, not an nn.Linear"):
        build(f"{nets}:make_net", {"classifier": "body.2"})


def test_a_resolved_split_rebuilds_without_a_probe(nets, monkeypatch):
    first = build(f"{nets}:make_net")
    monkeypatch.setattr(user_code.UserModel, "_detect", lambda *a: pytest.fail("probed again"))
    again = build(f"{nets}:make_net", first.resolved_options)
    again.load_state_dict(first.state_dict())
    assert_consistent(again)


def test_factory_problems_are_one_line_errors(nets):
    with pytest.raises(Kd3Error, match="not a torch.nn.Module"):
        build(f"{nets}:not_a_module")
    with pytest.raises(Kd3Error, match="has no attribute 'missing'"):
        build(f"{nets}:missing")
    with pytest.raises(Kd3Error, match="file not found"):
        build(f"{nets.parent}/absent.py:make_net")
    with pytest.raises(Kd3Error, match="unexpected keyword argument 'depth'"):
        build(f"{nets}:make_net", {"depth": 3})
    with pytest.raises(Kd3Error, match="has 3 outputs but 10 classes are expected"):
        build(f"{nets}:fixed_three_classes")
    with pytest.raises(Kd3Error, match="option 'num_classes' is set by kd3"):
        build(f"{nets}:make_net", {"num_classes": 3})


def test_torchvision_cifar_stem_loads_the_plain_state_dict(tmp_path):
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    weights = tmp_path / "resnet18_cifar.pth"
    torch.save(net.state_dict(), weights)
    spec = InputSpec(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model, meta = import_state_dict(weights, "torchvision/resnet18-cifar", 10, spec, None)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)
    assert tuple(model.extract(x).feature_map.shape[1:]) == (512, 2, 2)  # 16 px / 8: the stem keeps resolution
    with pytest.raises(Kd3Error, match="try --arch torchvision/resnet18-cifar"):
        import_state_dict(weights, "torchvision/resnet18", 10, spec, None)
    with pytest.raises(Kd3Error, match="downsample.*try --arch torchvision/resnet18-cifar"):
        import_state_dict(weights, "cifar_resnet18", 10, spec, None)
    with pytest.raises(Kd3Error, match="ResNet/ResNeXt/Wide ResNet only"):
        build_model("torchvision/vgg11-cifar", 10, 3)


# ------------------------------------------------------------------------------------ security
MARKER_MODULE = textwrap.dedent('''
    from pathlib import Path
    Path(__file__).with_name("imported.marker").write_text("imported")


    def build(num_classes=10):
        raise AssertionError("called")
''')


def _checkpoint(path, arch, options=None):
    meta = ModelMeta(arch=arch, options=options or {}, num_classes=10, class_names=[str(i) for i in range(10)],
                     input=InputSpec(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    save_checkpoint(path, nn.Linear(1, 1), meta)
    return path


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A module that leaves a marker file when imported, importable both by name and by path."""
    (tmp_path / "kd3_marker_mod.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
    yield tmp_path, calls
    assert not (tmp_path / "imported.marker").exists(), "user code was imported on a checkpoint's say"
    assert "kd3_marker_mod" not in sys.modules
    assert calls == [], "os.system was called"


@pytest.mark.parametrize("arch", ["os:system", "kd3_marker_mod:build", "{tmp}/kd3_marker_mod.py:build"])
def test_a_checkpoint_naming_code_is_refused_before_any_import(hostile, arch):
    tmp, _ = hostile
    arch = arch.format(tmp=tmp)
    ckpt = _checkpoint(tmp / "teacher.pt", arch)
    for load in (check_checkpoint_code, load_model):
        with pytest.raises(Kd3Error, match=rf"teacher.pt: architecture '{arch}' is code outside kd3.*run.user_code"):
            load(ckpt)
    # naming some other code does not vouch for this one
    with allow_user_code(["othermod:factory", f"{tmp}/other.py:build"]):
        with pytest.raises(Kd3Error, match="is code outside kd3"):
            load_model(ckpt)


def test_code_nested_in_a_student_checkpoint_is_refused(hostile):
    tmp, _ = hostile
    ckpt = _checkpoint(tmp / "student.pt", "kd3_student", {
        "student": {"arch": "small_cnn", "options": {}},
        "teacher": {"arch": "kd3_marker_mod:build", "options": {}}, "teacher_map_shape": [8, 2, 2]})
    with pytest.raises(Kd3Error, match="'kd3_marker_mod:build' is code outside kd3"):
        load_model(ckpt)


def test_the_score_stage_refuses_it_before_writing_anything(hostile, capsys):
    from kd3.cli import main
    from tests.conftest import DEMO_CONFIG

    tmp, _ = hostile
    ckpt = _checkpoint(tmp / "teacher.pt", "kd3_marker_mod:build")
    run = tmp / "run"
    (run / "download").mkdir(parents=True)
    (run / "download" / "meta.json").write_text('{"status": "complete"}')
    code = main(["score", "--config", str(DEMO_CONFIG), "--run-dir", str(run), f"score.teacher={ckpt}"])
    assert code == 2
    assert "'kd3_marker_mod:build' is code outside kd3" in capsys.readouterr().err
    assert not (run / "score").exists()


def test_run_user_code_entries_are_checked():
    with pytest.raises(ConfigError, match="run.user_code: 'small_cnn' is not user code"):
        parse_config({"run": {"user_code": ["small_cnn"]}, "download": {"url_list": "x"}, "score": {"teacher": "t"},
                      "evaluate": {"teacher": "t", "datasets": []}}, "cfg.yaml")


def test_allow_user_code_is_scoped():
    with allow_user_code(["a.b:c", "small_cnn"]):
        user_code.require_allowed("a.b:c")
    with pytest.raises(Kd3Error):
        user_code.require_allowed("a.b:c")


def test_registry_names_with_a_colon_are_not_user_code():
    assert not user_code.looks_like_user_arch("open_clip/hf-hub:timm/ViT-B-16-SigLIP")
    assert user_code.looks_like_user_arch("pkg.nets:make_net") and user_code.looks_like_user_arch("a/b.py:f")
    user_code.require_allowed("kd3_student", {"teacher": {"arch": "open_clip/hf-hub:org/model"}})  # no refusal
    with pytest.raises(Kd3Error, match="your own code is named 'package.module:factory'"):
        build_model("pkg.nets:make-net", 10, 3)
