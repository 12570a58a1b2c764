"""Linear probing (the paper's Table 12): a linear classifier on frozen, pooled backbone features."""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ...engine.runtime.devices import model_device
from ...engine.errors import UserError

__all__ = ['pre_logits', 'few_shot_indices', 'fit_linear', 'linear_probe']


@torch.no_grad()
def pre_logits(model: nn.Module, dataset: Dataset, batch_size: int = 200) -> Dict[str, torch.Tensor]:
    """The features a timm model feeds its classifier (``forward_head(pre_logits=True)``; on the CPU, the
    images go to the model's device), and the labels."""
    model.eval()
    device = model_device(model)
    feats, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        feats.append(model.forward_head(model.forward_features(images.to(device)), pre_logits=True).float().cpu())
        labels.append(torch.as_tensor(targets))
    return dict(features=torch.cat(feats), labels=torch.cat(labels))


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """``shots`` examples of every class, drawn by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().flatten()
        if len(where) < shots:
            raise UserError(f'class {c} has {len(where)} training examples, fewer than --shots {shots}')
        picked.append(where[torch.randperm(len(where), generator=generator)[:shots]])
    return torch.cat(picked).sort().values


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
               steps: int = 100) -> nn.Linear:
    """A linear classifier on standardised features: full-batch L-BFGS on cross entropy + L2."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    linear = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=steps, history_size=20,
                                  line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), labels) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        linear.weight.div_(std)
        linear.bias.sub_(linear.weight @ mean)
    return linear


def linear_probe(model: nn.Module, train: Dataset, val: Dataset, num_classes: int, shots: Optional[int] = None,
                 seed: int = 0) -> Dict[str, Any]:
    """Top-1 (percent) on ``val`` of a linear classifier fit on frozen features of ``train``
    (all of it, or ``shots`` images per class)."""
    tr, va = pre_logits(model, train), pre_logits(model, val)
    x, y = tr['features'], tr['labels']
    if shots is not None:
        keep = few_shot_indices(y, shots, seed)
        x, y = x[keep], y[keep]
    linear = fit_linear(x, y, num_classes)
    with torch.no_grad():
        top1 = (linear(va['features']).argmax(-1) == va['labels']).float().mean().item() * 100
    return dict(top1=top1, shots=shots, train_images=len(y), val_images=len(va['labels']), dim=x.shape[1])
