"""The three MOHAWK losses (reference §4.1-4.3) and the relative error used to report hidden-state alignment."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def matrix_orientation_loss(student_matrix: torch.Tensor, teacher_attn: torch.Tensor) -> torch.Tensor:
    """Stage 1. student_matrix, teacher_attn: (b, h, l, l) -> scalar.

    Frobenius norm of the difference over the last two dims (one per batch row and head), mean over b and h."""
    diff = student_matrix.float() - teacher_attn.float()
    return torch.linalg.matrix_norm(diff, ord="fro").mean()


def hidden_alignment_loss(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """Stage 2. student_h, teacher_h: (b, l, d) -> scalar: the mean over tokens of the (not squared) L2 norm
    of the per-token difference."""
    return (student_h.float() - teacher_h.float()).norm(dim=-1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 3. logits: (b, l, v); labels: (b, l) next-token targets already aligned with the logits
    (-100 ignored); weights: (b, l) which positions count (bool or float; None: all) -> scalar.

    Soft-label cross-entropy -sum_v softmax(t/T) log_softmax(s/T), averaged over the counted positions, scaled by
    T^2 so its gradient size does not depend on T (Hinton et al.); plus hard_weight * CE(s, labels) on the same
    positions when asked."""
    v = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, v) / temperature
    t = teacher_logits.float().reshape(-1, v) / temperature
    per_token = -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(-1) * temperature**2  # (b * l,)
    w = None if weights is None else weights.reshape(-1).to(per_token.dtype)
    soft = per_token.mean() if w is None else (per_token * w).sum() / w.sum().clamp_min(1.0)
    if hard_weight and labels is not None:
        labels = labels.reshape(-1)
        if w is not None:
            labels = labels.masked_fill(w == 0, -100)
        soft = soft + hard_weight * F.cross_entropy(student_logits.float().reshape(-1, v), labels, ignore_index=-100)
    return soft


def relative_error(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """||h_s - h_t|| / ||h_t|| over the whole tensor (reporting only)."""
    return (student_h.float() - teacher_h.float()).norm() / teacher_h.float().norm().clamp_min(1e-12)
