"""Model adapters: what ScaleKD reads from timm students and teachers."""
from .common import UnsupportedModelError
from .families import FAMILIES, Family
from .student import LogitsOnly, StudentAdapter, StudentTaps
from .teacher import LogitsTeacher, ScaleKDTeacher, TeacherFeatures

__all__ = ['UnsupportedModelError', 'StudentAdapter', 'StudentTaps', 'LogitsOnly', 'ScaleKDTeacher', 'LogitsTeacher',
           'TeacherFeatures', 'FAMILIES', 'Family']
