"""open_clip image towers as kd3 models, and the zero-shot CLIP teacher.

``open_clip/<model_name>`` (e.g. ``open_clip/ViT-B-32``, ``open_clip/RN50``) keeps only the image tower
(``visual``) plus a classification head:

* ``head: zeroshot`` — the zero-shot classifier of Radford et al. (2021): for each class, the prompt
  templates filled with the class name are encoded by the text tower, L2-normalised, averaged and
  normalised again → W [K, E]; logits = exp(logit_scale) · normalize(image_emb) @ W.T (+ logit_bias
  for SigLIP-style models). W, logit_scale and logit_bias are buffers saved in the state dict, so a
  checkpoint needs no text tower. Built by :func:`build_zeroshot_teacher` (`kd3 zeroshot-teacher`).
* ``head: linear`` (default for a freshly built model) — a trainable Linear(E → K) on the image embedding.

The uniform triple: pooled = the image embedding [B, E] (what ``encode_image`` returns, before
normalisation); logits as above; feature map from the visual tower:

* ModifiedResNet (RN50, …): the trunk output before ``attnpool`` [B, 32·width, H/32, W/32]; pool =
  attnpool, so ``head(map)`` reproduces the logits exactly.
* VisionTransformer: the last block's patch tokens (class token dropped), reshaped to the patch grid
  [B, width, H/patch, W/patch], taken exactly where the tower pools them (after ``ln_post`` unless
  ``final_ln_after_pool``). With ``pool_type "avg"`` pool = mean → (ln_post) → proj reproduces the
  logits. CLIP's usual ``pool_type "tok"`` pools the class token, which the map does not contain:
  ``supports_feature_alignment`` is False and ``head``/``pool`` raise a Kd3Error, while ``extract``
  still returns the exact embedding and logits (score stage, logit KD).
* Other towers (timm trunks): no spatial map is exposed; the embedding itself is the map
  [B, E, 1, 1] (pool = flatten), which keeps ``head(map) == logits``.

Options of ``open_clip/<name>``: ``head`` ("linear" | "zeroshot"), ``pretrained`` (open_clip tag or
local weights file, loaded at build; zero-shot checkpoints do not set it — their weights are in the
state dict), ``model_cfg`` (the open_clip model config; zero-shot checkpoints always store it so
they rebuild offline, independent of open_clip's bundled configs), ``class_names`` and ``templates``
(provenance of the zero-shot weights; ``class_names`` must have ``num_classes`` entries).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd3.errors import Kd3Error, load_error_reason
from kd3.models.base import FeatureOutput, Kd3Model
from kd3.models.spec import InputSpec, ModelMeta

#: default prompts: "a photo of a {}." plus the 7-template ensemble OpenAI selected for ImageNet
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
PLACEHOLDER = "{}"


def list_names() -> list[str]:
    import open_clip

    return sorted(open_clip.list_models())


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of ``name`` (built-in, registered with add_model_config, local-dir:)."""
    import open_clip

    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        if not path.is_file():
            raise Kd3Error(f"open_clip/{name}: {path} not found")
        cfg = json.loads(path.read_text()).get("model_cfg")
        if cfg is None:
            raise Kd3Error(f"open_clip/{name}: {path} has no 'model_cfg'")
        return copy.deepcopy(cfg)
    if name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config  # no public accessor; the config is cached by the hub

        try:
            return copy.deepcopy(_get_hf_config(name[len("hf-hub:"):])["model_cfg"])
        except Exception as exc:  # network / hub errors come in many types
            raise Kd3Error(f"open_clip/{name}: could not read the model config from the HF hub "
                           f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join('open_clip/' + c for c in close)}?" if close else \
            "; `kd3 models open_clip/` lists them, or register a config JSON with --model-config"
        raise Kd3Error(f"unknown open_clip model {name!r}{hint}")
    return copy.deepcopy(cfg)


def register_model_config(path: str | Path) -> str:
    """Register a custom open_clip config JSON (its file stem becomes the model name); returns the name."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"open_clip model config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Kd3Error(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise Kd3Error(f"{path}: not an open_clip model config (missing {', '.join(missing)})")
    open_clip.add_model_config(path)
    return path.stem


class OpenClipModel(Kd3Model):
    """open_clip image tower + zero-shot or linear head (see the module docstring)."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int, head: str = "linear",
                 name: str = "open_clip"):
        super().__init__()
        if head not in ("linear", "zeroshot"):
            raise Kd3Error(f"{name}: option head must be 'linear' or 'zeroshot', got {head!r}")
        self.visual = visual
        self.arch_name = name
        self.head_type = head
        self.num_classes = num_classes
        self.feature_dim = embed_dim
        if head == "zeroshot":
            self.register_buffer("zeroshot_weights", torch.zeros(num_classes, embed_dim))
            self.register_buffer("logit_scale", torch.tensor(math.log(1 / 0.07)))
            self.register_buffer("logit_bias", torch.tensor(0.0))
        else:
            self.fc = nn.Linear(embed_dim, num_classes)
        self.tower = self._tower_kind(visual)
        if self.tower == "vit":
            self.feature_channels = int(visual.proj.shape[0])  # proj: [width, embed_dim]
            self._ln_before_pool = not getattr(visual, "final_ln_after_pool", False)
            self.supports_feature_alignment = visual.pool_type == "avg"
        elif self.tower == "modified_resnet":
            self.feature_channels = int(visual.attnpool.k_proj.in_features)
        else:
            self.feature_channels = embed_dim

    @staticmethod
    def _tower_kind(visual: nn.Module) -> str:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, ModifiedResNet) and visual.attnpool is not None:
            return "modified_resnet"
        if (isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None
                and visual.proj is not None and visual.pool_type in ("tok", "avg")):
            return "vit"
        return "other"

    # ----------------------------------------------------------------------------------- triple
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out  # towers built with output_tokens return (pooled, tokens)

    def _vit_tokens_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and getattr(getattr(self.visual, "patch_dropout", None), "prob", 0.0) > 0:
            # dropped patches leave no full grid to reshape
            raise Kd3Error(f"{self.arch_name}: patch_dropout must be 0 for a feature map (set it in the model config)")
        out = self.visual.forward_intermediates(x, indices=1, normalize_intermediates=self._ln_before_pool,
                                                output_fmt="NCHW")
        return out["image_intermediates"][-1], out["image_features"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.tower == "vit":
            return self._vit_tokens_and_embedding(x)[0]
        if self.tower == "modified_resnet":
            return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        return self._embed(x)[:, :, None, None]

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.tower == "modified_resnet":
            return v.attnpool(feature_map)
        if self.tower == "vit":
            if not self.supports_feature_alignment:
                raise Kd3Error(f"{self.arch_name}: head(feature_map) cannot reproduce the logits because this ViT "
                               "pools its class token, which the patch-token map does not contain; KD³ feature "
                               "alignment needs a ModifiedResNet CLIP (e.g. open_clip/RN50) or a ViT with "
                               "pool_type 'avg'; logits/pooled features still work")
            pooled = feature_map.flatten(2).mean(dim=2)
            if not self._ln_before_pool:
                pooled = v.ln_post(pooled)
            return pooled @ v.proj
        return feature_map.flatten(1)

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.head_type == "zeroshot":
            return self.logit_scale.exp() * F.normalize(pooled, dim=-1) @ self.zeroshot_weights.t() + self.logit_bias
        return self.fc(pooled)

    def extract(self, x: torch.Tensor) -> FeatureOutput:
        if self.tower == "vit":  # one pass gives both the patch grid and the true (class-token) embedding
            feature_map, pooled = self._vit_tokens_and_embedding(x)
            return FeatureOutput(feature_map=feature_map, pooled=pooled, logits=self.classifier(pooled))
        return super().extract(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._embed(x))


def _build_visual(cfg: dict[str, Any]) -> nn.Module:
    """The image tower alone (no text tower to allocate), random init."""
    from open_clip.model import _build_vision_tower  # what CLIP.__init__ itself calls for .visual

    return _build_vision_tower(cfg["embed_dim"], copy.deepcopy(cfg["vision_cfg"]),
                               quick_gelu=cfg.get("quick_gelu", False))


def create_clip(name: str, pretrained: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """Full open_clip model (both towers); failures to find/download/load weights are one-line Kd3Errors.

    ``pretrained``: an open_clip tag (downloaded by open_clip) or a local weights file, loaded with
    ``weights_only=True`` (open_clip's default); None = random init.
    """
    import open_clip

    if not (name.startswith("hf-hub:") or name.startswith("local-dir:")):
        model_config(name)  # unknown name → Kd3Error with close matches
        if pretrained and not Path(pretrained).is_file():
            tags = [t for m, t in open_clip.list_pretrained() if m == name]
            if pretrained not in tags:
                raise Kd3Error(f"open_clip/{name}: pretrained {pretrained!r} is neither a file nor a known tag "
                               f"(tags: {', '.join(tags) or 'none'})")
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, device=device)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/pickle errors; keep one line
        raise Kd3Error(f"open_clip/{name}: could not load pretrained={pretrained!r}: "
                       f"{load_error_reason(exc)}") from None


def build(name: str, num_classes: int, in_channels: int = 3, head: str = "linear", pretrained: str | None = None,
          model_cfg: dict[str, Any] | None = None, class_names: Sequence[str] | None = None,
          templates: Sequence[str] | None = None) -> OpenClipModel:
    """``open_clip/<name>``: the image tower (+ head); see the module docstring for the options."""
    if in_channels != 3:
        raise Kd3Error(f"open_clip/{name}: CLIP image towers take 3-channel RGB input, got channels={in_channels}")
    if class_names is not None and len(class_names) != num_classes:
        raise Kd3Error(f"open_clip/{name}: option class_names has {len(class_names)} names for {num_classes} classes")
    del templates  # provenance only
    cfg = model_cfg if model_cfg is not None else model_config(name)
    visual = create_clip(name, pretrained).visual if pretrained else _build_visual(cfg)
    return OpenClipModel(visual, int(cfg["embed_dim"]), num_classes, head=head, name=f"open_clip/{name}")


# --------------------------------------------------------------------------------- zero-shot head
def check_templates(templates: Sequence[str], origin: str = "templates") -> list[str]:
    templates = [t for t in templates if t.strip()]
    if not templates:
        raise Kd3Error(f"{origin}: no prompt templates")
    for i, template in enumerate(templates):
        if PLACEHOLDER not in template:
            raise Kd3Error(f"{origin}: template {i + 1} {template!r} has no '{{}}' placeholder for the class name")
    return templates


@torch.no_grad()
def zeroshot_weights(clip: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str],
                     device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Class names × templates → W [K, E]: encode, L2-normalise, average per class, normalise again."""
    templates = check_templates(templates)
    rows = []
    for name in class_names:
        prompts = [t.replace(PLACEHOLDER, name) for t in templates]
        embs = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            embs.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
        rows.append(F.normalize(torch.cat(embs).mean(dim=0), dim=-1))
    return torch.stack(rows)


def preprocess_spec(clip: nn.Module) -> dict[str, Any]:
    """open_clip preprocessing → InputSpec fields (image_size, channels, mean, std)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise Kd3Error(f"open_clip model expects non-square {tuple(size)} images; kd3 inputs are square")
        size = size[0]
    return {"image_size": int(size), "channels": 3, "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]]}


def build_zeroshot_teacher(name: str, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                           pretrained: str | None = None, device: str | torch.device = "cpu"):
    """Zero-shot CLIP teacher → (OpenClipModel in eval mode, ModelMeta) ready for ``save_checkpoint``.

    The meta's options hold ``head: zeroshot``, the model config and the class names/templates, so
    ``load_model`` rebuilds the same logits offline from the checkpoint alone.
    """
    import open_clip


    class_names = [str(c) for c in class_names]
    if not class_names:
        raise Kd3Error("zero-shot teacher: no class names")
    dupes = sorted({c for c in class_names if class_names.count(c) > 1})
    if dupes:
        raise Kd3Error(f"zero-shot teacher: duplicate class names {dupes[:3]}")
    templates = check_templates(list(templates))
    cfg = model_config(name)
    clip = create_clip(name, pretrained, device=device).eval()
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # HF tokenizers may need the network
        raise Kd3Error(f"open_clip/{name}: could not create the tokenizer ({str(exc).splitlines()[0][:160]})") from None
    weights = zeroshot_weights(clip, tokenizer, class_names, templates, device=device)
    spec = InputSpec.from_dict(preprocess_spec(clip))
    model = OpenClipModel(clip.visual, int(cfg["embed_dim"]), len(class_names), head="zeroshot",
                          name=f"open_clip/{name}")
    model.zeroshot_weights.copy_(weights)
    model.logit_scale.copy_(clip.logit_scale.detach().reshape(()))
    if getattr(clip, "logit_bias", None) is not None:
        model.logit_bias.copy_(clip.logit_bias.detach().reshape(()))
    del clip  # drop the text tower
    options = {"head": "zeroshot", "model_cfg": cfg, "class_names": class_names, "templates": templates}
    meta = ModelMeta(arch=f"open_clip/{name}", options=options, num_classes=len(class_names),
                     class_names=class_names, input=spec)
    return model.to(device).eval(), meta
