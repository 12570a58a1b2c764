"""Teacher-student feature distances (the paper's Fig. 3 and Fig. 6) of trained ScaleKD / FD students.

The student's final features, through the projector it was trained with, are compared with the
teacher's final features by the training distance D in three parts: ``alternative`` (phi: the DC
component removed; the view DFM adds), ``direct`` (the DC component only) and ``original`` (all).
A projector trained with DFM has an alternative-view projector, which is used for the alternative
part; a single-view projector is used for all three.
"""
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ...engine.run_folder.checkpoint import read_training_checkpoint
from ...engine.inputs.config import config_from_dict
from ...engine.runtime.devices import model_device
from ...engine.errors import UserError
from ...method.dct import keep_dc, remove_dc
from ...method.losses import feature_distance
from ...task.distiller import Distiller
from ..model_files import run_data_config
from ..plots import pyplot, save_figure

__all__ = ['task_from_checkpoint', 'feature_distances', 'plot_feature_distances']

PARTS = ('alternative', 'direct', 'original')


def task_from_checkpoint(path: Union[str, Path], teacher_weights: Optional[str] = None,
                         device: torch.device = torch.device('cpu')) -> Tuple[Distiller, Dict[str, Any]]:
    """The distiller of a training checkpoint on ``device`` (student and projectors loaded; the teacher
    from the run's config, or from ``teacher_weights``), and the run's eval data config."""
    from ...engine.inputs.task_build import build_task
    state = read_training_checkpoint(path)
    cfg = config_from_dict(state['config'], where=str(path))
    if 'task_state' not in state:
        raise UserError(f'{path} holds the student alone (best.pth); give a checkpoint-*.pth of the run, which '
                        f'also holds its projectors')
    if not cfg.distill_options().uses_features:
        raise UserError(f'{path} was trained with method {cfg.distill.method!r}: it has no projector to compare '
                        f'features through')
    if teacher_weights:
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, checkpoint=teacher_weights,
                                                                   pretrained=False))
    task = build_task(cfg, device)
    task.student.load_state_dict(state['student'])
    task.load_task_state(state['task_state'])
    return task.eval(), run_data_config(cfg)


@torch.no_grad()
def feature_distances(task: Distiller, dataset: Dataset, batch_size: int = 100) -> Dict[str, float]:
    """Mean D between projected student and teacher final features, per part (see the module doc)."""
    module, device = task.trainable_module, model_device(task)
    sums, count = dict.fromkeys(PARTS, 0.0), 0
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        images = images.to(device)
        teachers = task.teacher_features(images)
        _, projected = module.project(images, teachers, task.last_stages())
        name = next(iter(projected))  # the run's (first) teacher
        teacher, views = teachers[name], projected[name]['s4']
        ori, alt = views.get('ori', next(iter(views.values()))), views.get('alt', next(iter(views.values())))
        n = images.shape[0]
        sums['alternative'] += n * feature_distance(remove_dc(alt), remove_dc(teacher.final)).item()
        sums['direct'] += n * feature_distance(keep_dc(ori), keep_dc(teacher.final)).item()
        sums['original'] += n * feature_distance(ori, teacher.final).item()
        count += n
    return {k: v / count for k, v in sums.items()}


def plot_feature_distances(rows: List[Dict[str, Any]], path: Union[str, Path]) -> Path:
    """Grouped bars: each checkpoint's distance in each part."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([p + i * width for p in range(len(PARTS))], [row['distances'][k] for k in PARTS], width,
               label=row['label'])
    ax.set_xticks([p + width * (len(rows) - 1) / 2 for p in range(len(PARTS))], PARTS)
    ax.set_ylabel('teacher-student distance D')
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    return save_figure(fig, path)
