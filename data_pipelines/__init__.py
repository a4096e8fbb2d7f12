"""Distillation data generation, dataset loading/validation and the built-in tasks.

Data flows one way: ``data_pipelines`` -> ``posttrain``; nothing here imports
``posttrain`` or ``eval_hooks``.  Heavy dependencies (datasets, transformers, vllm,
aiohttp, matplotlib) are imported inside the functions that need them.
"""

from .arith_task import build_dataset, generate_split, scripted_trace, task_corpus, write_dataset
from .distill import DistillConfig, run_distill
from .errors import DataError
from .loading import load_rows, require_columns

__all__ = ["DataError", "DistillConfig", "build_dataset", "generate_split", "load_rows", "require_columns",
           "run_distill", "scripted_trace", "task_corpus", "write_dataset"]
