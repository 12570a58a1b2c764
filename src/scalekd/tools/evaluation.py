"""``scalekd eval``: top-1 / top-5 of a checkpoint or exported student on a folder of images."""
from pathlib import Path
from typing import Dict, Union

import torch
from torch.utils.data import DataLoader

from ..engine.inputs.data import CheckedImageDataset, DataError
from ..engine.runtime.distributed import DistEnv
from ..engine.loop.evaluation import evaluate
from .analysis.inputs import image_dataset
from .model_files import load_model

__all__ = ['evaluate_path']


def evaluate_path(checkpoint: Union[str, Path], data_dir: Union[str, Path], batch_size: int = 64,
                  workers: int = 4, device: Union[str, torch.device] = 'cpu',
                  skip_unreadable: bool = False) -> Dict[str, float]:
    """Evaluate the student in ``checkpoint`` on ``data_dir`` (one sub-folder per class, sorted as in
    training, or the Fashion-MNIST IDX files, test split) on ``device``. An unreadable image stops it,
    naming the file; with ``skip_unreadable`` every image is decoded first and the unreadable ones are
    left out (``skipped``: their count)."""
    loaded = load_model(checkpoint)
    model, data_config = loaded.model, loaded.data_config
    dataset, classes = image_dataset(data_dir, data_config)
    if len(classes) != model.num_classes:
        raise DataError(f'{data_dir} has {len(classes)} classes but the student predicts {model.num_classes}')
    skipped = []
    if skip_unreadable and isinstance(dataset, CheckedImageDataset):
        skipped = [f for f, _ in dataset.unreadable()]
        dataset.drop(skipped)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    env = DistEnv(device=torch.device(device))
    return dict(evaluate(model.to(env.device), loader, env, 'fp32'), skipped=len(skipped))
