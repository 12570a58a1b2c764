"""Teacher parameter perception (TPP): the proxy path student s1..s(n-1) -> CAP -> teacher's last stage."""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .mimicking import FeatureMimicking

__all__ = ['ProxyPath']

LastStage = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class ProxyPath(nn.Module):
    """Projects s3 onto the teacher's last-stage input (one projector per view) and runs the
    frozen last stage on all views in one batched call. The outputs keep their graph: they
    are compared with the teacher's final feature and serve as the s4 CAPs' queries.
    """

    def __init__(self, mimicking: FeatureMimicking):
        super().__init__()
        self.mimicking = mimicking

    def forward(self, s3: torch.Tensor, last_stage: LastStage, prefix: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        projected = self.mimicking.project(s3)
        names = list(projected)
        outputs = self.mimicking.run(last_stage, torch.cat([projected[n] for n in names]), prefix).chunk(len(names))
        return dict(zip(names, outputs))
