"""Student weights for other toolkits, and the ScaleKD release's students into timm."""
from .backbone_export import FORMATS, ExportFormatError, to_format
from .mmcls_import import import_mmcls, student_state
from .openmmlab import TOOLKITS, OpenMMLabKeyError, family_of, from_openmmlab, to_openmmlab

__all__ = ['FORMATS', 'ExportFormatError', 'to_format', 'import_mmcls', 'student_state', 'TOOLKITS',
           'OpenMMLabKeyError', 'family_of', 'from_openmmlab', 'to_openmmlab']
