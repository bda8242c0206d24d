"""The GPU-path settings: how each ``auto`` resolves, what the CPU gets, losses in float32 under
autocast, channels_last models and batches, DataLoader options, and their config checks."""

from __future__ import annotations

import pytest
import torch

from kd3.compute import Compute, resolve_channels_last, resolve_pin_memory, resolve_precision
from kd3.config import RunSection, parse_config
from kd3.data.shards import LoaderOptions, ShardImages, image_loader
from kd3.errors import ConfigError
from kd3.inference import batch_logits
from kd3.methods.kd import kd_loss
from kd3.methods.kd3_losses import nt_xent
from kd3.models.spec import InputSpec

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device value: nothing runs on it here
SPEC = InputSpec(image_size=8, channels=1, mean=(0.5,), std=(0.25,))


def test_auto_is_float32_contiguous_and_unpinned_on_the_cpu():
    compute = Compute.from_config(RunSection(), CPU)
    assert (compute.precision, compute.channels_last, compute.pin_memory) == ("fp32", False, False)
    assert compute.dtype is None and compute.grad_scaler() is None
    with compute.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_channels_last("auto", CUDA) and resolve_pin_memory("auto", CUDA)


def test_explicit_settings_win_and_pinning_needs_cuda():
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_channels_last(True, CPU) and not resolve_channels_last(False, CUDA)
    assert not resolve_pin_memory(True, CPU)  # nothing to pin for without a GPU
    assert not resolve_pin_memory(False, CUDA)


def test_bf16_autocast_on_the_cpu_runs_the_forward_in_bf16():
    compute = Compute(precision="bf16")
    layer = torch.nn.Linear(4, 3)
    with compute.autocast():
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


def test_fp16_training_gets_a_grad_scaler():
    scaler = Compute(precision="fp16").grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_losses_are_float32_under_autocast_and_unchanged_outside():
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(4, 5, generator=g) * 8, torch.randn(4, 5, generator=g) * 8
    plain = kd_loss(z_s, z_t, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_s, low_t = z_s.bfloat16(), z_t.bfloat16()
        mixed = kd_loss(low_s, low_t, 4.0)
        # NT-Xent's similarity matmul would run in bf16 under autocast: not inside a kd3 loss
        con = nt_xent(low_s, low_t, 0.3)
    assert mixed.dtype == torch.float32 and con.dtype == torch.float32
    # the same as float32 on the bf16-rounded logits (the loss itself loses nothing)
    assert torch.equal(mixed, kd_loss(low_s.float(), low_t.float(), 4.0))
    assert torch.equal(con, nt_xent(low_s.float(), low_t.float(), 0.3))
    assert torch.equal(plain, kd_loss(z_s, z_t, 4.0))


def test_channels_last_converts_conv_models_and_4d_batches():
    compute = Compute(channels_last=True)
    conv = compute.model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()))
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    spec = InputSpec(image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = compute.images(images, spec)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = Compute().images(images, spec)
    assert plain.is_contiguous() and torch.equal(plain, x)  # the same values, another layout
    linear = compute.model(torch.nn.Linear(3, 2))  # nothing to convert without a convolution
    assert linear.weight.is_contiguous()


def test_batch_logits_gives_a_normal_tensor_from_inference_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    logits = batch_logits(model, SPEC, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), CPU)
    assert not logits.is_inference() and logits.dtype == torch.float32
    logits.add_(1)  # callers may modify it in place
    with_bf16 = batch_logits(model, SPEC, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), CPU, Compute(precision="bf16"))
    assert with_bf16.dtype == torch.float32 and torch.allclose(with_bf16 + 1, logits, atol=0.05)


def test_the_dataloader_gets_the_loader_options(tmp_path):
    dataset = ShardImages([], SPEC)
    loader = image_loader(dataset, 4, LoaderOptions(num_workers=2, pin_memory=False, persistent_workers=True,
                                                    prefetch_factor=3))
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor, loader.pin_memory) == \
        (2, True, 3, False)
    pinned = image_loader(ShardImages([], SPEC), 4, Compute(device=CUDA, pin_memory=True).loader(0))
    assert pinned.pin_memory and pinned.num_workers == 0 and not pinned.persistent_workers
    plain = image_loader(ShardImages([], SPEC), 4, 0)  # a worker count alone, as before
    assert (plain.num_workers, plain.persistent_workers, plain.pin_memory) == (0, False, False)


def _config(**train):
    return parse_config({"score": {"teacher": "t.pt"}, "train": train}, "cfg.yaml")


def test_worker_options_without_workers_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^cfg.yaml: train: prefetch_factor applies to loader workers only"):
        _config(prefetch_factor=4)
    with pytest.raises(ConfigError, match=r"persistent_workers applies to loader workers only"):
        parse_config({"score": {"teacher": "t.pt", "persistent_workers": True}}, "cfg.yaml")
    cfg = _config(num_workers=2, prefetch_factor=4, persistent_workers=True)
    loader = Compute().section_loader(cfg.train)
    assert loader == LoaderOptions(num_workers=2, persistent_workers=True, prefetch_factor=4)
    with pytest.raises(ConfigError, match="run.precision"):
        parse_config({"run": {"precision": "fp8"}}, "cfg.yaml")


def test_loader_and_checkpoint_keys_leave_the_resume_fingerprint_alone():
    base = _config().fingerprint("train")
    assert _config(num_workers=4, prefetch_factor=2, persistent_workers=True,
                   checkpoint_every_steps=100).fingerprint("train") == base
