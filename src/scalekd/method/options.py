"""Distillation options: the method, its component switches and loss weights, validated.

``method`` picks defaults; every switch can be set on its own to reach the paper's
ablations (Tables 1, 9, 13, 17, Fig. 4):

============  =========  ======  =====  ===  ================  ==
method        projector  stages  views  tpp  adaptive_queries  kd
============  =========  ======  =====  ===  ================  ==
``none``      -          -       -      -    -                 no
``kd``        -          -       -      -    -                 yes
``fd``        linear     s4      single no   no                no
``scalekd``   cap        s3, s4  dfm    yes  yes               yes
============  =========  ======  =====  ===  ================  ==

Loss weights: ``w_ori`` / ``w_alt`` (release: 0.08 / 0.06) or the paper's ``alpha`` / ``beta``
(``w_ori = alpha * beta``, ``w_alt = alpha * (1 - beta)``), not both.

:data:`ABLATIONS` names the component ablation (Tables 9, 15b) as option presets: the student alone,
KD, FD, FD+KD, CAP, CAP+DFM, CAP+TPP, CAP+DFM+TPP and full ScaleKD (CAP+DFM+TPP+KD).
"""
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

from .errors import OptionError
from .projectors import PROJECTORS
from .teacher_norm import TEACHER_NORMS
from .views import ORIGINAL_VIEWS, VIEW_MODES

__all__ = ['DistillOptions', 'METHODS', 'FEATURE_METHODS', 'ABLATIONS', 'ablation']

METHODS = ('none', 'kd', 'fd', 'scalekd')
FEATURE_METHODS = ('fd', 'scalekd')
STAGES = ('s3', 's4')

_PRESETS: Dict[str, Dict[str, Any]] = {
    'none': dict(kd=False),
    'kd': dict(kd=True),
    'fd': dict(projector='linear', stages=('s4',), views='single', tpp=False, adaptive_queries=False, kd=False),
    'scalekd': dict(projector='cap', stages=STAGES, views='dfm', tpp=True, adaptive_queries=True, kd=True),
}
_FEATURE_SWITCHES = ('projector', 'stages', 'views', 'tpp', 'adaptive_queries')

# ablation name -> the options that make it; what a preset leaves unset is the method's default
ABLATIONS: Dict[str, Dict[str, Any]] = {
    'student': dict(method='none'),
    'kd': dict(method='kd'),
    'fd': dict(method='fd'),
    'fd_kd': dict(method='fd', kd=True),
    'cap': dict(views='single', tpp=False, adaptive_queries=False, kd=False, stages=('s4',)),
    'cap_dfm': dict(tpp=False, adaptive_queries=False, kd=False, stages=('s4',)),
    'cap_tpp': dict(views='single', kd=False),
    'cap_dfm_tpp': dict(kd=False),
    'scalekd': dict(),
}


def ablation(name: str) -> Dict[str, Any]:
    """The options of the ablation preset ``name`` (a copy: add to it or override it freely)."""
    if name not in ABLATIONS:
        raise OptionError(f'unknown ablation {name!r}; choose one of {", ".join(ABLATIONS)}')
    return dict(ABLATIONS[name])


@dataclass(frozen=True)
class DistillOptions:
    """Every option of a distiller; ``None`` means "the method's default" until :meth:`resolve`.

    Attributes:
        method: ``none`` (student alone), ``kd`` (logit KD), ``fd`` (feature distillation: a linear
            projector on s4) or ``scalekd``; it sets the defaults of the switches below.
        projector: ``cap`` (cross attention projector), ``linear`` or ``conv`` (Table 9b); null:
            the method's (``cap`` for scalekd, ``linear`` for fd).
        stages: the student taps distilled, ``[s4]`` or ``[s3, s4]``; null: the method's.
        views: ``single`` (one CAP), ``dual`` (two CAPs, no phi) or ``dfm`` (dual-view feature
            mimicking); null: the method's.
        original_view: ``all`` (the original view keeps every feature) or ``dc`` (their mean only:
            "Dir + Alt", Table 17).
        tpp: teacher parameter perception: s3 projected and run through the teacher's last stage
            (the proxy path); null: the method's.
        adaptive_queries: the proxy path's outputs are the s4 CAPs' queries (needs ``tpp``); null:
            the method's.
        kd: logit KD (needs a teacher that predicts the student's classes); null: the method's.
        w_ori: weight of every original-view feature term (null: 0.08, or ``alpha * beta``).
        w_alt: weight of every alternative-view feature term (null: 0.06, or ``alpha * (1 - beta)``).
        alpha: the paper's feature-loss weight, given with ``beta`` instead of ``w_ori`` / ``w_alt``
            (null: 1 when ``beta`` is given).
        beta: the paper's balance of the two views, ``w_ori = alpha * beta``, ``w_alt = alpha * (1 -
            beta)`` (null: 0.6 when ``alpha`` is given).
        kd_weight: KD weight a; the task loss weighs ``1 - a`` with KD.
        kd_temperature: KD temperature T.
        s3_heads: CAP attention heads at s3; must divide the teacher's width there.
        s4_heads: CAP attention heads at s4; must divide the teacher's final width.
        softmax_scale: extra temperature multiplying the CAP's attention logits.
        cap_conv: ``full`` (the CAP's C x C 3x3 convolution) or ``separable`` (depthwise 3x3 then
            1x1: cheaper, beyond the paper).
        cap_mlp_ratio: the CAP's FFN hidden width as a multiple of the teacher's width (the release:
            4); smaller gives a lighter CAP, beyond the paper. Like ``cap_conv``, it shapes the CAP
            only (the linear and conv projectors have neither).
        activation_checkpointing: recompute the projectors and the teacher stage in backward (less
            memory, more time).
        projector_lr_scale: the projectors' learning rate as a multiple of ``optim.lr`` (timm's
            ``lr_scale`` of their parameter groups, followed by its schedulers); 1: the release's one
            learning rate for the student and the projectors.
        student_s3_block: plain students (ViT, Mixer): the 1-based block whose output is s3 (null:
            three quarters deep).
        teacher_last_blocks: plain-ViT teachers: the blocks of the last stage (null: depth / 4).
        teacher_train_mode: the release's train-mode teacher (stochastic depth on); default: eval mode.
        teacher_norm: ``none``, or ``standardize``: each teacher's feature targets standardised per
            channel, with statistics estimated from the first ``teacher_norm_batches`` training batches and
            then frozen (for several teachers whose channels differ in scale; see
            :mod:`scalekd.method.teacher_norm`).
        teacher_norm_batches: training batches the ``standardize`` statistics are estimated from.
    """
    method: str = 'scalekd'
    # components
    projector: Optional[str] = None
    stages: Optional[Tuple[str, ...]] = None
    views: Optional[str] = None
    original_view: str = 'all'
    tpp: Optional[bool] = None
    adaptive_queries: Optional[bool] = None
    kd: Optional[bool] = None
    # loss weights
    w_ori: Optional[float] = None
    w_alt: Optional[float] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    # projector shape
    s3_heads: int = 8
    s4_heads: int = 8
    softmax_scale: float = 5.0
    cap_conv: str = 'full'
    cap_mlp_ratio: float = 4.0
    activation_checkpointing: bool = False
    projector_lr_scale: float = 1.0
    # taps
    student_s3_block: Optional[int] = None
    teacher_last_blocks: Optional[int] = None
    teacher_train_mode: bool = False
    # several teachers
    teacher_norm: str = 'none'
    teacher_norm_batches: int = 20

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> 'DistillOptions':
        """Build from keyword options; an unknown name is an error that lists the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionError(f'unknown distillation option(s) {", ".join(unknown)}; valid options: {", ".join(sorted(names))}')
        if isinstance(kwargs.get('stages'), (list, str)):
            stages = kwargs['stages']
            kwargs['stages'] = (stages,) if isinstance(stages, str) else tuple(stages)
        return cls(**kwargs)

    def resolve(self) -> 'DistillOptions':
        """Fill every ``None`` from the method's preset and check the combination."""
        if self.method not in METHODS:
            raise OptionError(f'unknown method {self.method!r}; choose one of {", ".join(METHODS)}')
        preset = _PRESETS[self.method]
        if self.method not in FEATURE_METHODS:
            set_switches = [k for k in _FEATURE_SWITCHES if getattr(self, k) is not None]
            if set_switches:
                raise OptionError(f'option(s) {", ".join(set_switches)} need a feature method (fd or scalekd), '
                                  f'not method {self.method!r}')
        values = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in preset.items()}
        w_ori, w_alt = self._weights()
        opts = dataclasses.replace(self, **values, w_ori=w_ori, w_alt=w_alt, alpha=None, beta=None)
        opts._check()
        return opts

    def for_teacher(self, tpp: Optional[bool]) -> 'DistillOptions':
        """These (resolved) options for one teacher with its own ``tpp`` (null: these options'): without it
        the teacher's s3 is mimicked directly and the adaptive queries (the proxy path's outputs) go too."""
        if tpp is None or not self.uses_features or tpp == self.tpp:
            return self
        opts = dataclasses.replace(self, tpp=tpp, adaptive_queries=self.adaptive_queries and tpp)
        opts._check()
        return opts

    def switches(self) -> Dict[str, Any]:
        """The method and its resolved component switches (``method``, ``projector``, ``stages``, ``views``,
        ``tpp``, ``adaptive_queries``, ``kd``), in that order: what tells one ablation from another."""
        opts = self.resolve()
        return {'method': opts.method, **{k: getattr(opts, k) for k in _FEATURE_SWITCHES}, 'kd': opts.kd}

    @property
    def uses_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def _weights(self) -> Tuple[float, float]:
        negative = [f'{k}={getattr(self, k)}' for k in ('w_ori', 'w_alt', 'alpha') if (getattr(self, k) or 0) < 0]
        if negative:
            raise OptionError(f'loss weights must be >= 0 (a negative one pushes the student away from its target), '
                              f'got {", ".join(negative)}')
        if self.alpha is not None or self.beta is not None:
            if self.w_ori is not None or self.w_alt is not None:
                raise OptionError('give the DFM weights as (w_ori, w_alt) or as (alpha, beta), not both')
            alpha = 1.0 if self.alpha is None else self.alpha
            beta = 0.6 if self.beta is None else self.beta
            if not 0.0 <= beta <= 1.0:
                raise OptionError(f'beta must be in [0, 1], got {beta}')
            return alpha * beta, alpha * (1.0 - beta)
        return (0.08 if self.w_ori is None else self.w_ori), (0.06 if self.w_alt is None else self.w_alt)

    def _check(self) -> None:
        if not 0.0 <= self.kd_weight <= 1.0:
            raise OptionError(f'kd_weight must be in [0, 1], got {self.kd_weight}')
        if self.kd_temperature <= 0:
            raise OptionError(f'kd_temperature must be > 0, got {self.kd_temperature}')
        if self.teacher_norm not in TEACHER_NORMS:
            raise OptionError(f'unknown teacher_norm {self.teacher_norm!r}; choose one of {", ".join(TEACHER_NORMS)}')
        if self.teacher_norm_batches < 1:
            raise OptionError(f'teacher_norm_batches must be >= 1, got {self.teacher_norm_batches}')
        if self.projector_lr_scale <= 0:
            raise OptionError(f'projector_lr_scale must be > 0, got {self.projector_lr_scale}')
        if not self.uses_features:
            if self.projector_lr_scale != 1:
                raise OptionError(f'projector_lr_scale needs a feature method (fd or scalekd): method '
                                  f'{self.method!r} has no projectors')
            return
        if self.projector not in PROJECTORS:
            raise OptionError(f'unknown projector {self.projector!r}; choose one of {", ".join(PROJECTORS)}')
        if self.views not in VIEW_MODES:
            raise OptionError(f'unknown views {self.views!r}; choose one of {", ".join(VIEW_MODES)}')
        if self.original_view not in ORIGINAL_VIEWS:
            raise OptionError(f'unknown original_view {self.original_view!r}; choose one of {", ".join(ORIGINAL_VIEWS)}')
        bad = [s for s in self.stages if s not in STAGES] if self.stages else ['(none)']
        if bad or len(set(self.stages)) != len(self.stages):
            raise OptionError(f'stages must be s4 or s3 and s4, got {self.stages}')
        if 's4' not in self.stages:
            raise OptionError(f'stages must include s4, got {self.stages}')
        if self.tpp and tuple(sorted(self.stages)) != STAGES:
            raise OptionError('tpp uses both s3 (proxy path) and s4 (original path): set stages to [s3, s4]')
        if self.adaptive_queries and not self.tpp:
            raise OptionError('adaptive_queries come from the TPP proxy path: they need tpp')
        if self.cap_conv not in ('full', 'separable'):
            raise OptionError(f"cap_conv must be 'full' or 'separable', got {self.cap_conv!r}")
        if self.cap_mlp_ratio <= 0:
            raise OptionError(f'cap_mlp_ratio must be > 0 (the FFN needs a hidden layer), got {self.cap_mlp_ratio}')
        if self.adaptive_queries and self.projector != 'cap':
            raise OptionError(f'adaptive_queries need the cap projector, not {self.projector!r}')
