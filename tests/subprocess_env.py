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


def run_in_triton_interpreter(script: str) -> dict:
    """Runs ``script`` (a test module whose ``__main__`` prints one JSON line) in a fresh interpreter with
    Triton's CPU interpreter on; it must be on before Triton is first imported, hence the fresh process."""
    import json
    import subprocess
    import sys

    env = repo_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
