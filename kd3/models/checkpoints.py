"""Checkpoints: a plain state dict plus the metadata needed to rebuild and feed the model.

Saved with ``torch.save`` and read only with ``torch.load(weights_only=True)``: a checkpoint holds
tensors, numbers, strings, lists and dicts, never pickled objects. The metadata carries the input
preprocessing (size, channels, mean/std), so every stage feeds a model the way it was trained.

A user's own trained weights (a bare state dict, as torchvision/timm/CIFAR training scripts save
them) become a kd3 checkpoint with :func:`import_state_dict` (`kd3 import-checkpoint`).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from kd3 import __version__
from kd3.errors import Kd3Error, load_error_reason
from kd3.models.base import Kd3Model
from kd3.models import user_code
from kd3.models.registry import arch_options, build_model
from kd3.models.spec import InputSpec, ModelMeta
from kd3.runs import atomic_torch_save

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: ModelMeta, **extra: Any) -> None:
    """Write model weights + metadata (+ any plain extra entries, e.g. trainer state) atomically."""
    payload = {
        "kd3_checkpoint": FORMAT_VERSION,
        "kd3_version": __version__,
        "model": meta.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a kd3 checkpoint with ``weights_only=True``; anything else is a clear error."""
    path = Path(path)
    payload = _safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or "kd3_checkpoint" not in payload:
        raise Kd3Error(f"{path}: not a kd3 checkpoint (no 'kd3_checkpoint' entry)")
    if payload["kd3_checkpoint"] > FORMAT_VERSION:
        raise Kd3Error(f"{path}: written by a newer kd3 (format {payload['kd3_checkpoint']}); upgrade kd3")
    return payload


def _safe_torch_load(path: Path, what: str, allow: Sequence[type] = ()) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary objects.

    ``allow``: extra plain-data classes to accept (their contents are still checked).
    """
    if not path.is_file():
        raise Kd3Error(f"{what} not found: {path}")
    try:
        # warnings.catch_warnings: torch warns about pickle protocols of files it then refuses anyway
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; the message is what matters
        raise Kd3Error(f"{path}: not loadable as a plain-weights file: {load_error_reason(exc)}; "
                       "re-save only the state dict (torch.save(model.state_dict(), path))") from None


def check_checkpoint_code(path: str | Path) -> None:
    """Before any work: refuse a checkpoint whose architecture is user code the user did not name.

    Reads only the metadata (tensors are memory-mapped, not loaded).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; load_model reports real problems
        payload = read_checkpoint(path)
    model = payload.get("model") if isinstance(payload, dict) else None
    if isinstance(model, dict) and isinstance(model.get("arch"), str):
        user_code.require_allowed(model["arch"], model.get("options"), origin=str(path))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Kd3Model, ModelMeta, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    payload = read_checkpoint(path)
    meta = ModelMeta.from_dict(payload["model"])
    # the checkpoint's word is never enough to import code: only what the user named may run
    user_code.require_allowed(meta.arch, meta.options, origin=str(path))
    model = build_model(meta.arch, meta.num_classes, meta.input.channels, meta.options,
                        image_size=meta.input.image_size)
    load_state_dict_strict(model, payload["state_dict"], str(path))
    model.to(device).eval()
    return model, meta, payload


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """load_state_dict that names the first offending keys instead of dumping every key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:2]}{' …' if len(mismatched) > 2 else ''}")
    if problems:
        raise Kd3Error(f"{origin}: weights do not fit the architecture: {'; '.join(problems)}")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------ user weights import
#: wrapper keys training scripts put around the state dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "params")
#: prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's weights file → a flat ``name → tensor`` dict (``weights_only=True`` loading only).

    Accepts a bare state dict, ``{'state_dict': …}`` / ``{'model': …}`` / ``{'net': …}`` … wrappers
    (see :data:`STATE_DICT_KEYS`; training checkpoints of timm's and torchvision's reference scripts,
    with their ``args`` Namespace, included), kd3 checkpoints, and strips ``module.``/``_orig_mod.``
    prefixes.
    """
    path = Path(path)
    # timm's and torchvision's training scripts store their argparse.Namespace beside the weights;
    # a Namespace is a plain attribute bag (its values still pass the weights-only checks)
    payload = _safe_torch_load(path, "weights file", allow=(argparse.Namespace,))
    for _ in range(3):  # wrappers can nest, e.g. {'model': {'state_dict': …}}
        if not isinstance(payload, dict) or all(isinstance(v, torch.Tensor) for v in payload.values()):
            break
        inner = next((payload[k] for k in STATE_DICT_KEYS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            break
        payload = inner
    if not isinstance(payload, dict) or not payload:
        raise Kd3Error(f"{path}: expected a state dict (parameter name → tensor), got {type(payload).__name__}"
                       f"{' (empty)' if isinstance(payload, dict) else ''}")
    bad = [k for k, v in payload.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise Kd3Error(f"{path}: entry {bad[0]!r} is a {type(payload[bad[0]]).__name__}, not a tensor; expected a "
                       f"state dict or one wrapped under one of {', '.join(STATE_DICT_KEYS)}")
    state = {str(k): v for k, v in payload.items()}
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def import_state_dict(weights_path: str | Path, arch: str, num_classes: int, input_spec: InputSpec,
                      class_names: Sequence[str] | None, options: dict[str, Any] | None = None
                      ) -> tuple[Kd3Model, ModelMeta]:
    """Load a user's bare state dict into ``arch`` → (model in eval mode, ModelMeta) for ``save_checkpoint``.

    Keys are matched against the library's own names (``model.native_prefix`` stripped, e.g.
    torchvision's ``fc.weight`` rather than kd3's ``net.fc.weight``); either form is accepted. Any
    mismatch (other architecture, other class count, missing keys) is a one-line Kd3Error naming the
    first offending keys. BatchNorm ``num_batches_tracked`` counters absent from old checkpoints are
    filled in (they do not affect outputs).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise Kd3Error(f"num_classes must be a positive integer, got {num_classes!r}")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise Kd3Error(f"{len(names)} class names given for {num_classes} classes")
    for field_name in ("mean", "std"):
        values = getattr(input_spec, field_name)
        if len(values) != input_spec.channels:
            raise Kd3Error(f"input {field_name} has {len(values)} values for {input_spec.channels} channels")
    if any(v <= 0 for v in input_spec.std):
        raise Kd3Error(f"input std must be positive, got {list(input_spec.std)}")
    options = dict(options or {})
    state = read_state_dict(weights_path)  # a bad weights file fails before any user code is imported
    model = build_model(arch, num_classes, input_spec.channels, options, image_size=input_spec.image_size)
    prefix = getattr(model, "native_prefix", "")
    target: torch.nn.Module = model
    if prefix:
        target = model.get_submodule(prefix.rstrip("."))
        if all(k.startswith(prefix) for k in state):  # already kd3-style keys
            state = {k[len(prefix):]: v for k, v in state.items()}
    for key, value in target.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    try:
        load_state_dict_strict(target, state, str(weights_path))
    except Kd3Error as exc:
        given = f", options {sorted(options)}" if options else ""
        raise Kd3Error(f"{exc} (expected {arch} with {num_classes} classes{given}; "
                       f"check --arch/--num-classes/--options{_arch_hint(arch, state)})") from None
    model.eval()
    meta = ModelMeta(arch=arch, options=arch_options(model, options), num_classes=num_classes, class_names=names,
                     input=input_spec)
    return model, meta


def _arch_hint(arch: str, state: dict[str, torch.Tensor]) -> str:
    """A torchvision ResNet with the CIFAR stem is the usual CIFAR teacher; name it when the keys say so."""
    conv1 = state.get("conv1.weight")
    torchvision_keys = any(".downsample." in k for k in state) or "fc.weight" in state
    if arch.endswith("-cifar") or conv1 is None or conv1.dim() != 4 or tuple(conv1.shape[2:]) != (3, 3) \
            or not torchvision_keys:
        return ""
    base = {"cifar_resnet18": "resnet18", "cifar_resnet34": "resnet34"}.get(arch, arch.removeprefix("torchvision/"))
    return (f"; these look like torchvision ResNet weights with a 3x3 CIFAR stem: try --arch "
            f"torchvision/{base if base.startswith('res') or base.startswith('wide_') else 'resnet18'}-cifar")
