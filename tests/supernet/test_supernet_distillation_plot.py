"""In-place distillation loss and the accuracy-vs-FLOPs Pareto plot."""

import pytest
import torch
import torch.nn.functional as F

from dist_supernet.supernet.distillation import distillation_loss, student_loss
from dist_supernet.supernet.plot import pareto_front, plot_accuracy_vs_flops


def test_distillation_is_scaled_kl_to_detached_soft_labels():
    torch.manual_seed(0)
    student = torch.randn(5, 10, requires_grad=True)
    teacher = torch.randn(5, 10, requires_grad=True)
    T = 2.0
    loss = distillation_loss(student, teacher, T)
    p = F.softmax(teacher / T, dim=-1)
    expected = (p * (p.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean() * T**2
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert float(distillation_loss(teacher.detach(), teacher)) == pytest.approx(0.0, abs=1e-7)

    y = torch.randint(0, 10, (5,))
    mixed = student_loss(student, y, teacher, weight=0.25, temperature=T)
    torch.testing.assert_close(mixed, 0.25 * expected + 0.75 * F.cross_entropy(student, y), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, 0.0)
    with pytest.raises(ValueError, match="distillation.weight"):
        student_loss(student, y, teacher, weight=1.5)


def test_pareto_front_and_png(tmp_path):
    points = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (4.0, 0.85), (1.0, 0.3)]
    assert pareto_front(points) == [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]
    assert pareto_front([]) == []
    path = tmp_path / "pareto.png"
    front = plot_accuracy_vs_flops([(f * 1e6, a) for f, a in points], path, title="digits", highlight=(3e6, 0.9))
    assert len(front) == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
