"""Classic knowledge distillation (Hinton et al., 2015, https://arxiv.org/abs/1503.02531)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd3.methods.precision import float32_loss


@float32_loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    r"""KL(p_T ‖ p_S) at temperature τ, times τ² (keeps gradient scale independent of τ).

    .. math:: L = \tau^2 \frac{1}{B} \sum_i \sum_k p^T_{ik} (\log p^T_{ik} - \log p^S_{ik}),
              \quad p = \mathrm{softmax}(z / \tau)

    Shapes: logits [B, K]; returns a scalar (mean over the batch). The teacher side is detached.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
