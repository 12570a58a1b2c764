"""``build_distiller``: a ready :class:`~scalekd.Distiller` from timm names or modules, with one
teacher or several (:class:`TeacherSpec`)."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import warnings

import torch
import torch.nn as nn

from ..adapters import LogitsTeacher, ScaleKDTeacher
from ..adapters.common import model_label
from ..adapters.models import check_patches, classes_kwargs, create_timm_model, default_img_size
from ..method.errors import OptionError
from ..method.options import DistillOptions
from .distiller import Distiller, Teacher, check_teachers, needs_teachers, teaches_logits
from .kernels import use_cpu_kernels

__all__ = ['build_distiller', 'resolve_img_size', 'TeacherSpec']

ModelSpec = Union[str, nn.Module]


@dataclass
class TeacherSpec:
    """One of several teachers given to :func:`build_distiller`.

    Attributes:
        model: timm name or module.
        name: its name in loss terms (``{name}/s4_ori``), logs and reports; distinct per teacher.
        img_size: the (H, W) or size it sees the images at, resized from the student's (null: the student's).
        weight: multiplies each of its feature terms, and its share of the KD target.
        kd: whether its logits teach (null: the method's ``kd``); a headless teacher, or one of other
            classes, cannot.
        tpp: its proxy path: true, false (its s3 mimicked directly) or null (auto: the method's, where its
            last stage replays; otherwise off, with a warning).
        kwargs: extra ``timm.create_model`` kwargs of a teacher given by name.
        pretrained: load its hub weights (needs network).
        mean, std: the normalisation it expects (default: its pretrained cfg).
    """
    model: ModelSpec
    name: str = 'teacher'
    img_size: Optional[Union[int, Tuple[int, int]]] = None
    weight: float = 1.0
    kd: Optional[bool] = None
    tpp: Optional[bool] = None
    kwargs: Optional[Dict[str, Any]] = None
    pretrained: bool = False
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None


def _as_size(img_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def resolve_img_size(img_size: Optional[Union[int, Tuple[int, int]]], teacher: Optional[ModelSpec],
                     student: ModelSpec) -> Tuple[int, int]:
    """``img_size`` as (H, W); when ``None``, the pretrained input size of the teacher's timm name, else the
    student's, else 224."""
    if img_size is not None:
        return _as_size(img_size)
    for spec, role in ((teacher, 'teacher'), (student, 'student')):
        size = default_img_size(spec, role) if isinstance(spec, str) else None
        if size:
            return _as_size(size)
    return 224, 224


def _input_channels(model: nn.Module) -> Optional[int]:
    """The input channels of a ready model: those of its first convolution (timm's ``first_conv``, else
    the first ``Conv2d`` it holds), if it has one."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    for name in [first] if isinstance(first, str) else list(first or []):
        conv = model.get_submodule(name) if name in dict(model.named_modules()) else None
        if isinstance(conv, nn.Conv2d):
            return conv.in_channels
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _model(spec: ModelSpec, img_size, role: str, kwargs: Optional[Dict[str, Any]], **common) -> nn.Module:
    if isinstance(spec, nn.Module):
        if kwargs:
            raise ValueError(f'{role}_kwargs only apply when the {role} is given by name')
        channels, in_chans = _input_channels(spec), common.get('in_chans', 3)
        if channels is not None and channels != in_chans:
            raise ValueError(f'the {role} {model_label(spec)} takes {channels} input channel(s), but in_chans is '
                             f'{in_chans}: pass in_chans={channels} to build_distiller (both models and the images '
                             f'have in_chans channels)')
        return spec
    if not isinstance(spec, str):
        raise TypeError(f'{role} must be a timm model name or an nn.Module, got {type(spec).__name__}')
    common = {k: v for k, v in common.items() if v is not None}
    return create_timm_model(spec, img_size, role=role, **{**common, **(kwargs or {})})


def build_distiller(
        teacher: Union[ModelSpec, Sequence[TeacherSpec], None],
        student: ModelSpec,
        method: str = 'scalekd',
        *,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        num_classes: Optional[int] = None,
        in_chans: int = 3,
        teacher_kwargs: Optional[Dict[str, Any]] = None,
        student_kwargs: Optional[Dict[str, Any]] = None,
        teacher_pretrained: bool = False,
        criterion: Optional[nn.Module] = None,
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        teacher_mean: Optional[Sequence[float]] = None,
        teacher_std: Optional[Sequence[float]] = None,
        device: Optional[torch.device] = None,
        teacher_dtype: Optional[torch.dtype] = None,
        **options: Any,
) -> Distiller:
    """Build a teacher-student distiller.

    Args:
        teacher: timm name (``swin_large_patch4_window7_224.ms_in22k_ft_in1k``) or module, or a list of
            :class:`TeacherSpec` for several teachers (each with its own name, size, weight, kd and tpp;
            ``teacher_kwargs`` ... ``teacher_std`` then go in the specs); may be ``None`` for ``method='none'``.
        student: timm name or module, trained from scratch.
        method: ``none``, ``kd``, ``fd`` or ``scalekd``.
        img_size: training resolution (default: the teacher's pretrained input size).
        num_classes, in_chans: passed to both models when created by name (``num_classes`` not to a
            pretrained teacher, which keeps its own classifier).
        teacher_kwargs, student_kwargs: extra ``timm.create_model`` kwargs.
        teacher_pretrained: load the teacher's hub weights (needs network).
        criterion: task loss (default cross entropy).
        input_mean, input_std: normalisation of the images the distiller gets (default: the student's).
        teacher_mean, teacher_std: normalisation the teacher expects (default: its pretrained cfg).
        device: where the models live (default: the CPU, where they are created). On the CPU the CAPs'
            3x3 convolutions take the unfold kernel (:func:`~scalekd.task.kernels.use_cpu_kernels`).
        teacher_dtype: the teacher forward's own autocast dtype (see :class:`~scalekd.Distiller`).
        **options: :class:`~scalekd.DistillOptions` fields (``projector``, ``tpp``, ``beta``, ...).
    """
    opts = DistillOptions.from_kwargs(method=method, **options).resolve()
    several = isinstance(teacher, (list, tuple))
    specs = list(teacher) if several else [] if teacher is None else [TeacherSpec(
        teacher, kwargs=teacher_kwargs, pretrained=teacher_pretrained, mean=teacher_mean, std=teacher_std)]
    if several and not specs:
        raise OptionError('the list of teachers is empty: give at least one, or method none')
    if several and (teacher_kwargs or teacher_pretrained or teacher_mean is not None or teacher_std is not None):
        raise ValueError('with several teachers, give kwargs, pretrained, mean and std in each TeacherSpec, not as '
                         'teacher_kwargs / teacher_pretrained / teacher_mean / teacher_std')
    size = resolve_img_size(img_size, specs[0].model if specs else None, student)
    student_model = _model(student, size, 'student', student_kwargs, num_classes=num_classes, in_chans=in_chans)
    teachers = []
    if needs_teachers(opts, [t.kd for t in specs]):
        if not specs:
            raise OptionError(f'method {method!r} needs a teacher')
        check_teachers(specs)  # before any teacher is built
        teachers = [_teacher(spec, opts, size, in_chans, num_classes, student_model, device, several) for spec in specs]
    if device is not None:
        student_model.to(device)
    distiller = Distiller(student_model, teachers, opts, size, in_chans, criterion=criterion,
                          input_mean=input_mean, input_std=input_std, device=device, teacher_dtype=teacher_dtype)
    if device is None or torch.device(device).type == 'cpu':  # built without a device: on the CPU
        use_cpu_kernels(distiller.distill_modules())
    return distiller.to(device) if device is not None else distiller


def _teacher(spec: TeacherSpec, opts: DistillOptions, student_size: Tuple[int, int], in_chans: int,
             num_classes: Optional[int], student: nn.Module, device: Optional[torch.device], several: bool) -> Teacher:
    """One teacher built at its own size, as its options ask (feature or logits adapter, its kd and tpp)."""
    size = _as_size(spec.img_size) if spec.img_size is not None else student_size
    size_key = f'the img_size of teacher {spec.name!r}' if several else 'img_size'
    model = _model(spec.model, size, 'teacher', spec.kwargs, in_chans=in_chans, pretrained=spec.pretrained,
                   size_key=size_key, **classes_kwargs('teacher', spec.pretrained, num_classes))
    if isinstance(spec.model, nn.Module):  # (one created by name was checked as it was created)
        check_patches(model, model_label(model), 'teacher', size, size_key)
    if device is not None:
        model.to(device)
    kd = teaches_logits(opts, spec.kd)
    tpp = spec.tpp
    if opts.uses_features:
        auto = several and tpp is None and opts.tpp
        adapter = ScaleKDTeacher(model, size, in_chans, opts.teacher_last_blocks,
                                 require_replay=opts.tpp if tpp is None and not auto else bool(tpp))
        if auto and not adapter.replays:
            warnings.warn(f'teacher {spec.name!r} ({adapter.label}): its last stage does not replay, so it teaches '
                          f'without TPP (its s3 is mimicked directly); set its tpp to false to say so', UserWarning,
                          stacklevel=3)
            tpp = False
    else:
        adapter = LogitsTeacher(model, size, in_chans)  # kd: any classifier
    if spec.mean is not None or spec.std is not None:
        adapter.set_normalization(spec.mean, spec.std)
    _check_classes(model, student, kd, spec.name if several else None)
    return Teacher(adapter, spec.name, spec.weight, spec.kd, tpp, size if several else None)


def _check_classes(teacher: nn.Module, student: nn.Module, kd: bool, name: Optional[str] = None) -> None:
    """Logit KD needs a teacher that predicts the student's classes; the error says why it cannot, and the
    feature-only way (ScaleKD's feature terms need no classifier)."""
    t, s = getattr(teacher, 'num_classes', None), getattr(student, 'num_classes', None)
    if not kd or t is None or s is None or t == s:
        return
    cause = (f'the teacher {model_label(teacher)} has no classifier (num_classes 0: a headless, MIM-pretrained or '
             f'image-tower model)' if t == 0 else
             f'the teacher {model_label(teacher)} predicts {t} classes, the student {s}')
    fix = 'distill.kd: false in a config, --option kd=false on the command line, kd=False in build_distiller'
    if name is not None:
        cause, fix = f'teacher {name!r}: {cause}', f'kd: false in its teachers entry, kd=False in its TeacherSpec'
    raise OptionError(f'logit KD cannot be used: {cause}. Distil features only (the kd option off: {fix}), '
                      f'or give the teacher a classifier for these {s} classes (fine-tuned weights)')
