"""In-place distillation loss (BigNAS / AttentiveNAS): smaller subnets learn the largest subnet's soft labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, mean over the batch; the teacher is detached.

    The T^2 factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). No gradient reaches the teacher: in-place
    distillation trains the largest subnet on the labels only.

    Example::
        >>> logits = torch.randn(4, 10)
        >>> float(distillation_loss(logits, logits))
        0.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a positive number")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}"
        )
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def student_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Loss of a non-teacher subnet: ``(1 - weight) * CE(targets) + weight * distillation``.

    ``weight=1`` is BigNAS / AttentiveNAS in-place distillation (soft labels
    only); ``weight=0`` trains every subnet on the labels. The teacher (max
    subnet) itself is trained with plain cross-entropy.

    Example::
        >>> logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        >>> torch.allclose(student_loss(logits, targets, logits, weight=0.0), F.cross_entropy(logits, targets))
        True
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation.weight={weight!r}: expected a number in [0, 1]")
    loss = weight * distillation_loss(student_logits, teacher_logits, temperature)
    if weight < 1.0:
        loss = loss + (1.0 - weight) * F.cross_entropy(student_logits, targets)
    return loss
