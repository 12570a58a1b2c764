"""``ScaleKDLoss``: ScaleKD as a loss on student features that your own model code computed.

For training loops whose student lives in another framework (a detector, a Hugging Face model): the
loss owns the frozen teacher and the projectors, takes the student's s3 / s4 maps (and logits) with
the images, and returns what :class:`~scalekd.Distiller` returns for the same inputs: the weighted
``loss`` and every unweighted term.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .builder import ModelSpec, build_distiller

__all__ = ['ScaleKDLoss']

Shape = Tuple[int, int, int]


class _GivenFeatures(nn.Module):
    """A stand-in student whose intermediates are the features handed to :meth:`ScaleKDLoss.forward`
    (zeros of the declared shapes while the distiller is built)."""

    def __init__(self, s3_shape: Shape, s4_shape: Shape, num_classes: Optional[int]):
        super().__init__()
        self.shapes = (tuple(s3_shape), tuple(s4_shape))
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # the device and dtype of probes
        self.given: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        if self.given is None:
            s3, s4 = (x.new_zeros(x.shape[0], *shape) for shape in self.shapes)
        else:
            s3, s4 = self.given[:2]
        return s4, [s3, s4]

    def forward_head(self, final: torch.Tensor) -> torch.Tensor:
        logits = self.given[2] if self.given is not None else None
        return logits if logits is not None else final.new_zeros(final.shape[0], self.num_classes or 0)


class ScaleKDLoss(nn.Module):
    """ScaleKD's loss (paper Eq. 5, the release's weights) on student features computed elsewhere.

    The loss runs the frozen teacher on the images and owns the projectors (CAP, DFM, TPP), which
    train with your model: give ``loss_fn.projectors.parameters()`` to the optimizer too.

    Args:
        teacher: timm name or module of the teacher.
        s3_shape: (C, H, W) of the student's second-to-last stage map, as given to :meth:`forward`.
        s4_shape: (C, H, W) of the student's last stage map.
        num_classes: classes of the student's logits (needed for logit KD, and then the teacher's too).
        img_size: the images' (H, W) (default: the teacher's pretrained input size).
        in_chans: image channels.
        teacher_kwargs: extra ``timm.create_model`` kwargs of a teacher given by name.
        teacher_pretrained: load the teacher's hub weights (needs network).
        criterion: the task loss on the logits (default cross entropy).
        input_mean, input_std: the normalisation of the images given to :meth:`forward` (default
            ImageNet's); the teacher gets them re-normalised to its own.
        teacher_mean, teacher_std: the normalisation the teacher expects (default: its pretrained cfg).
        device: where the teacher and the projectors live.
        teacher_dtype: the teacher forward's own autocast dtype (see :class:`~scalekd.Distiller`).
        **options: :class:`~scalekd.DistillOptions` fields (``kd``, ``tpp``, ``w_ori``, ...); method
            ``fd`` or ``scalekd`` (the default).
    """

    def __init__(self, teacher: ModelSpec, s3_shape: Sequence[int], s4_shape: Sequence[int], *,
                 num_classes: Optional[int] = None, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                 in_chans: int = 3, teacher_kwargs: Optional[Dict[str, Any]] = None, teacher_pretrained: bool = False,
                 criterion: Optional[nn.Module] = None, input_mean: Optional[Sequence[float]] = None,
                 input_std: Optional[Sequence[float]] = None, teacher_mean: Optional[Sequence[float]] = None,
                 teacher_std: Optional[Sequence[float]] = None, device: Optional[torch.device] = None,
                 teacher_dtype: Optional[torch.dtype] = None, **options: Any):
        super().__init__()
        options.setdefault('method', 'scalekd')
        if options['method'] not in ('fd', 'scalekd'):
            raise ValueError(f"ScaleKDLoss distils features: method 'fd' or 'scalekd', not {options['method']!r} "
                             f'(logit KD alone needs no features: scalekd.logit_kd_loss)')
        for name, shape in (('s3_shape', s3_shape), ('s4_shape', s4_shape)):
            if len(shape) != 3:
                raise ValueError(f'{name} is the (C, H, W) of one map, got {tuple(shape)}')
        self.slot = _GivenFeatures(s3_shape, s4_shape, num_classes)
        self.distiller = build_distiller(
            teacher, self.slot, img_size=img_size, num_classes=num_classes, in_chans=in_chans,
            teacher_kwargs=teacher_kwargs, teacher_pretrained=teacher_pretrained, criterion=criterion,
            input_mean=input_mean, input_std=input_std, teacher_mean=teacher_mean, teacher_std=teacher_std,
            device=device, teacher_dtype=teacher_dtype, **options)

    @property
    def projectors(self) -> nn.Module:
        """What the loss trains: the projectors (give their parameters to the optimizer)."""
        return self.distiller.distill_modules()

    def forward(self, images: torch.Tensor, s3: torch.Tensor, s4: torch.Tensor, logits: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The weighted ``loss`` and each unweighted term, as :class:`~scalekd.Distiller` gives them.

        Args:
            images: the batch the student saw, normalised as ``input_mean`` / ``input_std`` say.
            s3, s4: the student's (N, C, H, W) maps of the shapes given at construction.
            logits: the student's logits; with ``targets`` they add the task loss, and logit KD
                (``kd``, on by default for ``scalekd``) needs them.
            targets: class indices (or soft targets) for the task loss.
        """
        for name, given, shape in (('s3', s3, self.slot.shapes[0]), ('s4', s4, self.slot.shapes[1])):
            if tuple(given.shape[1:]) != shape or given.shape[0] != images.shape[0]:
                raise ValueError(f'{name} must be ({images.shape[0]}, {", ".join(map(str, shape))}) for these '
                                 f'images, got {tuple(given.shape)}')
        d = self.distiller
        if d.kd and logits is None:
            raise ValueError('logit KD (the kd option) needs the student logits: pass logits=..., or build the loss '
                             'with kd=False')
        self.slot.given = (s3, s4, logits)
        try:
            teachers = d.teacher_features(images)
            _, features = d.trainable_module(images, teachers, d.last_stages())
        finally:
            self.slot.given = None
        return d.loss_terms(logits, features, teachers, targets)

    def prepare_distributed(self, **ddp_kwargs) -> 'ScaleKDLoss':
        """Wrap the projectors in DDP (the teacher stays unwrapped); see :meth:`Distiller.prepare_distributed`."""
        self.distiller.prepare_distributed(**ddp_kwargs)
        return self
