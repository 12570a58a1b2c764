"""Images and feature maps for the analysis tools."""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset

from ...engine.inputs.data import CheckedImageDataset, class_folders
from ...engine.runtime.devices import model_device
from ...engine.inputs.fashion_mnist import FashionMNIST, has_fashion_mnist

__all__ = ['image_dataset', 'feature_maps']


def image_dataset(data_dir: Union[str, Path], data_config: Dict[str, Any], split: str = 'test',
                  limit: Optional[int] = None) -> Tuple[Dataset, Sequence[str]]:
    """A folder's images through the model's eval transform, and the class names.

    ``data_dir`` holds the Fashion-MNIST IDX files (``split``: ``train`` or ``test``) or one
    sub-folder per class; ``limit`` keeps the first N images (an evenly spaced sample for IDX files).
    """
    data_dir = Path(data_dir)
    in_chans = data_config['input_size'][0]
    transform = create_transform(data_config['input_size'], is_training=False,
                                 interpolation=data_config.get('interpolation', 'bicubic'),
                                 crop_pct=data_config.get('crop_pct', 0.875),
                                 mean=data_config['mean'], std=data_config['std'])
    if has_fashion_mnist(data_dir):
        dataset = FashionMNIST(data_dir, split, transform)
        classes = dataset.classes
    else:
        classes = class_folders(data_dir)
        dataset = CheckedImageDataset(str(data_dir), class_map={c: i for i, c in enumerate(classes)}, transform=transform,
                               input_img_mode='L' if in_chans == 1 else 'RGB')
    if limit is not None and limit < len(dataset):
        step = len(dataset) / limit
        dataset = Subset(dataset, [int(i * step) for i in range(limit)])
    return dataset, classes


@torch.no_grad()
def feature_maps(model: nn.Module, dataset: Dataset, stage: int = -1,
                 batch_size: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (N, C, H, W) feature maps of one stage (``forward_intermediates`` index; -1: the last)
    of every image (on the CPU; the images go to the model's device), and the labels (N,)."""
    model.eval()
    device = model_device(model)
    maps, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        (x,) = model.forward_intermediates(images.to(device), indices=[stage], intermediates_only=True)
        maps.append(x.float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(maps), torch.cat(labels)
