"""Importing the ScaleKD release's students: mmcls 1.x checkpoints whose keys sit under ``student.``."""
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ...adapters.models import create_timm_model
from ...engine.inputs.weights import read_state_dict
from .openmmlab import OpenMMLabKeyError, from_openmmlab

__all__ = ['student_state', 'import_mmcls']

_HEAD_WEIGHTS = ('head.fc.weight', 'head.layers.head.weight')


def student_state(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """The student's ``backbone.`` / ``head.`` tensors of a distiller state dict, and how many tensors of
    each other top-level prefix (``teacher``, ``distill_losses``, ...) were left out.

    A plain mmcls classifier (keys already under ``backbone.``) is taken whole.
    """
    if any(k.startswith('student.') for k in state):
        student = {k[len('student.'):]: v for k, v in state.items() if k.startswith('student.')}
        others = Counter(k.split('.', 1)[0] for k in state if not k.startswith('student.'))
        return student, dict(others)
    if any(k.startswith('backbone.') for k in state):
        return dict(state), {}
    raise OpenMMLabKeyError('no mmcls student in this file: no key starts with "student." or "backbone." '
                            f'(first keys: {", ".join(list(state)[:5])})')


def import_mmcls(path: Union[str, Path], model_name: str, img_size: int = 224,
                 model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """A timm ``model_name`` holding the student of the mmcls checkpoint at ``path``.

    The class count comes from the checkpoint's head. Every student tensor must find a home in the
    timm model (else :class:`~scalekd.tools.transfer.openmmlab.OpenMMLabKeyError` lists those that do not).
    Returns the model and a report: tensors imported, prefixes left out, class count.
    """
    student, others = student_state(read_state_dict(path))
    heads = [student[k] for k in _HEAD_WEIGHTS if k in student]
    kwargs = dict(model_kwargs or {})
    if heads:
        kwargs.setdefault('num_classes', heads[0].shape[0])
    model = create_timm_model(model_name, (img_size, img_size), role='student', **kwargs)
    model.load_state_dict(from_openmmlab(model, student, 'mmcls'))
    report = dict(tensors=len(student), left_out=others, num_classes=kwargs.get('num_classes'))
    return model.eval(), report
