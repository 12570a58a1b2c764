"""The two distances ScaleKD trains with: the normalised feature distance D and logit KD."""
import torch
import torch.nn.functional as F

__all__ = ['feature_distance', 'logit_kd_loss', 'soft_target_kd_loss']


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Normalised feature distance D of the reference release.

    Both (N, C, H, W) maps are L2-normalised along C independently at every (n, h, w);
    the squared differences are summed over C*H*W and divided by N (so D grows with H*W).
    Computed in float32 at least, also under mixed precision.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f'feature_distance needs equal shapes, got student {tuple(student.shape)} '
            f'and teacher {tuple(teacher.shape)}')
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = F.normalize(student.to(dtype), dim=1, eps=eps)
    t = F.normalize(teacher.to(dtype), dim=1, eps=eps)
    return (s - t).pow(2).sum() / student.shape[0]


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross entropy of the release, ``T^2 * mean_n(-sum_k p_t log p_s)``, unweighted.

    ``p_t = softmax(teacher / T)``; ``log p_s = log_softmax(student / T)``. It differs from
    the KL form by the teacher's entropy only, a constant for the student.
    """
    p_t = F.softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
    return soft_target_kd_loss(student_logits, p_t, temperature)


def soft_target_kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_n(-sum_k q_k log p_s)`` for a given soft target ``q`` (the teachers' softened
    distributions, averaged when several teach: :meth:`scalekd.Distiller.kd_target`)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return -(target_probs.to(log_p_s.dtype) * log_p_s).sum(dim=-1).mean() * temperature ** 2
