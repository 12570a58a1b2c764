"""``scalekd bench --loader CONFIG``: the training data loader of a config alone, in images per second for
each number of workers, to set beside the step's images per second (``scalekd bench``): the slower of
the two bounds a run. The loader is the training one (the config's dataset, transforms, sampler,
``data.pin_memory`` / ``data.persistent_workers``), built for one process with ``batch`` images a step.
"""
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..engine.inputs.config import RunConfig
from ..engine.runtime.cuda_settings import loader_options
from ..engine.inputs.data import DataError, build_datasets, build_loaders, seed_epoch
from ..engine.runtime.distributed import DistEnv
from ..engine.errors import UserError
from ..engine.inputs.task_build import normalization_from_config

__all__ = ['default_worker_counts', 'measure_loader', 'run_loader_bench', 'format_loader_table']


def default_worker_counts(cpus: Optional[int] = None) -> List[int]:
    """0, then powers of two up to the CPU count, and the CPU count itself."""
    cpus = cpus or os.cpu_count() or 1
    counts, n = [0], 1
    while n < cpus:
        counts.append(n)
        n *= 2
    return counts + [cpus]


def measure_loader(loader, batches: int, seed: int) -> Dict[str, Any]:
    """Time ``batches`` batches of a training loader after its first (whose time, the workers' start
    included, is reported apart)."""
    seed_epoch(loader, seed, 0, 0)
    start = time.perf_counter()
    it = iter(loader)
    images, _ = next(it)
    first = time.perf_counter() - start
    shape = list(images.shape)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        count += images.shape[0]
    seconds = time.perf_counter() - start
    del it  # its workers end here (unless persistent: they end with the loader)
    return dict(first_batch_s=first, batches=batches, images=count, seconds=seconds, images_per_s=count / seconds,
                shape=shape)


def run_loader_bench(cfg: RunConfig, workers: Sequence[int], batches: int, batch: Optional[int] = None,
                     device: str = 'cpu', progress=None) -> Dict[str, Any]:
    """Images per second of the config's training loader for each number of ``workers``; ``batch``:
    images per step (default: the config's batch per process on one process)."""
    if batches < 1 or any(w < 0 for w in workers):
        raise UserError(f'--batches must be >= 1 and --workers >= 0, got {batches} and {list(workers)}')
    batch = batch or cfg.train.batch_size // cfg.train.accum_steps
    data_cfg = dataclasses.replace(cfg.data, check_images=False)  # what the loader reads is what is timed
    data = build_datasets(data_cfg, *normalization_from_config(cfg), seed=cfg.seed)
    if len(data.train) // batch < batches + 1:
        raise DataError(f'{cfg.data.root} has {len(data.train)} training images: {batches + 1} batches of {batch} '
                        f'need {(batches + 1) * batch} (lower --batches or --batch)')
    env = DistEnv(device=torch.device(device))
    rows = []
    for n in workers:
        if progress:
            progress(f'timing the loader with {n} worker(s) ...')
        loader, _ = build_loaders(data, dataclasses.replace(data_cfg, workers=n), batch, env, cfg.seed)
        rows.append(dict(workers=n, **measure_loader(loader, batches, cfg.seed)))
        del loader
    d = cfg.data
    return dict(dataset=d.dataset, root=d.root, train_images=len(data.train), img_size=d.img_size, batch=batch,
                auto_augment=d.auto_augment, re_prob=d.re_prob, interpolation=d.interpolation, device=device,
                pin_memory=loader_options(data_cfg, env.device)['pin_memory'], cpus=os.cpu_count(), rows=rows)


def format_loader_table(report: Dict[str, Any]) -> str:
    """One line on what was loaded, then one row per number of workers."""
    lines = [f"training loader of {report['dataset']} {report['root']} ({report['train_images']:,} images): "
             f"{report['img_size']} px, batch {report['batch']}, augment {report['auto_augment'] or 'none'}, "
             f"random erasing {report['re_prob']}, {report['interpolation']}; {report['cpus']} CPUs"
             f"{', pinned memory' if report['pin_memory'] else ''}",
             f"{'workers':>7} {'first batch s':>13} {'img/s':>9}"]
    for r in report['rows']:
        lines.append(f"{r['workers']:>7} {r['first_batch_s']:>13.2f} {r['images_per_s']:>9.1f}")
    return '\n'.join(lines)
