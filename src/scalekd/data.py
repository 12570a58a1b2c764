"""Datasets, transforms and loaders: ImageNet-style folders through timm's dataset and transform builders."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from timm.data import ImageDataset, Mixup, create_transform
from timm.data.readers.img_extensions import get_img_extensions

from .config import DataConfig
from .distributed import DistEnv

__all__ = ['DataError', 'Datasets', 'build_datasets', 'build_loaders', 'build_mixup', 'seed_epoch', 'ShardSampler']

DATASETS = ('folder',)


class DataError(ValueError):
    """A dataset that is missing or malformed."""


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: Sequence[str]


def build_transforms(cfg: DataConfig, mean: Tuple[float, ...], std: Tuple[float, ...]):
    """Train and eval transforms of the recipe, from timm's ``create_transform``."""
    train = create_transform(
        cfg.img_size, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
        re_prob=cfg.re_prob, re_mode=cfg.re_mode, mean=mean, std=std)
    val = create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation,
                           crop_pct=cfg.crop_pct, mean=mean, std=std)
    return train, val


def class_folders(split_dir: Path) -> Sequence[str]:
    if not split_dir.is_dir():
        raise DataError(f'data folder {split_dir} does not exist (expected one sub-folder per class)')
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f'data folder {split_dir} has no class sub-folders')
    extensions = get_img_extensions(as_set=True)
    for name in classes:
        if not any(f.suffix.lower() in extensions for f in (split_dir / name).rglob('*')):
            raise DataError(f'class folder {split_dir / name} holds no images')
    return classes


def _folder_datasets(cfg: DataConfig, train_tf, val_tf) -> Datasets:
    root = Path(cfg.root)
    classes = class_folders(root / cfg.train_split)
    val_classes = class_folders(root / cfg.val_split)
    if list(val_classes) != list(classes):
        extra = sorted(set(val_classes) ^ set(classes))
        raise DataError(f'{root / cfg.val_split} and {root / cfg.train_split} have different classes: {extra[:10]}')
    class_map = {c: i for i, c in enumerate(classes)}
    mode = 'L' if cfg.in_chans == 1 else 'RGB'
    train = ImageDataset(str(root / cfg.train_split), class_map=class_map, transform=train_tf, input_img_mode=mode)
    val = ImageDataset(str(root / cfg.val_split), class_map=class_map, transform=val_tf, input_img_mode=mode)
    return Datasets(train, val, classes)


def build_datasets(cfg: DataConfig, mean: Tuple[float, ...], std: Tuple[float, ...], seed: int = 0) -> Datasets:
    """The train / val datasets of a config, checked against ``num_classes``."""
    if cfg.dataset not in DATASETS:
        raise DataError(f'unknown dataset {cfg.dataset!r}; choose one of {", ".join(DATASETS)}')
    train_tf, val_tf = build_transforms(cfg, mean, std)
    data = _folder_datasets(cfg, train_tf, val_tf)
    if len(data.classes) != cfg.num_classes:
        raise DataError(f'{cfg.root} has {len(data.classes)} classes but data.num_classes is {cfg.num_classes}')
    if cfg.train_subset is not None:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(data.train), generator=generator)[:cfg.train_subset].sort().values.tolist()
        data.train = Subset(data.train, keep)
    return data


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard of one rank, in order and without padding, so summed counts are exact."""

    def __init__(self, length: int, env: DistEnv):
        self.indices = list(range(env.rank, length, env.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(data: Datasets, cfg: DataConfig, batch_per_rank: int, env: DistEnv, seed: int):
    """Train loader (shuffled by seed and epoch through ``DistributedSampler.set_epoch``) and eval loader."""
    sampler = DistributedSampler(data.train, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    # workers are re-created each epoch from a generator seeded per epoch (see seed_epoch), so a
    # resumed run draws the same augmentations
    common = dict(num_workers=cfg.workers, pin_memory=env.device.type == 'cuda')
    train = DataLoader(data.train, batch_size=batch_per_rank, sampler=sampler, drop_last=True,
                       generator=torch.Generator(), **common)
    val = DataLoader(data.val, batch_size=batch_per_rank, sampler=ShardSampler(len(data.val), env), **common)
    if len(train) == 0:
        raise DataError(f'{len(sampler)} training images per process is less than one batch of {batch_per_rank}')
    return train, val


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Fix the shuffle order and the workers' augmentation seeds of one epoch."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)


def build_mixup(cfg: DataConfig) -> Optional[Mixup]:
    """timm's Mixup / CutMix when enabled (off in every release run)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=cfg.num_classes)
