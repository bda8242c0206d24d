"""Model registry: every family builds and exposes the uniform (feature map, pooled, logits) triple."""

import argparse

import pytest
import torch

from kd3.errors import Kd3Error
from kd3.models import MODELS, build_model

# (arch, options, in_channels, image size): small inputs keep the CPU cost low
FAMILIES = [
    ("small_cnn", {"widths": [8, 16]}, 1, 16),
    ("cifar_resnet18", {}, 3, 16),  # 32x32 shapes: test_cifar_shapes_follow_the_paper_models
    ("cifar_resnet34", {}, 3, 16),
    ("wrn_16_2", {}, 3, 16),
    ("wrn", {"depth": 10, "widen_factor": 1, "dropout": 0.1}, 3, 16),
    ("torchvision/resnet18", {}, 3, 32),
    ("torchvision/mobilenet_v3_small", {}, 3, 32),
    ("timm/test_resnet", {}, 3, 32),
    ("timm/test_vit", {"img_size": 32, "global_pool": "avg"}, 3, 32),
]


@pytest.mark.parametrize("arch, options, channels, size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_builds_uniform_triple(arch, options, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, 5, channels, options).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model.extract(x)
        logits = model(x)
        head = model.head(out.feature_map)
    assert out.feature_map.dim() == 4 and out.feature_map.shape[:2] == (2, model.feature_channels)
    assert out.pooled.shape == (2, model.feature_dim)
    assert out.logits.shape == (2, 5) and model.num_classes == 5
    assert model.supports_feature_alignment
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(head, out.logits, rtol=1e-5, atol=1e-5)


def test_cifar_shapes_follow_the_paper_models():
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert build_model("cifar_resnet18", 10, 3).eval().forward_features(x).shape == (1, 512, 4, 4)
        assert build_model("wrn_16_2", 10, 3).eval().forward_features(x).shape == (1, 128, 8, 8)
    # WRN-40-2: 6 blocks per stage; WRN-28-10 is 640 channels wide
    assert len(build_model("wrn_40_2", 10, 3).block1.layer) == 6
    assert build_model("wrn_28_10", 10, 3).feature_channels == 640


def test_cifar_state_dict_names_match_the_public_cifar_code():
    """Users' CIFAR teachers (DAFL/CMI/kuangliu ResNets, xternalz WRNs) must load without renaming."""
    resnet = build_model("cifar_resnet34", 10, 3).state_dict()
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer4.2.conv2.weight",
            "linear.weight", "linear.bias"} <= set(resnet)
    assert not any(k.startswith("layer1.0.shortcut") for k in resnet)  # identity shortcut in stage 1
    wrn = build_model("wrn_40_2", 10, 3).state_dict()
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
            "block3.layer.5.conv2.weight", "bn1.running_var", "fc.weight"} <= set(wrn)


def test_wrn_aliases_equal_wrn_with_options():
    alias = build_model("wrn_16_2", 10, 3)
    generic = build_model("wrn", 10, 3, {"depth": 16, "widen_factor": 2})
    assert {k: v.shape for k, v in alias.state_dict().items()} == {k: v.shape for k, v in generic.state_dict().items()}


def test_torchvision_adapter_equals_torchvision_forward_and_adapts_channels():
    model = build_model("torchvision/resnet18", 4, 1).eval()
    assert model.net.conv1.in_channels == 1 and model.native_prefix == "net."
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.extract(x).logits, model.net(x))
    assert next(iter(model.state_dict())).startswith("net.")


def test_timm_in_chans_and_class_token_vit():
    assert build_model("timm/test_resnet", 3, 1).net.conv1[0].in_channels == 1
    vit = build_model("timm/test_vit", 3, 3, {"img_size": 32}).eval()  # timm's default: class-token pooling
    assert not vit.supports_feature_alignment
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vit.extract(x)
        torch.testing.assert_close(out.logits, vit.net(x))  # logits + pooled still exact
    assert out.feature_map.shape == (2, vit.feature_channels, 2, 2)  # 32 / patch 16: a 2x2 patch grid
    with pytest.raises(Kd3Error, match="class token.*global_pool: avg"):
        vit.head(out.feature_map)


@pytest.mark.parametrize("name, expected", [
    ("resnet18", "did you mean cifar_resnet18.*torchvision/resnet18.*timm/resnet18"),
    ("cifar_resnet19", "did you mean cifar_resnet18"),
    ("torchvision/resnet181", "unknown torchvision model 'resnet181'; did you mean torchvision/resnet18"),
    ("timm/resnet1888", "unknown timm model 'resnet1888'; did you mean timm/resnet18"),
    ("open_clip/ViT-B-33", "unknown open_clip model 'ViT-B-33'; did you mean open_clip/ViT-B-32"),
    ("tv/resnet18", "unknown model family 'tv'.*torchvision/, timm/, open_clip/"),
    ("torchvision/vit_b_16", "family 'vision_transformer' is not supported.*ResNet/ResNeXt/Wide ResNet.*MobileNetV3"),
])
def test_unknown_names_are_clear_errors(name, expected):
    with pytest.raises(Kd3Error, match=expected):
        build_model(name, 10, 3)


def test_prefixed_names_resolve_through_models_get():
    factory = MODELS.get("torchvision/mobilenet_v3_small")
    assert callable(factory) and factory(num_classes=3, in_channels=3).num_classes == 3
    assert MODELS.resolvable("timm/resnet18") and not MODELS.resolvable("timm/nope_net")


@pytest.mark.parametrize("arch, options, expected", [
    ("wrn", {"depth": 20}, "depth must be 6n\\+4"),
    ("cifar_resnet18", {"widen": 2}, "bad options \\(widen\\)"),
    ("torchvision/resnet18", {"weights": "DEFAULT"}, "option 'weights' is not accepted.*import-checkpoint"),
    ("timm/test_resnet", {"pretrained": True}, "option 'pretrained' is not accepted"),
])
def test_bad_options_are_clear_errors(arch, options, expected):
    with pytest.raises(Kd3Error, match=expected):
        build_model(arch, 10, 3, options)


def test_models_command_lists_local_entries_and_families(capsys):
    from kd3.commands import models

    assert models.main(argparse.Namespace(pattern="")) == 0
    text = capsys.readouterr().out
    for name in ("small_cnn", "cifar_resnet34", "wrn_40_2", "torchvision/<name>", "timm/<name>", "open_clip/<name>"):
        assert name in text
    assert "timm/resnet18\n" not in text  # the library names are listed only for a pattern
    assert models.main(argparse.Namespace(pattern="torchvision/resnet1")) == 0
    lines = capsys.readouterr().out.split()
    assert "torchvision/resnet18" in lines and "torchvision/resnet152" in lines
    assert not any(line.startswith(("timm/", "cifar")) for line in lines)
    assert models.main(argparse.Namespace(pattern="resnet34")) == 0
    lines = capsys.readouterr().out.split()
    assert {"cifar_resnet34", "torchvision/resnet34", "timm/resnet34"} <= set(lines)


def test_cluster_example_pipeline_validates_and_uses_registered_models():
    from pathlib import Path

    from kd3.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "pipelines" / "cifar_web.yaml")
    assert MODELS.resolvable(cfg.train.student.arch) and cfg.train.student.arch == "cifar_resnet18"
    assert cfg.train.epochs == 240 and cfg.download.processes_count == 16
