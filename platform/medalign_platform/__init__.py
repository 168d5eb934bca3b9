"""MedAlign platform: alignment distillation of medical LVLMs, with sweeps on Ray."""

__version__ = "0.1.0"
