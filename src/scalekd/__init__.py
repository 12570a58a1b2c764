"""ScaleKD: distil strong pre-trained vision transformers into CNN, MLP and ViT students (NeurIPS 2024)."""
from .adapters import zoo  # noqa: F401  (registers the paper's extra timm architectures)
from .adapters import ScaleKDTeacher, StudentAdapter, UnsupportedModelError
from .adapters.models import UnknownModelError, create_timm_model
from .method.dct import Dct2d, dct_matrix, keep_dc, remove_dc, remove_dc_by_dct
from .method.losses import feature_distance, logit_kd_loss, soft_target_kd_loss
from .method.teacher_norm import FeatureStandardizer
from .method.options import METHODS, DistillOptions
from .method.projectors import ConvProjector, CrossAttentionProjector, LinearProjector, build_projector
from .task.builder import TeacherSpec, build_distiller
from .task.distiller import DistillationModule, Distiller, Teacher, TeacherBranch
from .task.loss import ScaleKDLoss
from .engine.inputs.config import RunConfig, load_config
from .engine.runtime.distributed import exit_process
from .engine.loop.trainer import Trainer
from .tools.export import export_student

__version__ = '0.1.0'

__all__ = [
    'build_distiller', 'TeacherSpec', 'Distiller', 'DistillationModule', 'Teacher', 'TeacherBranch', 'DistillOptions',
    'METHODS', 'ScaleKDLoss', 'FeatureStandardizer', 'soft_target_kd_loss',
    'ScaleKDTeacher', 'StudentAdapter', 'UnsupportedModelError', 'UnknownModelError', 'create_timm_model',
    'CrossAttentionProjector', 'LinearProjector', 'ConvProjector', 'build_projector',
    'Dct2d', 'dct_matrix', 'remove_dc', 'keep_dc', 'remove_dc_by_dct',
    'feature_distance', 'logit_kd_loss',
    'load_config', 'RunConfig', 'Trainer', 'exit_process', 'export_student',
]
