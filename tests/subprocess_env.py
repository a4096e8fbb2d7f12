"""The environment for a test's child interpreter: the repository importable, the parent's path kept.

A child given ``PYTHONPATH=<repo>`` alone loses whatever the parent had on its path. On the lent GPU
machine the stack that its image lacks (transformers, TRL, ...) is on PYTHONPATH, so such a child
failed to import TRL there (issue #13: two tests failed on CUDA for this reason alone).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_env(**extra: str) -> dict[str, str]:
    """``os.environ`` with the repository first on PYTHONPATH (the parent's entries after it), plus ``extra``."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *kept]), **extra}
