"""timm models as kd3 models: ``timm/<name>``, e.g. ``timm/resnet18``, ``timm/vit_tiny_patch16_224``.

Built with ``timm.create_model(name, pretrained=False, num_classes=K, in_chans=C, **options)``; the
timm module is kept whole under ``net`` (state-dict prefix ``net.``), so timm checkpoints load as-is.
The triple uses timm's own API: ``forward_features`` → feature map, ``forward_head(pre_logits=True)``
→ pooled, ``get_classifier()`` → logits; ``extract`` therefore always returns timm's exact pooled
features and logits.

Feature maps by output layout of ``forward_features``:

* NCHW maps (CNNs): used as-is; ``head(map)`` = timm's head.
* NHWC maps (``output_fmt == "NHWC"``, e.g. Swin): permuted to NCHW, permuted back for the head.
* Tokens [B, N, C] (ViT, DeiT, EVA, Mixer, …): the prefix tokens (class/register, ``num_prefix_tokens``)
  are dropped and the N - prefix patch tokens are reshaped to the patch grid [B, C, h, w] (h, w from
  the input size and patch size, else the square root). ``head(map)`` reproduces the logits only
  when the model pools patch tokens (``global_pool`` "avg"/"max"/"avgmax", no attention pool): then
  the map is turned back into tokens (prefix slots zero-filled: those poolings skip them). Models
  that pool the class token (``global_pool="token"``, timm's ViT default) or use an attention pool
  have ``supports_feature_alignment = False``: logits and pooled features work (score, KD), and
  ``head``/``pool`` raise a Kd3Error telling to pass ``options: {global_pool: avg}`` or to use a CNN.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import nn

from kd3.errors import Kd3Error
from kd3.models.base import FeatureOutput, Kd3Model

_PATCH_POOLS = ("avg", "max", "avgmax")


def list_names(pattern: str = "") -> list[str]:
    import timm

    return sorted(timm.list_models(f"*{pattern}*" if pattern else ""))


def check_name(name: str) -> None:
    """Unknown timm architecture → Kd3Error with close matches (a ``.tag`` suffix is allowed)."""
    import timm

    if name.startswith("hf-hub:") or name.startswith("hf_hub:"):
        return  # resolved (and downloaded) by timm itself
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = (f"; did you mean {', '.join('timm/' + c for c in close)}?" if close
            else "; `kd3 models timm/PATTERN` searches")
    raise Kd3Error(f"unknown timm model {name!r}{hint}")


class TimmModel(Kd3Model):
    """A timm model split into the kd3 triple; ``net`` is the untouched timm module."""

    native_prefix = "net."

    def __init__(self, net: nn.Module, name: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.net = net
        self.arch_name = f"timm/{name}"
        self.num_classes = num_classes
        head = net.get_classifier()
        if not isinstance(head, nn.Module):  # e.g. distilled DeiT: (head, head_dist) averaged in forward
            raise Kd3Error(f"{self.arch_name}: get_classifier() returns {type(head).__name__}, not one module; "
                           "kd3 needs a single classifier layer (use the non-distilled variant)")
        self.feature_channels = int(net.num_features)
        self.feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        self.output_fmt = str(getattr(net, "output_fmt", "NCHW"))
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0) or 0)
        global_pool = getattr(net, "global_pool", None)
        self.token_pool = global_pool if isinstance(global_pool, str) else None
        # only meaningful for token outputs; CNN/NHWC heads always take the map we hand them
        self._tokens_poolable = (self.token_pool in _PATCH_POOLS and getattr(net, "attn_pool", None) is None)
        self._in_chans = in_channels
        self._is_tokens: bool | None = None  # known after the first forward (or a probe, see below)

    @property
    def supports_feature_alignment(self) -> bool:  # type: ignore[override]
        if self._is_tokens is None:
            self._probe()
        return not self._is_tokens or self._tokens_poolable

    @torch.no_grad()
    def _probe(self) -> None:
        """Learn the output layout from one blank image at the model's configured input size."""
        img_size = getattr(getattr(self.net, "patch_embed", None), "img_size", None)
        if not img_size:
            img_size = tuple(self.net.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        param = next(self.net.parameters())
        was_training = self.net.training
        self.net.eval()
        try:
            x = torch.zeros(1, self._in_chans, *img_size, device=param.device, dtype=param.dtype)
            self._to_map(self.net.forward_features(x), (x.shape[-2], x.shape[-1]))
        finally:
            self.net.train(was_training)

    # ------------------------------------------------------------------------------- plumbing
    def _to_map(self, raw: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        if raw.dim() == 4:
            self._is_tokens = False
            return raw.permute(0, 3, 1, 2) if self.output_fmt == "NHWC" else raw
        if raw.dim() != 3:
            raise Kd3Error(f"{self.arch_name}: forward_features returned shape {tuple(raw.shape)}; kd3 needs "
                           "[B, C, H, W] or tokens [B, N, C]")
        self._is_tokens = True
        patches = raw[:, self.num_prefix_tokens:]
        n = patches.shape[1]
        h = w = 0
        patch_size = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        if patch_size:
            h, w = image_hw[0] // patch_size[0], image_hw[1] // patch_size[1]
        if h * w != n:
            side = math.isqrt(n)
            if side * side != n:
                raise Kd3Error(f"{self.arch_name}: cannot arrange {n} patch tokens into a grid")
            h = w = side
        return patches.transpose(1, 2).reshape(raw.shape[0], raw.shape[2], h, w)

    def _from_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        if not self._is_tokens:
            return feature_map.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else feature_map
        if not self._tokens_poolable:
            raise Kd3Error(f"{self.arch_name}: head(feature_map) cannot reproduce the logits because the model "
                           f"pools {'its class token' if self.token_pool == 'token' else 'with attention'}, which the "
                           "patch-token map does not contain; KD³ feature alignment needs options "
                           "{global_pool: avg} (retrained head) or a CNN teacher; logits/pooled features still work")
        tokens = feature_map.flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:  # average/max pooling skips the prefix slots, so zeros are never read
            prefix = tokens.new_zeros(tokens.shape[0], self.num_prefix_tokens, tokens.shape[2])
            tokens = torch.cat([prefix, tokens], dim=1)
        return tokens

    # ----------------------------------------------------------------------------------- triple
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._to_map(self.net.forward_features(x), (x.shape[-2], x.shape[-1]))

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self._is_tokens is None:
            self._probe()
        return self.net.forward_head(self._from_map(feature_map), pre_logits=True)

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(pooled)

    def extract(self, x: torch.Tensor) -> FeatureOutput:
        raw = self.net.forward_features(x)
        feature_map = self._to_map(raw, (x.shape[-2], x.shape[-1]))
        pooled = self.net.forward_head(raw, pre_logits=True)
        if pooled.dim() != 2:
            raise Kd3Error(f"{self.arch_name}: forward_head(pre_logits=True) gave shape {tuple(pooled.shape)}, "
                           "not [B, D]; do not set global_pool to ''")
        return FeatureOutput(feature_map=feature_map, pooled=pooled, logits=self.classifier(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> TimmModel:
    """``timm/<name>``: timm.create_model(name, pretrained=False, num_classes, in_chans, **options)."""
    import timm

    check_name(name)
    for key in ("pretrained", "checkpoint_path", "pretrained_cfg_overlay"):
        if key in options:
            raise Kd3Error(f"timm/{name}: option {key!r} is not accepted (kd3 builds with pretrained=False and takes "
                           "trained weights from a checkpoint: `kd3 import-checkpoint --weights FILE.pth`)")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    return TimmModel(net, name, num_classes, in_channels)
