"""Tiny random models for tests, the embedded default and laptops.

Both are built locally (no hub access), saved, and meant to be loaded back through the
same loaders as real checkpoints: :func:`medalign_platform.core.student.load_student` and
:func:`medalign_platform.core.teacher.load_teacher`.
"""

from .synthmed.tiny_student import tiny_student
from .synthmed.tiny_teacher import tiny_teacher

__all__ = ["tiny_student", "tiny_teacher"]
