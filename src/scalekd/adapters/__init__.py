"""Model adapters: what ScaleKD reads from timm students and teachers."""
from .common import UnsupportedModelError
from .student import STUDENT_FAMILIES, StudentAdapter, StudentTaps
from .teacher import TEACHER_FAMILIES, ScaleKDTeacher, TeacherFeatures

__all__ = ['UnsupportedModelError', 'StudentAdapter', 'StudentTaps', 'STUDENT_FAMILIES',
           'ScaleKDTeacher', 'TeacherFeatures', 'TEACHER_FAMILIES']
