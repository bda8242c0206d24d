"""Helpers shared by the model tool commands (no NAME: not a command itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from kd3.errors import Kd3Error


def read_lines(path: str | Path, what: str) -> list[str]:
    """One entry per line (surrounding whitespace and blank lines dropped); duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise Kd3Error(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise Kd3Error(f"{path}: no {what} (one per line)")
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if line in seen:
            raise Kd3Error(f"{path}: {what} {line!r} appears twice (second time at entry {i + 1})")
        seen.add(line)
    return lines


def parse_options(text: str | None) -> dict[str, Any]:
    """``--options '{depth: 40, widen_factor: 2}'`` (YAML/JSON mapping) → dict."""
    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise Kd3Error(f"--options {text!r}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(value, dict):
        raise Kd3Error(f"--options {text!r}: expected a mapping, e.g. '{{depth: 40, widen_factor: 2}}'")
    return value


def check_out(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise Kd3Error(f"--out {path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise Kd3Error(f"--out {path} is a directory; give a file name such as teacher.pt")
    return path


@torch.no_grad()
def probe(model: torch.nn.Module, channels: int, image_size: int, arch: str) -> str:
    """Run two blank images through ``extract``; a model that cannot take the input spec fails here."""
    x = torch.zeros(2, channels, image_size, image_size, device=next(model.parameters()).device)
    try:
        out = model.extract(x)
    except Kd3Error:
        raise
    except Exception as exc:  # shape/assertion errors from the library: keep one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Kd3Error(f"{arch} does not run on {channels}x{image_size}x{image_size} inputs: {first[:200]} "
                       "(check --image-size/--channels, or the model's img_size option)") from None
    params = sum(p.numel() for p in model.parameters())
    align = "yes" if getattr(model, "supports_feature_alignment", True) else "no (logits/pooled only)"
    return (f"{params / 1e6:.2f}M parameters; feature map {list(out.feature_map.shape[1:])}, pooled "
            f"{out.pooled.shape[1]}, logits {out.logits.shape[1]}; KD³ feature alignment: {align}")
