"""How a teacher's last stage is read and replayed: the two rules of :class:`~scalekd.adapters.ScaleKDTeacher`.

- :class:`TokenStage` (plain ViT / DeiT / BEiT / EVA): the last ``last_blocks`` blocks plus the final
  norm, run on the patch tokens with the image's own prefix tokens re-attached and with the extra block
  inputs (rotary embeddings, shared relative position bias) of the latest forward.
- :class:`ModuleStage` (any other timm model): the module ``feature_info`` names last (``layers.3``,
  ``stages.3``, ``layer4``, ``blocks.6``) followed by the modules ``forward_features`` runs after it
  (found by tracing one forward: ``norm``, ``conv_head`` + ``bn2``, ...), on NCHW or NHWC maps.

Neither rule is trusted: the teacher replays its last stage on the recorded input at build time and
refuses a model whose replay differs from its own final feature.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.nn as nn

from ..method.errors import OptionError
from .common import (UnsupportedModelError, attach_prefix, map_layout, map_to_tokens, model_label, to_nchw,
                     tokens_to_map)

T = TypeVar('T')

__all__ = ['TokenStage', 'ModuleStage', 'StageFeatures', 'Recorder', 'stage_not_run']

# (final feature the head takes, final map (N, C, H, W), last stage input map, prefix tokens or None)
StageFeatures = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def stage_not_run(label: str, stage: str) -> UnsupportedModelError:
    """The refusal of a model whose ``forward_features`` never runs the module taken as its last stage."""
    return UnsupportedModelError(f'{label}: forward_features does not run its last stage ({stage})')


class Recorder:
    """The positional inputs and the output of one module during :meth:`run` (its hooks stay silent
    otherwise)."""

    def __init__(self, module: nn.Module):
        self.args: Optional[tuple] = None
        self.output: Any = None
        self._on = False
        module.register_forward_pre_hook(self._keep_args)
        module.register_forward_hook(self._keep_output)

    def _keep_args(self, module: nn.Module, args: tuple) -> None:
        if self._on:
            self.args = args

    def _keep_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._on:
            self.output = output

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, recording the module's inputs and output."""
        self._on = True
        try:
            return fn(*args)
        finally:
            self._on = False

    def forget(self) -> None:
        self.args = self.output = None


class TokenStage:
    """The last ``last_blocks`` blocks of a plain token model (default depth / 4) and its final norm."""

    def __init__(self, model: nn.Module, last_blocks: Optional[int] = None):
        self.label = model_label(model)
        depth = len(model.blocks)
        last_blocks = last_blocks if last_blocks is not None else max(1, depth // 4)
        if not 1 <= last_blocks < depth:
            raise OptionError(f'teacher_last_blocks must be in [1, {depth - 1}] for {self.label}, got {last_blocks}')
        self.stage_start = depth - last_blocks
        self.num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        # avg-pool models (BEiT, EVA) keep their final norm in the head as fc_norm
        fc_norm = getattr(model, 'fc_norm', None)
        self.patch_norm = fc_norm if isinstance(model.norm, nn.Identity) and fc_norm is not None else nn.Identity()
        self._stage_kwargs: Dict[int, Dict[str, Any]] = {}
        for i, blk in enumerate(model.blocks[self.stage_start:]):
            blk.register_forward_pre_hook(partial(self._record_block_inputs, i), with_kwargs=True)

    def _record_block_inputs(self, i: int, block: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook of last-stage block ``i``: keep the extra inputs timm gives it (rotary
        embedding, shared relative position bias, ...) for :meth:`replay`."""
        if len(args) > 1:
            raise UnsupportedModelError(f'{self.label}: its blocks take extra positional inputs, which the '
                                        f'last-stage adapter cannot replay')
        self._stage_kwargs[i] = kwargs

    def forget(self) -> None:
        """Drop the recorded block inputs (recorded at the build's weights: replay waits for a real forward)."""
        self._stage_kwargs.clear()

    def _block_kwargs(self, i: int) -> Dict[str, Any]:
        if i not in self._stage_kwargs:
            raise RuntimeError(f'{self.label} last stage replays the block inputs of the latest teacher forward: '
                               f'call extract() first')
        return self._stage_kwargs[i]

    def features(self, model: nn.Module, x: torch.Tensor) -> StageFeatures:
        """One forward: (final feature, final map, last-stage input map, prefix tokens)."""
        p = self.num_prefix_tokens
        prefix_kwargs = dict(return_prefix_tokens=True) if p else {}  # Mixer / gMLP take no such argument
        final, (inter,) = model.forward_intermediates(
            x, indices=[self.stage_start - 1], norm=False, output_fmt='NCHW', **prefix_kwargs)
        stage_input, prefix = inter if p > 0 else (inter, None)
        final_map = tokens_to_map(self.patch_norm(final[:, p:]), tuple(stage_input.shape[-2:]))
        return final, final_map, stage_input, prefix

    def replay(self, model: nn.Module, x: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """The last blocks and norms on an (N, C, H, W) map, with ``prefix`` re-attached."""
        p = self.num_prefix_tokens
        tokens = attach_prefix(map_to_tokens(x), prefix, p, self.label)
        for i, blk in enumerate(model.blocks[self.stage_start:]):
            tokens = blk(tokens, **self._block_kwargs(i))
        tokens = self.patch_norm(model.norm(tokens)[:, p:])
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[-2:])


def _from_nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.permute(0, 2, 3, 1) if layout == 'NHWC' else t


def _layout(t: torch.Tensor, grid: Tuple[int, int], what: str, label: str) -> str:
    """:func:`~scalekd.adapters.common.map_layout` of ``t``, or an error naming ``what`` is not a map."""
    layout = map_layout(t, grid)
    if layout is None:
        raise UnsupportedModelError(f'{label}: its {what} is not a map at the last stage\'s {grid[0]}x{grid[1]} '
                                    f'resolution (shape {tuple(t.shape[1:])}), so the last-stage adapter cannot '
                                    f'read it')
    return layout


class ModuleStage:
    """The module ``feature_info`` names last, and what ``forward_features`` runs after it."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.label = model_label(model)
        info = getattr(model, 'feature_info', None)
        if not info or not hasattr(model, 'forward_intermediates'):
            raise UnsupportedModelError(f'{self.label} cannot be a ScaleKD teacher: it has no feature_info / '
                                        f'forward_intermediates() to find its last stage')
        self.stage_name: str = info[-1]['module']
        try:
            stage = model.get_submodule(self.stage_name)
        except AttributeError:
            raise UnsupportedModelError(f'{self.label}: its feature_info names {self.stage_name!r} as the last stage, '
                                        f'which is not one of its modules') from None
        self.recorder = Recorder(stage)
        (last_map,) = model.forward_intermediates(x, indices=1, norm=False, output_fmt='NCHW',
                                                  intermediates_only=True)
        grid = tuple(last_map.shape[-2:])
        final, self.tail = self._trace(model, x)
        self._stage_input()
        out = self.recorder.output
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(f'{self.label}: its last stage ({self.stage_name}) returns '
                                        f'{type(out).__name__}, not a feature map')
        self.stage_layout = _layout(out, grid, f'last stage ({self.stage_name}) output', self.label)
        self.final_layout = _layout(final, grid, 'final feature', self.label)
        self.recorder.forget()

    def _stage_input(self) -> torch.Tensor:
        """The last stage's input in the latest recorded forward."""
        args = self.recorder.args
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise UnsupportedModelError(f'{self.label}: its last stage ({self.stage_name}) takes extra positional '
                                        f'inputs, which the last-stage adapter cannot replay')
        return args[0]

    def _trace(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[str]]:
        """One recorded ``forward_features``: its output, and the modules it runs after the last stage, in
        order: the stage's later siblings and those of its containers (``blocks.10``, ``norm``), not the
        containers themselves (``stages``)."""
        order: List[str] = []
        parts = self.stage_name.split('.')
        ancestors = ['.'.join(parts[:i]) for i in range(len(parts))]  # '', 'stages', ... (not the stage)
        watched = [(f'{parent}.{name}' if parent else name, child)
                   for parent in ancestors for name, child in model.get_submodule(parent).named_children()]
        watched = [(name, module) for name, module in watched if name not in ancestors]
        handles = [module.register_forward_hook(lambda *_, name=name: order.append(name)) for name, module in watched]
        try:
            final = self.recorder.run(model.forward_features, x)
        finally:
            for h in handles:
                h.remove()
        if self.recorder.args is None or self.stage_name not in order:
            raise stage_not_run(self.label, self.stage_name)
        last = len(order) - 1 - order[::-1].index(self.stage_name)
        return final, order[last + 1:]

    def forget(self) -> None:
        """Drop the recorded stage input."""
        self.recorder.forget()

    def features(self, model: nn.Module, x: torch.Tensor) -> StageFeatures:
        """One forward: (final feature, final map, last-stage input map, None)."""
        final = self.recorder.run(model.forward_features, x)
        stage_input = self._stage_input()
        self.recorder.forget()
        return final, to_nchw(final, self.final_layout), to_nchw(stage_input, self.stage_layout), None

    def replay(self, model: nn.Module, x: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """The last stage and the modules after it on an (N, C, H, W) map (``prefix`` unused)."""
        y = model.get_submodule(self.stage_name)(_from_nchw(x, self.stage_layout))
        for name in self.tail:
            y = model.get_submodule(name)(y)
        return to_nchw(y, self.final_layout)
