"""The ScaleKD training task: a frozen teacher and one trainable module (student + projectors).

Follows timm's ``TrainingTask`` protocol: ``task(images, targets)`` returns a dict with the
weighted ``loss``, the student logits as ``output`` and every unweighted term; only the
trainable module is wrapped in DDP; projector weights are task state beside a clean student
state dict.

Loss terms (paper Eq. 5, release weights): ``task_loss`` (weight ``1 - kd_weight`` with KD,
else 1), ``kd_loss`` (``kd_weight``), and per tap and view ``{tap}_{view}``:
``proxy_ori`` = L_s, ``proxy_alt`` = L_s^alt, ``s4_ori`` = L_st, ``s4_alt`` = L_st^alt (TPP), or
``s3_*`` / ``s4_*`` against T_(n-1) / T_n without TPP; ``*_ori`` weigh ``w_ori``, ``*_alt`` ``w_alt``.
"""
import dataclasses
import warnings
from typing import Any, Collection, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss
from timm.utils import unwrap_model

from ..adapters import LogitsOnly, ScaleKDTeacher, StudentAdapter, TeacherFeatures
from ..adapters.teacher import FrozenTeacher
from ..adapters.common import Shape, normalization_from_pretrained_cfg
from ..method.errors import OptionError, UserError
from ..method.losses import logit_kd_loss
from ..method.mimicking import FeatureMimicking
from ..method.options import DistillOptions
from ..method.projectors import build_projector, fitting_heads
from ..method.proxy import LastStage, ProxyPath
from ..method.views import build_views

__all__ = ['Distiller', 'DistillationModule', 'TaskStateMismatchError']

Views = Dict[str, torch.Tensor]  # view name (``ori`` / ``alt``) -> projected map


class TaskStateMismatchError(UserError):
    """A distillation state from another configuration (a checkpoint of another run)."""


def _warn_single_position(taps: StudentAdapter, views, options: DistillOptions) -> None:
    """Warn when a student tap the alternative view reads is a 1x1 map: projected from one position, the
    features are the same everywhere, their DC-removed view is zero, and its loss teaches nothing."""
    if not any(v.transform == 'phi' for v in views):
        return
    read = ['s4'] + (['s3'] if options.tpp or 's3' in options.stages else [])
    flat = [tap for tap in read if tuple(getattr(taps.taps, tap)[1:]) == (1, 1)]
    terms = [f'{"proxy" if tap == "s3" and options.tpp else tap}_alt' for tap in flat]
    if flat:
        warnings.warn(f'the student {taps.label} has a 1x1 {" and ".join(flat)} map at this image size: its '
                      f'alternative (DC-removed) view is zero, so {" and ".join(terms)} teach(es) '
                      f'nothing. Use a larger image size, or a lower output stride (e.g. student.kwargs.'
                      f'output_stride=16 for ResNets)', UserWarning, stacklevel=4)


_PIECES = ('student_pass', 'proxy_views', 's4_views', 'tap_losses')  # what compile_pieces compiles


class DistillationModule(nn.Module):
    """The trainable part: the student and the distillation modules (projectors), nothing else.

    ``forward(images, teacher_features, last_stage)`` returns (student logits, unweighted
    feature losses). The teacher's last stage is passed in, never registered here, so the
    module's parameters and state dict hold no teacher weight. ``forward`` is made of
    :meth:`student_pass`, :meth:`proxy_views` (or the s3 projection), :meth:`s4_views` and
    :meth:`tap_losses`, which are public so that each can run (and be timed) on its own.
    """

    def __init__(self, student: nn.Module, taps: Union[StudentAdapter, LogitsOnly], options: DistillOptions,
                 teacher: Optional[ScaleKDTeacher] = None):
        super().__init__()
        self.student = student
        self.taps = taps
        self.adaptive_queries = options.adaptive_queries
        self.proxy: Optional[ProxyPath] = None
        self.s3: Optional[FeatureMimicking] = None
        self.s4: Optional[FeatureMimicking] = None
        if not options.uses_features:
            return
        views = build_views(options.views, options.original_view)
        _warn_single_position(taps, views, options)

        def projector_factory(src: Shape, dst: Shape, option: str, query_chs: Optional[int] = None):
            heads = getattr(options, option)
            if options.projector == 'cap' and dst[0] % heads:
                raise OptionError(f'distill.{option}={heads} does not divide the teacher width {dst[0]} that its CAP '
                                  f'projects to: set distill.{option} to a divisor of {dst[0]} '
                                  f'(e.g. {fitting_heads(dst[0], heads)})')
            cap_kwargs = dict(num_heads=heads, softmax_scale=options.softmax_scale,
                              student_norm=taps.projector_norm, query_chs=query_chs, student_conv=options.cap_conv)
            kwargs = cap_kwargs if options.projector == 'cap' else {}
            return lambda: build_projector(options.projector, src[0], dst[0], src[1:], dst[1:], **kwargs)

        s3_factory = projector_factory(taps.taps.s3, teacher.stage_input_shape, 's3_heads')
        query_chs = teacher.final_shape[0] if options.adaptive_queries else None
        ckpt = options.activation_checkpointing
        self.s4 = FeatureMimicking(views, projector_factory(taps.taps.s4, teacher.final_shape, 's4_heads', query_chs),
                                   ckpt)
        if options.tpp:
            self.proxy = ProxyPath(FeatureMimicking(views, s3_factory, ckpt))
        elif 's3' in options.stages:
            self.s3 = FeatureMimicking(views, s3_factory, ckpt)

    def compile_pieces(self, **compile_kwargs) -> None:
        """Compile each piece of :meth:`forward` on its own (``torch.compile`` keyword arguments), so that
        a compiled step and each piece timed alone (``scalekd bench --compile``) run the same code."""
        for name in _PIECES:
            setattr(self, name, torch.compile(getattr(self, name), **compile_kwargs))

    def __getstate__(self) -> Dict[str, Any]:
        """A copy or pickle holds the plain pieces: a compiled piece is bound to this module."""
        return {k: v for k, v in self.__dict__.items() if k not in _PIECES}

    def mimicking(self) -> Dict[str, FeatureMimicking]:
        """The feature mimicking at each tap that exists (``proxy`` or ``s3``, and ``s4``)."""
        taps = {'proxy': self.proxy.mimicking if self.proxy is not None else None, 's3': self.s3, 's4': self.s4}
        return {tap: m for tap, m in taps.items() if m is not None}

    def no_weight_decay(self) -> Set[str]:
        """Student names timm exempts from weight decay, plus the projectors' embeddings."""
        student = unwrap_model(self.student)
        names = {f'student.{n}' for n in getattr(student, 'no_weight_decay', set)()}
        return names | {n for n, _ in self.named_parameters() if n.endswith(('pos_embed', 'query_embed'))}

    def student_pass(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student forward: (logits, s3 map, s4 map)."""
        return self.taps(self.student, x)

    def proxy_views(self, s3: torch.Tensor, teacher: TeacherFeatures, last_stage: LastStage) -> Views:
        """TPP's proxy path: s3 projected in each view and run through the teacher's last stage."""
        return self.proxy(s3, last_stage, teacher.prefix)

    def s4_views(self, s4: torch.Tensor, proxy_views: Optional[Views] = None) -> Views:
        """s4 projected in each view; the proxy path's outputs are the CAPs' queries with adaptive queries."""
        return self.s4.project(s4, proxy_views if self.adaptive_queries else None)

    def tap_losses(self, tap: str, views: Views, teacher: TeacherFeatures) -> Dict[str, torch.Tensor]:
        """Unweighted losses ``{tap}_{view}`` of one tap's projected views against the teacher's feature
        (T_(n-1) for ``s3``, else T_n)."""
        target = teacher.stage_input if tap == 's3' else teacher.final
        return self.mimicking()[tap].losses(views, target, tap)

    def project(self, x: torch.Tensor, teacher: Optional[TeacherFeatures] = None,
                last_stage: Optional[LastStage] = None) -> Tuple[torch.Tensor, Dict[str, Views]]:
        """Student logits, and the student features projected at each tap (``proxy`` or ``s3``, and ``s4``)
        in each view, in the teacher's feature space."""
        logits, s3, s4 = self.student_pass(x)
        projected: Dict[str, Views] = {}
        if self.s4 is None:
            return logits, projected
        if self.proxy is not None:
            projected['proxy'] = self.proxy_views(s3, teacher, last_stage)
        elif self.s3 is not None:
            projected['s3'] = self.s3.project(s3)
        projected['s4'] = self.s4_views(s4, projected.get('proxy'))
        return logits, projected

    def forward(self, x: torch.Tensor, teacher: Optional[TeacherFeatures] = None,
                last_stage: Optional[LastStage] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits, projected = self.project(x, teacher, last_stage)
        losses: Dict[str, torch.Tensor] = {}
        for tap, views in projected.items():
            losses.update(self.tap_losses(tap, views, teacher))
        return logits, losses


class Distiller(TrainingTask):
    """ScaleKD (and its baselines) as a timm training task.

    Args:
        student: the timm student (trained from scratch; its state dict stays plain timm).
        teacher: the frozen teacher, or ``None`` for ``method='none'``.
        options: the distillation options (resolved here).
        img_size: (H, W) the pair trains at.
        in_chans: input channels.
        criterion: the task loss (default: timm's classification loss, cross entropy).
        input_mean, input_std: the normalisation of the images given to ``forward`` (default: the
            student's pretrained cfg); the teacher gets them re-normalised to its own.
        teacher_dtype: the teacher forward's own autocast dtype (``torch.bfloat16`` for an fp32 student on
            hardware with fast bf16; ``torch.float32`` keeps it out of the run's autocast); its features
            are handed on in float32. Default: the run's autocast, whatever it is. The teacher's last
            stage on the student's maps (TPP) is part of the trainable graph and keeps the run's.
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: Optional[FrozenTeacher],
            options: DistillOptions,
            img_size: Tuple[int, int],
            in_chans: int = 3,
            criterion: Optional[nn.Module] = None,
            input_mean: Optional[Sequence[float]] = None,
            input_std: Optional[Sequence[float]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
            teacher_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.options = options.resolve()
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.needs_teacher = self.options.kd or self.options.uses_features
        if self.needs_teacher and teacher is None:
            raise OptionError(f'method {self.options.method!r} needs a teacher')
        self.teacher = teacher if self.needs_teacher else None
        self.teacher_dtype = teacher_dtype
        taps = StudentAdapter(student, img_size, in_chans, self.options.student_s3_block) \
            if self.options.uses_features else LogitsOnly(student, img_size, in_chans)  # none / kd: any classifier
        self.trainable_module = DistillationModule(student, taps, self.options, self.teacher)
        self.criterion = resolve_classification_loss(criterion, self.device)
        mean, std = normalization_from_pretrained_cfg(getattr(student, 'pretrained_cfg', None), in_chans, input_mean,
                                                      input_std)
        self.register_buffer('student_mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.train()

    @property
    def student(self) -> nn.Module:
        """The plain timm student."""
        return unwrap_model(self.trainable_module).student

    @property
    def taps(self) -> Union[StudentAdapter, LogitsOnly]:
        return unwrap_model(self.trainable_module).taps

    def distill_modules(self) -> nn.Module:
        """The trainable module without the student: what ScaleKD adds only for training."""
        module = unwrap_model(self.trainable_module)
        return nn.ModuleList([m for m in (module.proxy, module.s3, module.s4) if m is not None])

    def loss_weights(self, names: Collection[str]) -> Dict[str, float]:
        """The weight of each named loss term in the total; an unknown name is a ``ValueError``."""
        opts = self.options
        weights = {'task_loss': 1.0 - opts.kd_weight if opts.kd else 1.0, 'kd_loss': opts.kd_weight}
        for tap, mimicking in unwrap_model(self.trainable_module).mimicking().items():
            weights.update({f'{tap}_{v.name}': opts.w_ori if v.name == 'ori' else opts.w_alt for v in mimicking.views})
        for name in names:
            if name not in weights:
                raise ValueError(f'unknown loss term {name!r}; known terms: {", ".join(weights)}')
        return {n: weights[n] for n in names}

    def train(self, mode: bool = True) -> 'Distiller':
        """Train mode for the trainable module; the teacher stays in eval mode unless
        ``teacher_train_mode`` asks for the release's (accidental) train-mode teacher."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.options.teacher_train_mode)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """timm's ``TrainingTask.compile`` (call it before :meth:`prepare_distributed`): the trainable
        module's pieces (student pass, proxy path, s4 projection, losses) and the teacher's feature
        extraction and last stage; the weights and state-dict keys stay those of the plain modules.
        Returns the trainable module, whose :meth:`DistillationModule.forward` runs the compiled pieces."""
        module = unwrap_model(self.trainable_module)
        module.compile_pieces(backend=backend, mode=mode, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return module

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'Distiller':
        """Wrap the trainable module (student + projectors) in DDP; the frozen teacher is not wrapped."""
        from torch.nn.parallel import DistributedDataParallel
        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        resolved = super().get_eval_model(module=module, ema=ema)
        if resolved is None:
            return None
        inner = unwrap_model(resolved)
        return inner.student if isinstance(inner, DistillationModule) else resolved

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        if module is None:
            return {}
        state = {k: v for k, v in unwrap_model(module).state_dict().items() if not k.startswith('student.')}
        return {'distill': state} if state else {}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state:
            return
        module = unwrap_model(module if module is not None else self.get_trainable_module(ema=ema))
        own = {k for k in module.state_dict() if not k.startswith('student.')}
        given = state.get('distill', {})
        if strict and set(given) != own:
            missing, unexpected = sorted(own - set(given)), sorted(set(given) - own)
            raise TaskStateMismatchError(f'distillation state does not match (a checkpoint from another '
                                         f'configuration?): missing {missing}, unexpected {unexpected}')
        module.load_state_dict(given, strict=False)

    def teacher_features(self, images: torch.Tensor) -> Optional[TeacherFeatures]:
        """The no-grad teacher forward on the distiller's ``images``, re-normalised to the teacher's own
        statistics; ``None`` without a teacher."""
        if self.teacher is None:
            return None
        images = self.teacher.normalize_input(images, self.student_mean, self.student_std)
        if self.teacher_dtype is None:
            return self.teacher.extract(images)
        dtype = self.teacher_dtype
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = self.teacher.extract(images)
        floats = {f.name: getattr(features, f.name).float() for f in dataclasses.fields(features)
                  if getattr(features, f.name) is not None}
        return dataclasses.replace(features, **floats)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One training forward: ``loss`` (weighted total), ``output`` (student logits) and each term."""
        teacher = self.teacher_features(input)
        last_stage = self.teacher.last_stage if self.teacher is not None else None
        try:
            logits, terms = self.trainable_module(input, teacher, last_stage)
        except ValueError as e:
            if 'Expected more than 1 value per channel' not in str(e):
                raise
            raise UserError(f'a BatchNorm layer of the student or its projectors got one value per channel: '
                            f'{input.shape[0]} image(s) per step and process with a 1x1 map. Train with more '
                            f'images per process (train.batch_size / processes / accum_steps) or with a larger '
                            f'map (data.img_size, or a lower student output_stride)') from None
        terms = {'task_loss': self.criterion(logits, target), **terms}
        if self.options.kd:
            terms['kd_loss'] = logit_kd_loss(logits, teacher.logits, self.options.kd_temperature)
        weights = self.loss_weights(terms)
        total = sum(weights[n] * v for n, v in terms.items())
        return {'loss': total, 'output': logits, **terms}
