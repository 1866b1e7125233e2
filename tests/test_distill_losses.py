import math

import pytest
import torch

from llamba.distill.losses import (
    hidden_alignment_loss,
    kd_loss,
    linear_kd_loss,
    matrix_orientation_loss,
    relative_error,
)
from llamba.distill.schedule import wsd_lr


def test_matrix_orientation_loss_hand_computed():
    # b=1, h=2, l=2: head 0 differs by a single 1 (norm 1), head 1 by a 3 and a 4 (norm 5) -> mean 3
    teacher = torch.zeros(1, 2, 2, 2)
    student = torch.zeros(1, 2, 2, 2)
    student[0, 0, 0, 0] = 1.0
    student[0, 1, 0, 1] = 3.0
    student[0, 1, 1, 0] = -4.0
    assert matrix_orientation_loss(student, teacher).item() == pytest.approx(3.0)
    assert matrix_orientation_loss(teacher, teacher).item() == 0.0


def test_hidden_alignment_loss_is_mean_token_l2_not_squared():
    t = torch.zeros(1, 3, 2)
    s = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [6.0, -8.0]]])  # token norms 5, 0, 10
    assert hidden_alignment_loss(s, t).item() == pytest.approx(5.0)


def test_kd_loss_hand_computed():
    teacher = torch.zeros(1, 1, 2)  # p = (1/2, 1/2)
    student = torch.tensor([[[0.0, math.log(3.0)]]])  # q = (1/4, 3/4)
    ce = -0.5 * (math.log(0.25) + math.log(0.75))
    assert kd_loss(student, teacher).item() == pytest.approx(ce, rel=1e-6)
    # T = 2: q = softmax(0, ln3 / 2) = (1, sqrt 3) / (1 + sqrt 3); scaled by T^2
    ce_t2 = 4 * (math.log(1 + math.sqrt(3)) - 0.25 * math.log(3))
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(ce_t2, rel=1e-6)
    labels = torch.tensor([[1]])
    with_hard = kd_loss(student, teacher, labels=labels, hard_weight=0.5).item()
    assert with_hard == pytest.approx(ce - 0.5 * math.log(0.75), rel=1e-6)
    ignored = kd_loss(
        student.expand(1, 2, 2), teacher.expand(1, 2, 2), labels=torch.tensor([[1, -100]]), hard_weight=0.5
    ).item()
    assert ignored == pytest.approx(ce - 0.5 * math.log(0.75), rel=1e-6)


def test_kd_loss_minimized_by_the_teacher_distribution():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 7)
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    assert kd_loss(teacher, teacher).item() == pytest.approx(entropy.item(), rel=1e-6)
    assert kd_loss(teacher + 0.5 * torch.randn_like(teacher), teacher).item() > entropy.item()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("temperature,hard_weight,chunk", [(1.0, 0.0, 1024), (2.0, 0.5, 5), (1.0, 0.5, 3)])
def test_linear_kd_loss_equals_kd_loss_on_the_logits(temperature, hard_weight, chunk):
    """The fused head + KD loss against the reference kd_loss(h @ W.T, t): loss and both gradients, seeded random
    inputs, fp32 (chunks of 3 and 5 rows cross chunk borders; some labels ignored)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 13, 8, 50
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = 2 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 7]] = -100
    ref = kd_loss((h @ w.T)[None], t[None], temperature, labels=labels[None], hard_weight=hard_weight)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    out = linear_kd_loss(h, w, t, temperature, labels=labels, hard_weight=hard_weight, chunk=chunk)
    out_h, out_w = torch.autograd.grad(2.0 * out, (h, w))  # a scale on the loss reaches both gradients
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    assert _rel(out_h, 2.0 * ref_h) < 1e-5 and _rel(out_w, 2.0 * ref_w) < 1e-5


def test_linear_kd_loss_in_bf16_stays_close_and_empty_selection_is_zero():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(16, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(64, 32, generator=g)).requires_grad_()
    t = torch.randn(16, 64, generator=g)
    ref = kd_loss((h @ w.T)[None], t[None])
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    out = linear_kd_loss(h, w, t.bfloat16(), dtype=torch.bfloat16)
    out_h, out_w = torch.autograd.grad(out, (h, w))
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    assert _rel(out_h, ref_h) < 3e-2 and _rel(out_w, ref_w) < 3e-2
    assert out_h.dtype == h.dtype and out_w.dtype == w.dtype
    empty = linear_kd_loss(h[:0], w, t[:0])
    assert empty.item() == 0.0
    empty.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0


def test_relative_error():
    t = torch.tensor([3.0, 4.0])
    assert relative_error(t + torch.tensor([0.0, 0.5]), t).item() == pytest.approx(0.1)


def test_wsd_schedule_shape():
    lrs = [wsd_lr(s, 20, 1.0, warmup=0.1, decay=0.2, min_lr=0.0) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warmup steps
    assert all(x == 1.0 for x in lrs[2:16])  # stable
    assert lrs[16:] == pytest.approx([0.75, 0.5, 0.25, 0.0])  # 4 decay steps down to min_lr
    assert wsd_lr(0, 1, 1e-3) > 0  # a one-step stage still trains
