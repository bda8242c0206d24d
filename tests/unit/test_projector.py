"""KD³ projector and embedding head (METHODS.md §1b, §1d)."""

import pytest
import torch

from kd3.models.projector import EmbeddingHead, Projector, resize_feature_map


@pytest.mark.parametrize("in_hw, out_size, expected_hw", [
    ((4, 4), None, (4, 4)),
    ((4, 4), (4, 4), (4, 4)),
    ((8, 8), (4, 4), (4, 4)),   # larger student map: pooled down
    ((2, 2), (4, 4), (4, 4)),   # smaller student map: interpolated up
    ((4, 4), (8, 2), (8, 2)),   # mixed
])
def test_projector_output_shapes(in_hw, out_size, expected_hw):
    proj = Projector(8, 16)
    out = proj(torch.randn(2, 8, *in_hw), output_size=out_size)
    assert out.shape == (2, 16, *expected_hw)


def test_projector_hidden_width():
    assert Projector(8, 16).net[0].out_channels == 8           # 16 // 2
    assert Projector(8, 16, factor=4).net[3].out_channels == 4
    assert Projector(8, 3, factor=4).net[0].out_channels == 1  # at least 1
    kinds = [type(m).__name__ for m in Projector(8, 16).net]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert Projector(8, 16).net[3].kernel_size == (3, 3) and Projector(8, 16).net[3].padding == (1, 1)


def test_resize_pools_down_and_interpolates_up():
    x = torch.arange(16.).view(1, 1, 4, 4)
    # 2x2 block means of 0..15: (0+1+4+5)/4 = 2.5, 4.5, 10.5, 12.5
    assert resize_feature_map(x, (2, 2)).flatten().tolist() == pytest.approx([2.5, 4.5, 10.5, 12.5])
    # bilinear, align_corners=False: src = (dst + 0.5) * 2/4 - 0.5 = -.25 (clamped), .25, .75, 1.25 (clamped)
    y = torch.tensor([[[[0., 2.]]]])
    assert resize_feature_map(y, (1, 4)).flatten().tolist() == pytest.approx([0.0, 0.5, 1.5, 2.0])


def test_projector_gradients_flow():
    torch.manual_seed(0)
    proj = Projector(4, 6)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = proj(x, output_size=(3, 3))
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in proj.named_parameters():
        assert param.grad is not None, name
    assert proj.net[0].weight.grad.abs().sum() > 0


def test_projector_validation():
    with pytest.raises(ValueError, match="student_map"):
        Projector(8, 16)(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="output_size"):
        Projector(8, 16)(torch.randn(2, 8, 4, 4), output_size=(0, 4))
    with pytest.raises(ValueError, match="factor"):
        Projector(8, 16, factor=0)


def test_embedding_head_unit_norm_and_gradient():
    torch.manual_seed(0)
    head = EmbeddingHead(10)
    x = torch.randn(5, 10, requires_grad=True)
    out = head(x)
    assert out.shape == (5, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    out[:, 0].sum().backward()
    assert x.grad is not None and head.linear.weight.grad is not None
    assert EmbeddingHead(10, out_dim=16)(torch.randn(2, 10)).shape == (2, 16)
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        head(torch.randn(5, 9))
