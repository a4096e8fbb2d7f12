"""Distillation data generation, dataset loading/validation and the built-in tasks.

Data flows one way: ``data_pipelines`` -> ``posttrain``; nothing here imports
``posttrain`` or ``eval_hooks``.  Heavy modules (distill, teachers) are imported lazily.
"""

from .errors import DataError

__all__ = ["DataError"]
