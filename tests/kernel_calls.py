"""Helpers for the tests of the toolkit's Triton kernel modules (MLA, SwiGLU, MoE routing): count a kernel's
launches, and make one fail its start-up check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

BROKEN = "RuntimeError: no kernel here"


@contextmanager
def recorded_calls(module, labels: dict[str, str | Callable[..., str]]) -> Iterator[list[str]]:
    """While active, each call of ``module.<name>`` (each name in ``labels``) appends its label to the yielded list:
    a string, or a function of the call's arguments that returns one. The functions are restored after."""
    calls: list[str] = []
    saved = {name: getattr(module, name) for name in labels}

    def recorded(fn, label):
        def call(*a, **k):
            calls.append(label(*a, **k) if callable(label) else label)
            return fn(*a, **k)
        return call

    for name, label in labels.items():
        setattr(module, name, recorded(saved[name], label))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def break_kernel(monkeypatch, module, name: str) -> list[int]:
    """``module.<name>`` raises; the module's fused path may run on CPU tensors, its start-up check not yet run.
    Returns the list of the broken kernel's calls (one entry each)."""
    if module.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(module, "_checked", {})
    monkeypatch.setattr(module, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    calls: list[int] = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError(BROKEN.split(": ", 1)[1])

    monkeypatch.setattr(module, name, broken)
    return calls


def assert_start_up_check_failed_once(module, calls: list[int], records: list[logging.LogRecord]) -> None:
    """The broken kernel ran once (in the start-up check), the check kept the error for the CPU, one warning."""
    assert len(calls) == 1 and BROKEN in module._checked["cpu"]
    assert len([r for r in records if "start-up check" in r.getMessage()]) == 1
