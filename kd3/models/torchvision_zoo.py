"""torchvision classification models as kd3 models: ``torchvision/<name>``, e.g. ``torchvision/resnet18``.

Built with ``weights=None`` and ``num_classes`` (trained weights come from a checkpoint: ``kd3
import-checkpoint``). The torchvision module is kept whole under ``net``, so a user's torchvision
state dict loads as-is (prefix ``net.``) and ``forward`` equals torchvision's own forward.

Per family, the uniform triple is (feature map = output of the last conv stage, pooled = the
input of the last linear layer, logits):

============== ======================================== ===========================================
family         feature map                              pooled (D)
============== ======================================== ===========================================
ResNet/ResNeXt ``layer4`` output                        GAP (fc.in_features)
/Wide ResNet
RegNet         ``trunk_output`` output                  GAP
MobileNetV2/V3 ``features`` output                      GAP (V3: the classifier MLP stays in the head)
EfficientNet   ``features`` output                      GAP
ConvNeXt       ``features`` output                      GAP + LayerNorm2d (pre-logits)
VGG, AlexNet   ``features`` output                      avgpool (7x7 / 6x6) → flatten → all classifier
                                                        layers but the last (the 4096-d "fc7")
DenseNet       ReLU(``features``)                       GAP
ShuffleNetV2   ``conv5`` output                         GAP
MNASNet        ``layers`` output                        GAP
============== ======================================== ===========================================

``torchvision/<resnet>-cifar`` (e.g. ``torchvision/resnet18-cifar``) is the same ResNet with the
CIFAR stem most CIFAR training code puts on torchvision's model: ``conv1`` a 3x3 stride-1 conv
(padding 1, no bias) and ``maxpool`` an ``Identity``; its state dict keys are torchvision's.

Other torchvision families (ViT, Swin, MaxViT, GoogLeNet, Inception, SqueezeNet) are refused with
a clear error; timm (``timm/<name>``) covers those architectures.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model

#: torchvision.models sub-module → family label, for the families kd3 can split into the triple
SUPPORTED_FAMILIES = {
    "resnet": "ResNet/ResNeXt/Wide ResNet",
    "regnet": "RegNet",
    "mobilenetv2": "MobileNetV2",
    "mobilenetv3": "MobileNetV3",
    "efficientnet": "EfficientNet (V1/V2)",
    "convnext": "ConvNeXt",
    "vgg": "VGG",
    "alexnet": "AlexNet",
    "densenet": "DenseNet",
    "shufflenetv2": "ShuffleNetV2",
    "mnasnet": "MNASNet",
}


#: suffix of the CIFAR-stem variants: conv1 = 3x3 stride 1 padding 1 (no bias), maxpool = Identity
CIFAR_SUFFIX = "-cifar"


def _library_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def cifar_names() -> list[str]:
    """``<resnet>-cifar`` for every torchvision ResNet/ResNeXt/Wide ResNet."""
    import torchvision

    return [f"{n}{CIFAR_SUFFIX}" for n in _library_names()
            if torchvision.models.get_model_builder(n).__module__.endswith(".resnet")]


def list_names() -> list[str]:
    """Every torchvision classification model name (supported family or not), plus the CIFAR-stem variants."""
    return sorted(_library_names() + cifar_names())


def family_of(name: str) -> str:
    """torchvision/<name> → family key; unknown or unsupported names are a Kd3Error."""
    import torchvision

    names = list_names()
    if name.endswith(CIFAR_SUFFIX) and name not in names and name[: -len(CIFAR_SUFFIX)] in names:
        raise Kd3Error(f"torchvision/{name}: the {CIFAR_SUFFIX} stem exists for ResNet/ResNeXt/Wide ResNet only "
                       f"(`kd3 models {CIFAR_SUFFIX}` lists them)")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join('torchvision/' + c for c in close)}?" if close else \
            "; `kd3 models torchvision/` lists them"
        raise Kd3Error(f"unknown torchvision model {name!r}{hint}")
    family = torchvision.models.get_model_builder(name.removesuffix(CIFAR_SUFFIX)).__module__.rsplit(".", 1)[-1]
    if family not in SUPPORTED_FAMILIES:
        raise Kd3Error(f"torchvision/{name}: family {family!r} is not supported by kd3 (needs a feature map → "
                       f"pool → linear split); supported: {', '.join(SUPPORTED_FAMILIES.values())}; "
                       f"for other architectures use timm/<name>")
    return family


def replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d (the stem) for one with ``in_channels`` inputs, same geometry, fresh init."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=1,
                            bias=module.bias is not None, padding_mode=module.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
            return
    raise Kd3Error("cannot adapt the input channels: the model has no Conv2d stem")


def _gap(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(2, 3))


class TorchvisionModel(Kd3Model):
    """A torchvision classifier split into the kd3 triple; ``net`` is the untouched torchvision module."""

    native_prefix = "net."

    def __init__(self, net: nn.Module, family: str, name: str, num_classes: int):
        super().__init__()
        self.net = net
        self.family = family
        self.arch_name = f"torchvision/{name}"
        self.num_classes = num_classes
        self.feature_channels, self.feature_dim = self._dims()

    # ------------------------------------------------------------------------------- dimensions
    def _dims(self) -> tuple[int, int]:
        n, f = self.net, self.family
        if f in ("resnet", "regnet", "shufflenetv2"):
            d = n.fc.in_features
            return d, d
        if f in ("mobilenetv2", "efficientnet", "mnasnet"):
            d = n.classifier[1].in_features
            return d, d
        if f == "mobilenetv3":
            d = n.classifier[0].in_features
            return d, d
        if f == "convnext":
            d = n.classifier[2].in_features
            return d, d
        if f == "densenet":
            d = n.classifier.in_features
            return d, d
        # vgg, alexnet: last conv's width; pooled = input of the last linear layer
        convs = [m for m in n.features.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels, n.classifier[-1].in_features

    # ----------------------------------------------------------------------------------- triple
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n, f = self.net, self.family
        if f == "resnet":
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            return n.layer4(n.layer3(n.layer2(n.layer1(x))))
        if f == "regnet":
            return n.trunk_output(n.stem(x))
        if f == "densenet":
            return F.relu(n.features(x))  # torchvision's DenseNet.forward applies this ReLU after features
        if f == "shufflenetv2":
            x = n.maxpool(n.conv1(x))
            return n.conv5(n.stage4(n.stage3(n.stage2(x))))
        if f == "mnasnet":
            return n.layers(x)
        return n.features(x)  # mobilenetv2/v3, efficientnet, convnext, vgg, alexnet

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        n, f = self.net, self.family
        if f == "convnext":  # classifier = LayerNorm2d, Flatten, Linear: the norm belongs to the pre-logits
            return n.classifier[1](n.classifier[0](n.avgpool(feature_map)))
        if f in ("vgg", "alexnet"):
            return n.classifier[:-1](torch.flatten(n.avgpool(feature_map), 1))
        return _gap(feature_map)

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        n, f = self.net, self.family
        if f in ("convnext", "vgg", "alexnet"):
            return n.classifier[-1](pooled)
        if f in ("resnet", "regnet", "shufflenetv2"):
            return n.fc(pooled)
        return n.classifier(pooled)


def build(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> TorchvisionModel:
    """``torchvision/<name>``: torchvision.models.get_model(name, weights=None, num_classes, **options)."""
    import torchvision

    family = family_of(name)
    for key in ("weights", "weights_backbone", "pretrained"):
        if key in options:
            raise Kd3Error(f"torchvision/{name}: option {key!r} is not accepted (kd3 builds with weights=None and "
                           "takes trained weights from a checkpoint: `kd3 import-checkpoint --weights FILE.pth`)")
    base = name.removesuffix(CIFAR_SUFFIX)
    net = torchvision.models.get_model(base, weights=None, num_classes=num_classes, **options)
    if base != name:
        # the CIFAR stem of the ResNet paper's CIFAR experiments, as CIFAR training code writes it on
        # top of torchvision: keeps 32x32 resolution into layer1 (32 → 4x4 map at layer4)
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        replace_first_conv(net, in_channels)
    return TorchvisionModel(net, family, name, num_classes)
