"""Model registry: architecture name → constructor ``fn(num_classes, in_channels, **options)``.

Every constructor returns a :class:`kd3.models.base.Kd3Model`, so the losses can get the uniform
(feature map, pooled feature, logits) triple from any teacher or student.

Two kinds of names:

* local entries: ``small_cnn``, ``cifar_resnet18``, ``cifar_resnet34``, ``wrn`` (+ ``wrn_D_K`` aliases);
* prefixed families resolved on demand (the libraries are imported only then):
  ``torchvision/<name>`` (``torchvision/<resnet>-cifar``: the CIFAR stem), ``timm/<name>``,
  ``open_clip/<name>``;
* a user's own network, ``package.module:factory`` or ``path/to/net.py:factory``
  (:mod:`kd3.models.user_code`; imported only when the user named it).

``MODELS.get(name)`` resolves both; :func:`build_model` is the one factory the stages use.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable

from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model
from kd3.models import user_code
from kd3.models.cifar import CifarResNet, WideResNet
from kd3.models.small_cnn import SmallCNN
from kd3.registry import Registry

ModelFactory = Callable[..., Kd3Model]


@dataclass(frozen=True)
class ModelFamily:
    """A library whose models are named ``<prefix>/<name>``."""

    prefix: str
    summary: str
    #: (name, num_classes, in_channels, **options) → Kd3Model
    build: Callable[..., Kd3Model]
    #: pattern → matching names (without the prefix); imports the library
    list_names: Callable[[str], list[str]]
    #: raises Kd3Error for an unknown name (with close matches); None = checked when building
    check_name: Callable[[str], None] | None = None


class ModelRegistry(Registry[ModelFactory]):
    """Local entries plus ``prefix/name`` families; a miss is a Kd3Error listing close matches."""

    def __init__(self) -> None:
        super().__init__("model architecture")
        self.families: dict[str, ModelFamily] = {}

    def add_family(self, family: ModelFamily) -> None:
        if family.prefix in self.families:
            raise ValueError(f"model family {family.prefix!r} is already registered")
        self.families[family.prefix] = family

    def get(self, name: str) -> ModelFactory:
        if name in self:
            return super().get(name)
        prefix, slash, rest = name.partition("/")
        if user_code.looks_like_user_arch(name) and not (slash and prefix in self.families):
            user_code.load_factory(name)  # refused unless the user named it; fails early on a bad path/name
            return functools.partial(user_code.build, name)
        if slash:
            family = self.families.get(prefix)
            if family is None:
                close = difflib.get_close_matches(prefix, list(self.families), n=3, cutoff=0.4)
                raise Kd3Error(f"unknown model family {prefix!r} in {name!r}; "
                               f"{'did you mean ' + ', '.join(c + '/' for c in close) + '? ' if close else ''}"
                               f"known prefixes: {', '.join(p + '/' for p in self.families)}")
            if not rest:
                raise Kd3Error(f"model {name!r}: give a name after the prefix, e.g. {prefix}/resnet18 "
                               f"(`kd3 models {prefix}/` lists them)")
            if family.check_name is not None:
                family.check_name(rest)
            return functools.partial(family.build, rest)
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.5)
        prefixed = [f"{prefix}/{name}" for prefix in ("torchvision", "timm") if _library_has(prefix, name)]
        hints = close + prefixed
        hint = f"; did you mean {', '.join(hints)}?" if hints else f"; known: {', '.join(self.names())}"
        if ":" in name:
            hint += "; your own code is named 'package.module:factory' or 'path/to/net.py:factory'"
        raise Kd3Error(f"unknown model architecture {name!r}{hint} "
                       f"(libraries: {', '.join(p + '/<name>' for p in self.families)}; `kd3 models` lists them)")

    def resolvable(self, name: str) -> bool:
        try:
            self.get(name)
        except Kd3Error:
            return False
        return True


def _library_has(prefix: str, name: str) -> bool:
    """For the 'did you mean torchvision/resnet18' hint; never fails."""
    try:
        if prefix == "torchvision":
            from kd3.models import torchvision_zoo

            return name in torchvision_zoo.list_names()
        import timm

        return bool(timm.is_model(name))
    except Exception:  # a hint must not turn one error into another
        return False


MODELS = ModelRegistry()


# ------------------------------------------------------------------------------------ local models
@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, **options: Any) -> Kd3Model:
    """Small conv-BN-ReLU CNN (demo teacher and student); options: widths, convs_per_stage, dropout."""
    if "widths" in options:
        options["widths"] = tuple(options["widths"])
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, **options)


@MODELS.register("cifar_resnet")
def cifar_resnet(num_classes: int, in_channels: int = 3, num_blocks: Any = (2, 2, 2, 2),
                 widths: Any = (64, 128, 256, 512)) -> Kd3Model:
    """CIFAR ResNet of any depth and width; options: num_blocks (4 ints, blocks per stage), widths (4 ints).
    The generic teacher's student pool extracts its ResNet sub-networks as this (prepare-teacher)."""
    num_blocks, widths = tuple(int(v) for v in num_blocks), tuple(int(v) for v in widths)
    if len(num_blocks) != 4 or len(widths) != 4 or min(num_blocks) < 1 or min(widths) < 1:
        raise Kd3Error(f"cifar_resnet: num_blocks and widths need 4 positive ints each, got {list(num_blocks)}, "
                       f"{list(widths)}")
    return CifarResNet(num_blocks, num_classes, in_channels, widths=widths)


@MODELS.register("cifar_resnet18")
def cifar_resnet18(num_classes: int, in_channels: int = 3) -> Kd3Model:
    """CIFAR ResNet-18 (3x3 stem, no max-pool, 64-128-256-512; 32x32 → 4x4x512 map); KD³ student."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("cifar_resnet34")
def cifar_resnet34(num_classes: int, in_channels: int = 3) -> Kd3Model:
    """CIFAR ResNet-34 (3x3 stem, no max-pool, 64-128-256-512; 32x32 → 4x4x512 map); KD³ teacher."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels)


@MODELS.register("wrn")
def wrn(num_classes: int, in_channels: int = 3, depth: int = 16, widen_factor: int = 2,
        dropout: float = 0.0) -> Kd3Model:
    """Wide ResNet WRN-depth-k for 32x32 inputs; options: depth (6n+4), widen_factor, dropout."""
    return WideResNet(num_classes, in_channels, depth=depth, widen_factor=widen_factor, dropout=dropout)


def _wrn_alias(depth: int, widen_factor: int) -> ModelFactory:
    def factory(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> Kd3Model:
        return WideResNet(num_classes, in_channels, depth=depth, widen_factor=widen_factor, dropout=dropout)

    factory.__doc__ = (f"WRN-{depth}-{widen_factor} (= wrn with depth={depth}, widen_factor={widen_factor}); "
                       "option: dropout.")
    return factory


# the KD³ / data-free KD CIFAR pairs: WRN-40-2 → WRN-16-2 / WRN-40-1 / WRN-16-1; WRN-28-10 for CIFAR-100
for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    MODELS.register(f"wrn_{_depth}_{_k}", _wrn_alias(_depth, _k))


# --------------------------------------------------------------------------------- library families
def _tv_build(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> Kd3Model:
    from kd3.models import torchvision_zoo

    return torchvision_zoo.build(name, num_classes, in_channels, **options)


def _tv_names(pattern: str) -> list[str]:
    from kd3.models import torchvision_zoo

    return [n for n in torchvision_zoo.list_names() if pattern in n]


def _tv_check(name: str) -> None:
    from kd3.models import torchvision_zoo

    torchvision_zoo.family_of(name)


def _timm_build(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> Kd3Model:
    from kd3.models import timm_zoo

    return timm_zoo.build(name, num_classes, in_channels, **options)


def _timm_names(pattern: str) -> list[str]:
    from kd3.models import timm_zoo

    return timm_zoo.list_names(pattern)


def _timm_check(name: str) -> None:
    from kd3.models import timm_zoo

    timm_zoo.check_name(name)


def _clip_build(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> Kd3Model:
    from kd3.models import clip

    return clip.build(name, num_classes, in_channels, **options)


def _clip_names(pattern: str) -> list[str]:
    from kd3.models import clip

    return [n for n in clip.list_names() if pattern in n]


MODELS.add_family(ModelFamily(
    "torchvision", "any torchvision classification model (ResNet/ResNeXt/WRN, RegNet, MobileNetV2/V3, EfficientNet, "
    "ConvNeXt, VGG, AlexNet, DenseNet, ShuffleNetV2, MNASNet), weights=None; <resnet>-cifar: 3x3 stride-1 stem, "
    "no max-pool",
    _tv_build, _tv_names, _tv_check))
MODELS.add_family(ModelFamily(
    "timm", "any timm model (pretrained=False; ViTs: patch tokens as the feature map)", _timm_build, _timm_names,
    _timm_check))
# open_clip names are checked when building: a checkpoint may carry its own model config (model_cfg)
MODELS.add_family(ModelFamily(
    "open_clip", "open_clip image tower + zero-shot or linear head (`kd3 zeroshot-teacher`)", _clip_build,
    _clip_names))


def build_model(arch: str, num_classes: int, in_channels: int, options: dict[str, Any] | None = None,
                image_size: int | None = None) -> Kd3Model:
    """Construct ``arch`` with its options; a bad option is a one-line error naming it.

    ``image_size``: the input edge, used only to probe a user network whose split is not yet known.
    """
    taken = [k for k in ("num_classes", "in_channels", "image_size") if k in (options or {})]
    if taken:
        raise Kd3Error(f"model {arch!r}: option {taken[0]!r} is set by kd3 (from --num-classes/--channels/"
                       "--image-size or the teacher's checkpoint); drop it from the options")
    factory = MODELS.get(arch)
    is_user = isinstance(factory, functools.partial) and factory.func is user_code.build
    extra = {"image_size": image_size} if is_user else {}
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **extra, **dict(options or {}))
    except TypeError as exc:
        # name the option keys only: a zero-shot teacher's options hold a whole model config and class list
        raise Kd3Error(f"model {arch!r}: bad options ({', '.join(options or {}) or 'none given'}): {exc}") from None


def arch_options(model: Kd3Model, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options to record in a checkpoint: a user network's found split added, so a rebuild needs no probe."""
    return {**dict(options or {}), **getattr(model, "resolved_options", {})}
