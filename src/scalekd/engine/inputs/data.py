"""Datasets, transforms and loaders: ImageNet-style folders through timm's dataset and transform builders."""
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, Mixup, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import DataConfig
from .config_rules import DATASETS
from ..runtime.cuda_settings import loader_options
from ..runtime.distributed import DistEnv
from ..errors import UserError
from ..loop.faults import ignore_stop_signals

__all__ = ['DataError', 'Datasets', 'CheckedImageDataset', 'build_datasets', 'build_loaders', 'build_mixup', 'seed_epoch', 'seeded_subset',
           'ShardSampler', 'EpochSampler', 'SeededSamples', 'EndingLoader', 'epoch_seed']

_CHECK_AUTO_LIMIT = 50_000
_SEED_MASK = (1 << 63) - 1
# what Pillow raises for a file it cannot decode, or one beyond its pixel limit (Image.MAX_IMAGE_PIXELS)
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_logger = logging.getLogger('scalekd')


class DataError(UserError):
    """A dataset that is missing or malformed."""


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: Sequence[str]
    skipped: int = 0  # unreadable images dropped before training


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


_16_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # a 16-bit greyscale PNG as Pillow opens it


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` (``L`` or ``RGB``); 16-bit greyscale is scaled to 8 bits (Pillow's own
    conversion clips it at 255, turning most pixels white)."""
    if img.mode in _16_BIT_MODES:
        wide = np.asarray(img, dtype=np.int64).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), 'L')
    return img.convert(mode)


class CheckedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` that names an unreadable image instead of silently skipping it
    (with ``skip_unreadable``: skips it with a warning that names it)."""

    def __init__(self, root: str, skip_unreadable: bool = False, **kwargs):
        super().__init__(root, **kwargs)
        self.skip_unreadable = skip_unreadable

    def unreadable(self) -> List[Tuple[str, str]]:
        """(file, error) of every image that does not decode (a full read of each file)."""
        bad = []
        for path, _ in self.reader.samples:
            try:
                with Image.open(path) as img:
                    img.load()
            except _UNREADABLE as e:
                bad.append((str(path), str(e).splitlines()[0] if str(e) else type(e).__name__))
        return bad

    def drop(self, files: Sequence[str]) -> None:
        drop = set(files)
        self.reader.samples = [s for s in self.reader.samples if str(s[0]) not in drop]

    def __getitem__(self, index):
        path, target = self.reader.samples[index]
        try:
            with Image.open(path) as img:
                img = convert_image(img, self.input_img_mode)
        except _UNREADABLE as e:
            if not self.skip_unreadable:
                raise DataError(f'unreadable image {path}: {e} (set data.skip_unreadable: true to skip such '
                                f'images)') from None
            _logger.warning(f'skipped unreadable image {path}: {e}')
            return self[(index + 1) % len(self)]
        return (self.transform(img) if self.transform is not None else img), target


def _check_images(datasets: Sequence[CheckedImageDataset], cfg: DataConfig) -> int:
    """Decode every image before training (``data.check_images``; ``auto``: when there are at most
    ``_CHECK_AUTO_LIMIT`` images); refuse unreadable ones, or drop and count them with ``skip_unreadable``."""
    total = sum(len(d) for d in datasets)
    if cfg.check_images is False or (cfg.check_images is None and total > _CHECK_AUTO_LIMIT):
        return 0
    bad = [item for d in datasets for item in d.unreadable()]
    if not bad:
        return 0
    if not cfg.skip_unreadable:
        listed = '; '.join(f'{f}: {e}' for f, e in bad[:5]) + (f' (+{len(bad) - 5} more)' if len(bad) > 5 else '')
        raise DataError(f'{len(bad)} unreadable image(s): {listed}. Fix or remove them, or set '
                        f'data.skip_unreadable: true to skip them')
    for d in datasets:
        d.drop([f for f, _ in bad])
    return len(bad)


def _folder_datasets(cfg: DataConfig, train_tf, val_tf) -> Datasets:
    root = Path(cfg.root)
    classes = class_folders(root / cfg.train_split)
    val_classes = class_folders(root / cfg.val_split)
    if list(val_classes) != list(classes):
        extra = sorted(set(val_classes) ^ set(classes))
        raise DataError(f'{root / cfg.val_split} and {root / cfg.train_split} have different classes: {extra[:10]}')
    class_map = {c: i for i, c in enumerate(classes)}
    mode = 'L' if cfg.in_chans == 1 else 'RGB'
    train, val = (CheckedImageDataset(str(root / split), skip_unreadable=cfg.skip_unreadable, class_map=class_map,
                                      transform=tf, input_img_mode=mode)
                  for split, tf in ((cfg.train_split, train_tf), (cfg.val_split, val_tf)))
    return Datasets(train, val, classes, skipped=_check_images((train, val), cfg))


def _fashion_datasets(cfg: DataConfig, train_tf, val_tf) -> Datasets:
    from .fashion_mnist import FashionMNIST, find_fashion_mnist
    folder = find_fashion_mnist(cfg.root or None)
    train = FashionMNIST(folder, cfg.train_split, train_tf)
    return Datasets(train, FashionMNIST(folder, cfg.val_split, val_tf), train.classes)


def build_datasets(cfg: DataConfig, mean: Tuple[float, ...], std: Tuple[float, ...], seed: int = 0) -> Datasets:
    """The train / val datasets of a config, checked against ``num_classes``."""
    if cfg.dataset not in DATASETS:
        raise DataError(f'unknown dataset {cfg.dataset!r}; choose one of {", ".join(DATASETS)}')
    train_tf, val_tf = build_transforms(cfg, mean, std)
    make = _fashion_datasets if cfg.dataset == 'fashion_mnist' else _folder_datasets
    data = make(cfg, train_tf, val_tf)
    if len(data.classes) != cfg.num_classes:
        raise DataError(f'{cfg.root} has {len(data.classes)} classes but data.num_classes is {cfg.num_classes}')
    balanced = cfg.subset_draw == 'balanced'
    if cfg.train_subset is not None:
        data.train = seeded_subset(data.train, cfg.train_subset, seed, balanced)
    if cfg.val_subset is not None:
        data.val = seeded_subset(data.val, cfg.val_subset, seed, balanced)
    return data


def _targets(dataset: Dataset) -> np.ndarray:
    """The class index of every sample (folder datasets and Fashion-MNIST), without decoding images."""
    if isinstance(dataset, ImageDataset):
        return np.array([t for _, t in dataset.reader.samples], dtype=np.int64)
    return np.asarray(dataset.targets, dtype=np.int64)


def seeded_subset(dataset: Dataset, size: int, seed: int, balanced: bool = False) -> Subset:
    """``size`` images of ``dataset`` drawn without replacement by ``seed``, in their original order.

    ``balanced``: ``size // classes`` images of every class (the remainder, one each, to the first
    classes); a class with fewer images than its share is an error naming it.
    """
    if not 0 < size <= len(dataset):
        raise DataError(f'a subset of {size} images cannot be drawn from {len(dataset)}')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).numpy()
    if not balanced:
        return Subset(dataset, sorted(order[:size].tolist()))
    targets = _targets(dataset)[order]
    classes = np.unique(targets)
    keep = []
    for rank, c in enumerate(classes):
        share = size // len(classes) + (rank < size % len(classes))
        drawn = order[targets == c][:share]
        if len(drawn) < share:
            raise DataError(f'a class-balanced subset of {size} images needs {share} of class {c}, which has '
                            f'{len(drawn)}')
        keep.extend(drawn.tolist())
    return Subset(dataset, sorted(keep))


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard of one rank, in order and without padding, so summed counts are exact."""

    def __init__(self, length: int, env: DistEnv):
        self.indices = list(range(env.rank, length, env.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EndingLoader(DataLoader):
    """A DataLoader that ends its worker processes as soon as an iteration over it fails. A failed
    iterator is kept alive by the error's traceback, and its workers (which ignore the stop signals,
    see :func:`~scalekd.engine.loop.faults.ignore_stop_signals`) would outlive the run and keep its process
    from ending."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        try:
            yield from batches
        except (Exception, KeyboardInterrupt):
            end_workers = getattr(batches, '_shutdown_workers', None)  # torch's own, as its iterator's __del__
            if end_workers is not None:
                end_workers()
            raise


def build_loaders(data: Datasets, cfg: DataConfig, batch_per_rank: int, env: DistEnv, seed: int):
    """Train loader (shuffled by seed and epoch, each sample augmented from its own seed: see
    :class:`EpochSampler`) and eval loader (this rank's shard, in order)."""
    sampler = EpochSampler(data.train, batch_per_rank, env, seed)
    common = dict(num_workers=cfg.workers, worker_init_fn=ignore_stop_signals, **loader_options(cfg, env.device))
    train = EndingLoader(SeededSamples(data.train), batch_size=batch_per_rank, sampler=sampler, drop_last=True,
                         generator=torch.Generator(), **common)
    val = EndingLoader(data.val, batch_size=cfg.val_batch_size or batch_per_rank,
                       sampler=ShardSampler(len(data.val), env), **common)
    if len(train) == 0:
        raise DataError(f'{len(sampler)} training images per process is less than one batch of {batch_per_rank}')
    return train, val


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed of (run seed, epoch), hashed (``numpy.random.SeedSequence``) so that no two
    epochs or seeds share it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and NumPy for the body, then restore their states (the
    main process draws from them too when there are no workers). The GPU generators are left alone:
    the training step's dropout and drop path draw from them."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32, 1])  # not random's init array: another stream
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class SeededSamples(Dataset):
    """Fetches ``(index, seed)`` keys: sample ``index`` with every RNG seeded by ``seed``, so its
    augmentation depends on neither the worker that loads it nor what was loaded before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with seeded_rngs(seed):
            return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way, after ``start_batch`` batches (resume),
    and gives each sample the seed of its augmentation.

    An epoch is one global order (seed, epoch) dealt round-robin to the ranks: rank ``r``'s ``j``-th
    sample is at global position ``j * world_size + r``. The sample's seed is
    ``epoch_seed(seed, epoch) + position``: different on every rank, worker and epoch, and the same
    for the same position whatever the number of processes or workers, so a run resumed mid-epoch,
    on another process count too, draws exactly the augmentations of an uninterrupted one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, env: DistEnv, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start = 0

    def set_start(self, start_batch: int) -> None:
        self.start = start_batch * self.batch_size

    def __iter__(self):
        base = epoch_seed(self.seed, self.epoch)
        indices = list(super().__iter__())
        for j in range(self.start, len(indices)):
            yield indices[j], (base + j * self.num_replicas + self.rank) & _SEED_MASK

    def __len__(self) -> int:
        return super().__len__() - self.start


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int, start_batch: int = 0) -> None:
    """Fix the shuffle order of one epoch from ``start_batch`` on, and the seed the loader draws its
    workers' base seed from (per run seed, rank and epoch; the augmentations are seeded per sample)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start(start_batch)
    loader.generator.manual_seed(epoch_seed(seed, epoch) ^ rank)


def build_mixup(cfg: DataConfig) -> Optional[Mixup]:
    """timm's Mixup / CutMix when enabled (off in every release run)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=cfg.num_classes)
