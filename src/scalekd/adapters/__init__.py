"""Model adapters: what ScaleKD reads from timm students and teachers."""
from .common import UnsupportedModelError
from .families import FAMILIES, Family
from .student import StudentAdapter, StudentTaps
from .teacher import ScaleKDTeacher, TeacherFeatures

__all__ = ['UnsupportedModelError', 'StudentAdapter', 'StudentTaps', 'ScaleKDTeacher', 'TeacherFeatures',
           'FAMILIES', 'Family']
