"""The three MOHAWK losses (docs/equations.md §D1) and the relative error used to report hidden-state alignment."""

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
        soft = soft + hard_weight * F.cross_entropy(
            student_logits.float().reshape(-1, v), labels, ignore_index=-100
        )
    return soft


class _LinearKD(torch.autograd.Function):
    """kd_loss(h @ weight.T, teacher_logits) over rows of h, without the (n, vocab) student logits kept for the
    backward: rows go through in chunks, and each chunk's gradient is computed with its loss (the loss is the last
    op of the step, so d loss / d logits is known in the forward). Matmuls run in `dtype` (bf16 on a bf16 run, as
    autocast would), softmaxes and sums in fp32."""

    @staticmethod
    def forward(ctx, h, weight, t_logits, labels, settings):
        # h: (n, d), weight: (v, d), t_logits: (n, v), labels: (n,) or None; settings: (T, hard_weight, dtype, chunk)
        T, hard_weight, dtype, chunk = settings
        n = h.shape[0]
        w = weight.detach().to(dtype)
        hard = bool(hard_weight) and labels is not None
        # the hard-label CE is a mean over the labels, the loss a mean over the n rows
        hard_scale = hard_weight * n / max(1, int((labels != -100).sum())) if hard else 0.0
        total, grad_h, grad_w = 0.0, [], None
        for i in range(0, n, chunk):
            hc = h[i : i + chunk].detach().to(dtype)
            s = (hc @ w.T).float()  # (c, v)
            log_ps = F.log_softmax(s / T if T != 1 else s, dim=-1)
            t = t_logits[i : i + chunk].float()
            pt = F.softmax(t / T if T != 1 else t, dim=-1)
            total += -float((pt * log_ps).sum()) * T**2
            g = log_ps.exp_().sub_(
                pt
            )  # (c, v): d/ds of T^2 * CE(softmax(t/T), softmax(s/T)), up to the factor T
            if T != 1:
                g.mul_(T)
            if hard:
                lab = labels[i : i + chunk]
                keep = lab != -100
                log_p1 = F.log_softmax(s, dim=-1)
                total += -hard_scale * float(log_p1[keep].gather(1, lab[keep, None]).sum())
                g1 = log_p1.exp_()
                g1[keep] -= F.one_hot(lab[keep], s.shape[-1]).to(g1.dtype)
                g += hard_scale * g1 * keep[:, None]
            g = g.div_(n).to(dtype)
            grad_h.append(g @ w)
            gw = g.T @ hc  # (v, d)
            grad_w = gw.to(weight.dtype) if grad_w is None else grad_w.add_(gw)
        ctx.save_for_backward(torch.cat(grad_h).to(h.dtype), grad_w)
        return h.new_tensor(total / n, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_kd_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    dtype: torch.dtype | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Stage 3's loss with the LM head fused in. h: (n, d) student hidden states of the counted positions (after the
    final norm), weight: (v, d) the student's LM head, teacher_logits: (n, v), labels: (n,) (-100 ignored) -> scalar.

    Equals kd_loss(h @ weight.T, teacher_logits, temperature, labels, hard_weight) (tests/test_distill_losses.py),
    with the student's logits made and dropped chunk by chunk; dtype: the matmul dtype (default h's)."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0
    return _LinearKD.apply(
        h, weight, teacher_logits, labels, (temperature, hard_weight, dtype or h.dtype, chunk)
    )


def relative_error(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """||h_s - h_t|| / ||h_t|| over the whole tensor (reporting only)."""
    return (student_h.float() - teacher_h.float()).norm() / teacher_h.float().norm().clamp_min(1e-12)
