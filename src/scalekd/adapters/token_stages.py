"""Last stages of hierarchical token models that neither general rule reads (overrides of
:class:`~scalekd.adapters.last_stage.ModuleStage`; the teacher's replay check proves them too).

- :class:`UnrolledStage` (Hiera): the blocks of the last stage, on tokens in Hiera's *unrolled* order.
  Hiera reorders its tokens once, after the patch embedding, so that each stage's query pooling is a
  max over the leading token groups; its ``reroll`` restores the raster order of any stage's output.
  The order at the last stage's input is read by rerolling the token indices themselves, so a map
  goes in and comes out without a hand-written permutation.
- :class:`SizedStage` (MViTv2): the last ``stages`` module, which takes and returns
  ``(tokens, feat_size)`` with the class token (if any) in front, then the final norm.

Neither runs a forward of its own when built: the teacher's first :meth:`features` (its build probe)
refuses a model that does not run the stage.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .common import UnsupportedModelError, attach_prefix, map_to_tokens, model_label, tokens_to_map
from .last_stage import Recorder, StageFeatures, stage_not_run

__all__ = ['UnrolledStage', 'SizedStage']

# token grid, unrolled index of each raster position, raster index of each unrolled token
TokenOrder = Tuple[Tuple[int, int], torch.Tensor, torch.Tensor]


class UnrolledStage:
    """Hiera's last stage: blocks ``stage_ends[-2] + 1 .. stage_ends[-1]`` on unrolled tokens."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.label = model_label(model)
        ends = model.stage_ends
        if len(ends) < 2:
            raise UnsupportedModelError(f'{self.label} has one stage: there is no last stage to feed')
        self.first, self.last = ends[-2] + 1, ends[-1]
        self.recorder = Recorder(model.blocks[self.first])
        self._orders: Dict[Tuple[int, torch.device], TokenOrder] = {}

    def _order(self, model: nn.Module, n: int, device: torch.device) -> TokenOrder:
        """The order of ``n`` tokens at the last stage's input, read once by rerolling the indices themselves."""
        if (n, device) not in self._orders:
            raster = model.reroll(torch.arange(n, dtype=torch.float64).view(1, n, 1), self.first - 1)
            if raster.ndim != 4:
                raise UnsupportedModelError(f'{self.label}: its tokens do not reroll to a 2-d map')
            order = raster.flatten().long().to(device)
            self._orders[n, device] = tuple(raster.shape[1:3]), order, torch.argsort(order)
        return self._orders[n, device]

    def forget(self) -> None:
        self.recorder.forget()

    def _final_map(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model.reroll(tokens, self.last).permute(0, 3, 1, 2)

    def features(self, model: nn.Module, x: torch.Tensor) -> StageFeatures:
        """One forward: (final tokens, final map, last-stage input map, None)."""
        final = self.recorder.run(model.forward_features, x)
        if self.recorder.args is None:
            raise stage_not_run(self.label, f'blocks.{self.first}')
        (tokens,) = self.recorder.args
        self.recorder.forget()
        grid, order, _ = self._order(model, tokens.shape[1], tokens.device)
        return final, self._final_map(model, final), tokens_to_map(tokens[:, order], grid), None

    def replay(self, model: nn.Module, x: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """The last stage's blocks on an (N, C, H, W) map put in Hiera's token order (``prefix`` unused)."""
        tokens = map_to_tokens(x)
        tokens = tokens[:, self._order(model, tokens.shape[1], tokens.device)[2]]
        for blk in model.blocks[self.first:self.last + 1]:
            tokens = blk(tokens)
        return self._final_map(model, tokens)


class SizedStage:
    """MViTv2's last stage (``stages[-1]``, called with the token grid's size) and its final norm."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.label = model_label(model)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.stage_name = f'stages.{len(model.stages) - 1}'
        self.recorder = Recorder(model.stages[-1])

    def forget(self) -> None:
        self.recorder.forget()

    def features(self, model: nn.Module, x: torch.Tensor) -> StageFeatures:
        """One forward: (final tokens, final map, last-stage input map, class token at the stage input)."""
        final = self.recorder.run(model.forward_features, x)
        if self.recorder.args is None:
            raise stage_not_run(self.label, self.stage_name)
        (tokens, size), (_, final_size) = self.recorder.args, self.recorder.output
        self.recorder.forget()
        p = self.num_prefix_tokens
        return (final, tokens_to_map(final, tuple(final_size), p), tokens_to_map(tokens, tuple(size), p),
                tokens[:, :p] if p else None)

    def replay(self, model: nn.Module, x: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """The last stage and the final norm on an (N, C, H, W) map, with the class token re-attached."""
        tokens = attach_prefix(map_to_tokens(x), prefix, self.num_prefix_tokens, self.label)
        tokens, size = model.stages[-1](tokens, list(x.shape[-2:]))
        return tokens_to_map(model.norm(tokens), tuple(size), self.num_prefix_tokens)
