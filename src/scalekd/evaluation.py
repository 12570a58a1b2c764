"""``scalekd eval``: top-1 / top-5 of a checkpoint or exported student on an ImageNet-style folder."""
from pathlib import Path
from typing import Dict, Union

import torch
from timm.data import ImageDataset, create_transform
from torch.utils.data import DataLoader

from .data import DataError, class_folders
from .distributed import DistEnv
from .engine import evaluate
from .export import load_student

__all__ = ['evaluate_path']


def evaluate_path(checkpoint: Union[str, Path], data_dir: Union[str, Path], batch_size: int = 64,
                  workers: int = 4, device: str = 'cpu') -> Dict[str, float]:
    """Evaluate the student in ``checkpoint`` on ``data_dir`` (one sub-folder per class, sorted as in training)."""
    model, data_config = load_student(checkpoint)
    data_dir = Path(data_dir)
    classes = class_folders(data_dir)
    if len(classes) != model.num_classes:
        raise DataError(f'{data_dir} has {len(classes)} classes but the student predicts {model.num_classes}')
    in_chans = data_config['input_size'][0]
    transform = create_transform(data_config['input_size'], is_training=False,
                                 interpolation=data_config.get('interpolation', 'bicubic'),
                                 crop_pct=data_config.get('crop_pct', 0.875),
                                 mean=data_config['mean'], std=data_config['std'])
    dataset = ImageDataset(str(data_dir), class_map={c: i for i, c in enumerate(classes)}, transform=transform,
                           input_img_mode='L' if in_chans == 1 else 'RGB')
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    env = DistEnv(device=torch.device(device))
    return evaluate(model.to(env.device), loader, env, 'fp32')
