"""The ScaleKD training task: frozen teachers and one trainable module (student + projectors).

Follows timm's ``TrainingTask`` protocol: ``task(images, targets)`` returns a dict with the
weighted ``loss``, the student logits as ``output`` and every unweighted term; only the
trainable module is wrapped in DDP; projector weights are task state beside a clean student
state dict.

Loss terms (paper Eq. 5, release weights): ``task_loss`` (weight ``1 - kd_weight`` with KD,
else 1), ``kd_loss`` (``kd_weight``), and per tap and view ``{tap}_{view}``:
``proxy_ori`` = L_s, ``proxy_alt`` = L_s^alt, ``s4_ori`` = L_st, ``s4_alt`` = L_st^alt (TPP), or
``s3_*`` / ``s4_*`` against T_(n-1) / T_n without TPP; ``*_ori`` weigh ``w_ori``, ``*_alt`` ``w_alt``.
With several teachers each feature term is named ``{teacher}/{tap}_{view}`` and weighs its teacher's
``weight`` more.
"""
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Dict, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss
from timm.utils import unwrap_model

from ..adapters import LogitsOnly, ScaleKDTeacher, StudentAdapter, TeacherFeatures
from ..adapters.teacher import FrozenTeacher
from ..adapters.common import Shape, normalization_from_pretrained_cfg
from ..method.errors import OptionError, UserError
from ..method.losses import soft_target_kd_loss
from ..method.mimicking import FeatureMimicking
from ..method.options import DistillOptions
from ..method.projectors import build_projector, fitting_heads
from ..method.proxy import LastStage, ProxyPath
from ..method.teacher_norm import FeatureStandardizer
from ..method.views import build_views

__all__ = ['Distiller', 'DistillationModule', 'Teacher', 'TeacherBranch', 'TaskStateMismatchError']

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


_PIECES = ('proxy_views', 's4_views', 'tap_losses')  # what compile_pieces compiles in a branch


@dataclass
class Teacher:
    """One frozen teacher of a :class:`Distiller` and how it teaches.

    Attributes:
        adapter: the frozen teacher: a :class:`~scalekd.adapters.ScaleKDTeacher` for feature methods,
            any :class:`~scalekd.adapters.teacher.FrozenTeacher` for logit KD.
        name: its name in loss terms (``{name}/s4_ori`` when there are several teachers), logs and reports.
        weight: multiplies each of its feature terms, and its share of the KD target.
        kd: whether its logits teach (null: the options' ``kd``).
        tpp: its proxy path (null: the options' ``tpp``; false: its s3 is mimicked directly).
        img_size: (H, W) it sees the images at, resized from the student's (null: the student's).
    """
    adapter: FrozenTeacher
    name: str = 'teacher'
    weight: float = 1.0
    kd: Optional[bool] = None
    tpp: Optional[bool] = None
    img_size: Optional[Tuple[int, int]] = None


class TeacherBranch(nn.Module):
    """What one teacher adds to the trainable module: its projectors at each tap (the proxy path or the
    direct s3 mimicking, and s4) and, with ``teacher_norm``, the standardisation of its targets.

    :meth:`proxy_views`, :meth:`s4_views` and :meth:`tap_losses` are public so that each can run (and be
    timed) on its own; :meth:`project` and :meth:`losses` chain them.
    """

    def __init__(self, taps: StudentAdapter, options: DistillOptions, teacher: ScaleKDTeacher):
        super().__init__()
        self.adaptive_queries = options.adaptive_queries
        self.proxy: Optional[ProxyPath] = None
        self.s3: Optional[FeatureMimicking] = None
        views = build_views(options.views, options.original_view)
        _warn_single_position(taps, views, options)

        def projector_factory(src: Shape, dst: Shape, option: str, query_chs: Optional[int] = None):
            heads = getattr(options, option)
            if options.projector == 'cap' and dst[0] % heads:
                raise OptionError(f'distill.{option}={heads} does not divide the teacher width {dst[0]} that its CAP '
                                  f'projects to: set distill.{option} to a divisor of {dst[0]} '
                                  f'(e.g. {fitting_heads(dst[0], heads)})')
            cap_kwargs = dict(num_heads=heads, softmax_scale=options.softmax_scale,
                              student_norm=taps.projector_norm, query_chs=query_chs, student_conv=options.cap_conv,
                              mlp_ratio=options.cap_mlp_ratio)
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
        targets = {'final': teacher.final_shape[0], **({'stage_input': teacher.stage_input_shape[0]} if self.s3 else {})}
        self.norms = nn.ModuleDict({target: FeatureStandardizer(chs, options.teacher_norm_batches)
                                    for target, chs in targets.items()} if options.teacher_norm == 'standardize' else {})

    def compile_pieces(self, **compile_kwargs) -> None:
        """Compile each piece on its own (``torch.compile`` keyword arguments)."""
        for name in _PIECES:
            setattr(self, name, torch.compile(getattr(self, name), **compile_kwargs))

    def __getstate__(self) -> Dict[str, Any]:
        """A copy or pickle holds the plain pieces: a compiled piece is bound to this module."""
        return {k: v for k, v in self.__dict__.items() if k not in _PIECES}

    def mimicking(self) -> Dict[str, FeatureMimicking]:
        """The feature mimicking at each tap that exists (``proxy`` or ``s3``, and ``s4``)."""
        taps = {'proxy': self.proxy.mimicking if self.proxy is not None else None, 's3': self.s3, 's4': self.s4}
        return {tap: m for tap, m in taps.items() if m is not None}

    def proxy_views(self, s3: torch.Tensor, teacher: TeacherFeatures, last_stage: LastStage) -> Views:
        """TPP's proxy path: s3 projected in each view and run through the teacher's last stage."""
        return self.proxy(s3, last_stage, teacher.prefix)

    def s4_views(self, s4: torch.Tensor, proxy_views: Optional[Views] = None) -> Views:
        """s4 projected in each view; the proxy path's outputs are the CAPs' queries with adaptive queries."""
        return self.s4.project(s4, proxy_views if self.adaptive_queries else None)

    def tap_losses(self, tap: str, views: Views, teacher: TeacherFeatures, prefix: str = '') -> Dict[str, torch.Tensor]:
        """Unweighted losses ``{prefix}{tap}_{view}`` of one tap's projected views against the teacher's
        feature (T_(n-1) for ``s3``, else T_n). With ``teacher_norm`` the target is standardised, and so is
        the proxy path's output, which comes out of the teacher's own last stage in its raw feature space
        (the projectors of ``s3`` / ``s4`` learn to predict the standardised target)."""
        which = 'stage_input' if tap == 's3' else 'final'
        target = getattr(teacher, which)
        if which in self.norms:
            target = self.norms[which](target)
            if tap == 'proxy':
                views = {name: self.norms[which](view) for name, view in views.items()}
        return self.mimicking()[tap].losses(views, target, prefix + tap)

    def project(self, s3: torch.Tensor, s4: torch.Tensor, teacher: TeacherFeatures,
                last_stage: Optional[LastStage]) -> Dict[str, Views]:
        """The student's maps projected at each tap (``proxy`` or ``s3``, and ``s4``) in each view, in
        this teacher's feature space."""
        projected: Dict[str, Views] = {}
        if self.proxy is not None:
            projected['proxy'] = self.proxy_views(s3, teacher, last_stage)
        elif self.s3 is not None:
            projected['s3'] = self.s3.project(s3)
        projected['s4'] = self.s4_views(s4, projected.get('proxy'))
        return projected

    def losses(self, projected: Dict[str, Views], teacher: TeacherFeatures, prefix: str = '') -> Dict[str, torch.Tensor]:
        """Every tap's losses; while training, the standardisation first observes this batch's targets."""
        if self.training:
            for which, norm in self.norms.items():
                norm.observe(getattr(teacher, which))
        losses: Dict[str, torch.Tensor] = {}
        for tap, views in projected.items():
            losses.update(self.tap_losses(tap, views, teacher, prefix))
        return losses


class DistillationModule(nn.Module):
    """The trainable part: the student and each teacher's :class:`TeacherBranch`, nothing else.

    ``forward(images, teacher_features, last_stages)`` (both mappings by teacher name) returns (student
    logits, unweighted feature losses). The teachers' last stages are passed in, never registered here,
    so the module's parameters and state dict hold no teacher weight. Loss terms are ``{tap}_{view}``
    with one teacher and ``{name}/{tap}_{view}`` with several.
    """

    def __init__(self, student: nn.Module, taps: Union[StudentAdapter, LogitsOnly],
                 branches: Optional[Dict[str, TeacherBranch]] = None):
        super().__init__()
        self.student = student
        self.taps = taps
        self.branches = nn.ModuleDict(branches or {})

    def compile_pieces(self, **compile_kwargs) -> None:
        """Compile the student pass and each piece of every branch on its own (``torch.compile`` keyword
        arguments), so that a compiled step and each piece timed alone (``scalekd bench --compile``) run
        the same code."""
        self.student_pass = torch.compile(self.student_pass, **compile_kwargs)
        for branch in self.branches.values():
            branch.compile_pieces(**compile_kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        """A copy or pickle holds the plain student pass: a compiled one is bound to this module."""
        return {k: v for k, v in self.__dict__.items() if k != 'student_pass'}

    def prefix(self, name: str) -> str:
        """The loss-term prefix of the teacher ``name``: none with one teacher, ``{name}/`` with several."""
        return f'{name}/' if len(self.branches) > 1 else ''

    def no_weight_decay(self) -> Set[str]:
        """Student names timm exempts from weight decay, plus the projectors' embeddings."""
        student = unwrap_model(self.student)
        names = {f'student.{n}' for n in getattr(student, 'no_weight_decay', set)()}
        return names | {n for n, _ in self.named_parameters() if n.endswith(('pos_embed', 'query_embed'))}

    def student_pass(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student forward: (logits, s3 map, s4 map)."""
        return self.taps(self.student, x)

    def project(self, x: torch.Tensor, teachers: Optional[Dict[str, TeacherFeatures]] = None,
                last_stages: Optional[Dict[str, LastStage]] = None) -> Tuple[torch.Tensor, Dict[str, Dict[str, Views]]]:
        """Student logits, and per teacher the student features projected at each tap in each view."""
        logits, s3, s4 = self.student_pass(x)
        last_stages = last_stages or {}
        return logits, {name: branch.project(s3, s4, teachers[name], last_stages.get(name))
                        for name, branch in self.branches.items()}

    def forward(self, x: torch.Tensor, teachers: Optional[Dict[str, TeacherFeatures]] = None,
                last_stages: Optional[Dict[str, LastStage]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits, projected = self.project(x, teachers, last_stages)
        losses: Dict[str, torch.Tensor] = {}
        for name, views in projected.items():
            losses.update(self.branches[name].losses(views, teachers[name], self.prefix(name)))
        return logits, losses


def teaches_logits(options: DistillOptions, kd: Optional[bool]) -> bool:
    """Whether a teacher whose own ``kd`` is ``kd`` (null: the options') teaches through its logits."""
    return options.kd if kd is None else kd


def needs_teachers(options: DistillOptions, kds: Sequence[Optional[bool]] = ()) -> bool:
    """Whether a distiller of these (resolved) options, with teachers of these own ``kd``, uses its teachers:
    never for ``method='none'``, else for features or for logit KD."""
    return options.method != 'none' and (options.kd or options.uses_features or any(kds))


def check_teachers(entries: Sequence[Any]) -> None:
    """Each teacher (a :class:`Teacher`, or a spec with a ``name`` and a ``weight``) named once, each weight a
    finite number >= 0."""
    names = [t.name for t in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionError(f'teacher name {", ".join(map(repr, twice))} is given to more than one teacher: each '
                          f'teacher needs its own name (its loss terms are {twice[0]}/s4_ori, ...)')
    bad = [t.name for t in entries if not isinstance(t.weight, (int, float)) or not math.isfinite(t.weight)
           or t.weight < 0]
    if bad:
        raise OptionError(f'teacher {bad[0]!r}: weight must be a finite number >= 0')


def _migrated_task_state(given: Dict[str, Any], branches: Sequence[str]) -> Dict[str, Any]:
    """A one-teacher task state of the layout before several teachers (``proxy.*``, ``s3.*``, ``s4.*`` at
    the top) under the one branch's name; any other state unchanged."""
    if len(branches) != 1 or not given or any(k.startswith('branches.') for k in given):
        return given
    return {f'branches.{branches[0]}.{k}': v for k, v in given.items()}


class Distiller(TrainingTask):
    """ScaleKD (and its baselines) as a timm training task, with one teacher or several.

    Args:
        student: the timm student (trained from scratch; its state dict stays plain timm).
        teacher: the frozen teacher, or several as :class:`Teacher` entries (distinct names), or ``None``
            for ``method='none'``.
        options: the distillation options (resolved here).
        img_size: (H, W) the student trains at.
        in_chans: input channels.
        criterion: the task loss (default: timm's classification loss, cross entropy).
        input_mean, input_std: the normalisation of the images given to ``forward`` (default: the
            student's pretrained cfg); each teacher gets them re-normalised to its own.
        teacher_dtype: the teachers' own autocast dtype (``torch.bfloat16`` for an fp32 student on
            hardware with fast bf16; ``torch.float32`` keeps them out of the run's autocast); their features
            are handed on in float32. Default: the run's autocast, whatever it is. A teacher's last stage on
            the student's maps (TPP) is part of the trainable graph and keeps the run's.

    Several teachers: each has its own branch of projectors (:class:`TeacherBranch`) and sees the images
    at its own ``img_size``; its feature terms weigh ``w_ori`` / ``w_alt`` times its ``weight``. Logit KD
    learns from the teachers whose ``kd`` is on: the target is the mean of their softened distributions
    ``softmax(z_t / T)``, each weighted by its teacher's ``weight`` (normalised to sum 1).
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: Union[FrozenTeacher, Sequence[Teacher], None],
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
        entries = [Teacher(teacher)] if isinstance(teacher, FrozenTeacher) else list(teacher or [])
        self.needs_teacher = needs_teachers(self.options, [t.kd for t in entries])
        if self.needs_teacher and not entries:
            raise OptionError(f'method {self.options.method!r} needs a teacher')
        entries = entries if self.needs_teacher else []
        check_teachers(entries)
        self.teachers = nn.ModuleDict({t.name: t.adapter for t in entries})
        self.entries: Dict[str, Teacher] = {t.name: t for t in entries}
        self.kd_teachers = [t.name for t in entries if teaches_logits(self.options, t.kd)]
        if self.kd_teachers and not sum(self.entries[n].weight for n in self.kd_teachers) > 0:
            raise OptionError(f'the teachers whose logits teach ({", ".join(self.kd_teachers)}) all have weight 0: '
                              f'give one a weight > 0, or turn their kd off')
        self.teacher_dtype = teacher_dtype
        taps = StudentAdapter(student, img_size, in_chans, self.options.student_s3_block) \
            if self.options.uses_features else LogitsOnly(student, img_size, in_chans)  # none / kd: any classifier
        branches = {t.name: TeacherBranch(taps, self.options.for_teacher(t.tpp), t.adapter)
                    for t in entries if self.options.uses_features}
        self.trainable_module = DistillationModule(student, taps, branches)
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
    def teacher(self) -> Optional[FrozenTeacher]:
        """The first (with one teacher: the) teacher, ``None`` without one."""
        return next(iter(self.teachers.values()), None)

    @property
    def kd(self) -> bool:
        """Whether logit KD is a term (a teacher's logits teach)."""
        return bool(self.kd_teachers)

    @property
    def taps(self) -> Union[StudentAdapter, LogitsOnly]:
        return unwrap_model(self.trainable_module).taps

    def branches(self) -> Dict[str, TeacherBranch]:
        """Each feature teacher's branch of projectors, by teacher name."""
        return dict(unwrap_model(self.trainable_module).branches)

    def distill_modules(self) -> nn.Module:
        """The trainable module without the student: what ScaleKD adds only for training."""
        return unwrap_model(self.trainable_module).branches

    def last_stages(self) -> Dict[str, LastStage]:
        """The last stage of each teacher whose branch runs a proxy path (TPP)."""
        return {name: self.teachers[name].last_stage for name, branch in self.branches().items()
                if branch.proxy is not None}

    def loss_weights(self, names: Collection[str]) -> Dict[str, float]:
        """The weight of each named loss term in the total; an unknown name is a ``ValueError``."""
        opts = self.options
        weights = {'task_loss': 1.0 - opts.kd_weight if self.kd else 1.0, 'kd_loss': opts.kd_weight}
        module = unwrap_model(self.trainable_module)
        for name, branch in module.branches.items():
            scale = self.entries[name].weight
            for tap, mimicking in branch.mimicking().items():
                weights.update({f'{module.prefix(name)}{tap}_{v.name}': (opts.w_ori if v.name == 'ori' else opts.w_alt)
                                * scale for v in mimicking.views})
        for name in names:
            if name not in weights:
                raise ValueError(f'unknown loss term {name!r}; known terms: {", ".join(weights)}')
        return {n: weights[n] for n in names}

    def train(self, mode: bool = True) -> 'Distiller':
        """Train mode for the trainable module; the teachers stay in eval mode unless
        ``teacher_train_mode`` asks for the release's (accidental) train-mode teacher."""
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.train(mode and self.options.teacher_train_mode)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """timm's ``TrainingTask.compile`` (call it before :meth:`prepare_distributed`): the trainable
        module's pieces (student pass; each branch's proxy path, s4 projection, losses) and each teacher's
        feature extraction and last stage; the weights and state-dict keys stay those of the plain modules.
        Returns the trainable module, whose :meth:`DistillationModule.forward` runs the compiled pieces."""
        module = unwrap_model(self.trainable_module)
        module.compile_pieces(backend=backend, mode=mode, **compile_kwargs)
        for teacher in self.teachers.values():
            teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return module

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'Distiller':
        """Wrap the trainable module (student + projectors) in DDP; the frozen teachers are not wrapped."""
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
        """Load :meth:`get_task_state`'s state (a one-teacher state of the layout before several teachers
        goes to the one branch)."""
        if not state:
            return
        module = unwrap_model(module if module is not None else self.get_trainable_module(ema=ema))
        own = {k for k in module.state_dict() if not k.startswith('student.')}
        given = _migrated_task_state(state.get('distill', {}), list(module.branches))
        if strict and set(given) != own:
            missing, unexpected = sorted(own - set(given)), sorted(set(given) - own)
            raise TaskStateMismatchError(f'distillation state does not match (a checkpoint from another '
                                         f'configuration?): missing {missing}, unexpected {unexpected}')
        module.load_state_dict(given, strict=False)

    def teacher_input(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """The distiller's ``images`` as the teacher ``name`` takes them: resized to its ``img_size``
        (antialiased, with its own interpolation) and re-normalised to its own statistics."""
        teacher, size = self.teachers[name], self.entries[name].img_size
        if size is not None and tuple(size) != tuple(images.shape[-2:]):
            mode = (getattr(teacher.model, 'pretrained_cfg', None) or {}).get('interpolation', 'bicubic')
            mode = mode if mode in ('bilinear', 'bicubic') else 'bilinear'
            images = F.interpolate(images, size=tuple(size), mode=mode, align_corners=False, antialias=True)
        return teacher.normalize_input(images, self.student_mean, self.student_std)

    def teacher_features(self, images: torch.Tensor) -> Dict[str, TeacherFeatures]:
        """Each teacher's no-grad forward on the distiller's ``images`` (one after the other), by name."""
        return {name: self.teacher_forward(name, images) for name in self.teachers}

    def teacher_forward(self, name: str, images: torch.Tensor) -> TeacherFeatures:
        """The no-grad forward of the teacher ``name`` on the distiller's ``images`` (:meth:`teacher_input`),
        in ``teacher_dtype``; its features in float32 when it has a dtype of its own."""
        teacher, images = self.teachers[name], self.teacher_input(name, images)
        if self.teacher_dtype is None:
            return teacher.extract(images)
        dtype = self.teacher_dtype
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = teacher.extract(images)
        floats = {f.name: getattr(features, f.name).float() for f in dataclasses.fields(features)
                  if getattr(features, f.name) is not None}
        return dataclasses.replace(features, **floats)

    def kd_target(self, teachers: Dict[str, TeacherFeatures], dtype: torch.dtype) -> torch.Tensor:
        """The soft target of logit KD: the softened distributions of the teachers whose logits teach,
        averaged with their weights (one teacher: its own)."""
        if len(self.kd_teachers) == 1:
            return F.softmax(teachers[self.kd_teachers[0]].logits.to(dtype) / self.options.kd_temperature, dim=-1)
        total = sum(self.entries[n].weight for n in self.kd_teachers)
        return sum(self.entries[n].weight / total * F.softmax(teachers[n].logits.to(dtype) / self.options.kd_temperature,
                                                             dim=-1) for n in self.kd_teachers)

    def loss_terms(self, logits: Optional[torch.Tensor], features: Dict[str, torch.Tensor],
                   teachers: Dict[str, TeacherFeatures], target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The weighted ``loss`` and every unweighted term: the task loss (with ``target``), the feature
        terms, and logit KD (with ``logits``, when a teacher's logits teach)."""
        terms = {'task_loss': self.criterion(logits, target)} if logits is not None and target is not None else {}
        terms.update(features)
        if self.kd and logits is not None:
            terms['kd_loss'] = soft_target_kd_loss(logits, self.kd_target(teachers, logits.dtype),
                                                   self.options.kd_temperature)
        weights = self.loss_weights(terms)
        return {'loss': sum(weights[n] * v for n, v in terms.items()), **terms}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One forward (training, or in eval mode on held-out images): ``loss`` (weighted total), ``output``
        (student logits) and each term."""
        teachers = self.teacher_features(input)
        # in eval mode the plain module: DDP's forward syncs buffers, a collective that a rank with fewer
        # validation batches than another would leave unmatched
        module = self.trainable_module if self.training else unwrap_model(self.trainable_module)
        try:
            logits, features = module(input, teachers, self.last_stages())
        except ValueError as e:
            if 'Expected more than 1 value per channel' not in str(e):
                raise
            raise UserError(f'a BatchNorm layer of the student or its projectors got one value per channel: '
                            f'{input.shape[0]} image(s) per step and process with a 1x1 map. Train with more '
                            f'images per process (train.batch_size / processes / accum_steps) or with a larger '
                            f'map (data.img_size, or a lower student output_stride)') from None
        terms = self.loss_terms(logits, features, teachers, target)
        return {'loss': terms.pop('loss'), 'output': logits, **terms}
