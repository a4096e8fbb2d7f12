"""Scoring a batch with several rewards: the entry point for GRPO and for distillation.

Calling convention (TRL's ``reward_funcs`` contract): every reward is called as
``f(prompts=..., completions=..., **columns)`` where each dataset column is a list aligned
with ``completions``; ``completion_ids`` and extra keyword arguments (TRL passes
``trainer_state``, ``log_extra``, ``log_metric``) are passed when given. A reward returns one
``float`` or ``None`` per completion; ``None`` means "not applicable to this row".

Combining (same as TRL's ``sum_then_normalize``, which uses ``nansum``): the total of a row is
``sum(weight_k * value_k)`` over the rewards whose value is not None; a row where every reward
is None has total None (unscorable). A reward's ``mean``/``std`` metrics skip its None rows.

Failures — the call raised, timed out, returned the wrong number of values, or a value that is
not a finite number (NaN, inf, a string, …; a reward reports one row it could not score, with the
reason, by returning :class:`~rewards.errors.RowFailure` there, a NaN that carries its cause):
- ``policy="error"``: :class:`RewardError` naming the reward, the row and the cause;
- ``policy="skip"``: the affected rows get None (every row if the whole call failed), counted
  in ``rewards/<name>/failures``.

Timeouts: with ``timeout_s`` each reward call runs in a daemon thread and is abandoned after
``timeout_s`` seconds. Python cannot kill a thread, so an abandoned call keeps running in the
background until it returns (it cannot block interpreter exit). An ``async def`` reward runs on
the process's one reward event loop (``_reward_loop``) and is cancelled at its timeout. The built-in verifiers do
their heavy work in killable child processes with their own hard per-item timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RewardError, RowFailure
from .registry import callable_name, resolve_named

__all__ = ["RewardFailure", "RewardResult", "RewardSuite", "score_rewards", "GuardedReward", "POLICIES"]

POLICIES = ("error", "skip")
RewardSpec = str | Callable[..., Any]


@dataclass(frozen=True)
class RewardFailure:
    """One failure: ``row`` is None when the whole call failed (every row affected)."""

    reward: str
    row: int | None
    cause: str

    def __str__(self) -> str:
        where = "all rows" if self.row is None else f"row {self.row}"
        return f"reward {self.reward!r} failed on {where}: {self.cause}"


@dataclass
class RewardResult:
    """Scores of one batch.

    ``values[name]`` has one entry per completion (None = no value); ``total`` is the
    weighted sum described in the module docstring; ``metrics`` holds
    ``rewards/<name>/mean``, ``rewards/<name>/std``, ``rewards/<name>/failures`` and
    ``reward/mean``, ``reward/std`` (of the total)."""

    names: list[str]
    weights: list[float]
    values: dict[str, list[float | None]]
    total: list[float | None]
    metrics: dict[str, float]
    failures: list[RewardFailure] = field(default_factory=list)

    def matrix(self) -> list[list[float]]:
        """Rows × rewards with NaN for None: what TRL's ``rewards_per_func`` tensor holds."""
        nan = float("nan")
        return [[nan if self.values[n][i] is None else self.values[n][i] for n in self.names]  # type: ignore[misc]
                for i in range(len(self.total))]


# -- one guarded call ------------------------------------------------------------------------
def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _reward_loop() -> asyncio.AbstractEventLoop:
    """The one event loop every async reward of this process runs on, in a daemon thread (as TRL runs its
    async rewards): state a reward keeps between calls (a semaphore, an HTTP client session) is bound to
    the loop that made it, so each call cannot get a fresh loop."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="rewards-async-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def _invoke(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float | None = None) -> Any:
    out = fn(**kwargs)
    if not inspect.isawaitable(out):
        return out

    async def _await() -> Any:
        return await out

    future = asyncio.run_coroutine_threadsafe(_await(), _reward_loop())
    try:
        return future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()  # unlike a thread, a coroutine can be stopped
        raise TimeoutError(f"timed out after {timeout_s} s (the call was cancelled)") from None


def _call_with_timeout(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float | None) -> Any:
    """Run ``fn(**kwargs)``; raise TimeoutError after ``timeout_s`` (a coroutine is cancelled, a
    synchronous call abandoned)."""
    if timeout_s is None or _is_async(fn):
        return _invoke(fn, kwargs, timeout_s)
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = _invoke(fn, kwargs)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"reward-{callable_name(fn)}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"timed out after {timeout_s} s (the call was abandoned and may still be running)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _as_list(out: Any) -> list[Any]:
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # torch / numpy arrays
        out = out.tolist()
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence):
        raise TypeError(f"returned {type(out).__name__}, expected a list with one float or None per completion")
    return list(out)


def _check_value(v: Any) -> tuple[float | None, str | None]:
    if v is None:
        return None, None
    if isinstance(v, RowFailure):  # the reward says why it could not score this row
        return None, v.cause
    if isinstance(v, numbers.Real) or (hasattr(v, "item") and hasattr(v, "dtype")):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None, f"returned {v!r} ({type(v).__name__}), not a number"
        if not math.isfinite(f):
            return None, f"returned {f} (not finite)"
        return f, None
    return None, f"returned {v!r:.60} ({type(v).__name__}), not a number"


def run_reward(name: str, fn: Callable[..., Any], n: int, kwargs: dict[str, Any], timeout_s: float | None
               ) -> tuple[list[float | None], list[RewardFailure]]:
    """Call one reward and validate its output; failures are returned, never raised."""
    try:
        out = _as_list(_call_with_timeout(fn, kwargs, timeout_s))
    except Exception as exc:
        cause = str(exc) if isinstance(exc, TimeoutError) else f"raised {type(exc).__name__}: {exc}"
        return [None] * n, [RewardFailure(name, None, cause)]
    if len(out) != n:
        return [None] * n, [RewardFailure(name, None, f"returned {len(out)} values for {n} completions")]
    values: list[float | None] = []
    failures = []
    for i, v in enumerate(out):
        value, problem = _check_value(v)
        values.append(value)
        if problem:
            failures.append(RewardFailure(name, i, problem))
    return values, failures


def _raise_first(failures: list[RewardFailure]) -> None:
    if failures:
        f = failures[0]
        more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
        raise RewardError(f"{f}{more}")


# -- metrics ---------------------------------------------------------------------------------
def _mean_std(xs: list[float | None]) -> tuple[float, float]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)  # Bessel, as TRL's nanstd
    return mean, math.sqrt(var)


# -- the suite -------------------------------------------------------------------------------
class RewardSuite:
    """Several weighted rewards with a failure policy and a per-call timeout.

    ``rewards`` items are a spec string (see :func:`rewards.resolve`), a callable, or a
    ``(spec_or_callable, weight)`` pair; a mapping ``{spec: weight}`` works too.
    """

    def __init__(
        self,
        rewards: Sequence[RewardSpec | tuple[RewardSpec, float]] | Mapping[str, float],
        policy: str = "error",
        timeout_s: float | None = None,
        concurrent: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        items = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
        if not items:
            raise ValueError("a RewardSuite needs at least one reward")
        self.policy, self.timeout_s, self.concurrent = policy, timeout_s, concurrent
        self.names: list[str] = []
        self.weights: list[float] = []
        self.funcs: list[Callable[..., Any]] = []
        for item in items:
            spec, weight = item if isinstance(item, tuple) else (item, 1.0)
            if isinstance(spec, str):
                name, fn = resolve_named(spec)
            elif callable(spec):
                name, fn = callable_name(spec), spec
            else:
                raise RewardError(f"a reward must be a spec string or a callable, got {spec!r}")
            base, k = name, 2
            while name in self.names:  # two rewards of one name must not share metrics
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)
            self.weights.append(float(weight))
            self.funcs.append(fn)

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        columns: Mapping[str, Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **extra: Any,
    ) -> RewardResult:
        """Score a batch. ``columns`` are dataset columns (lists aligned with ``completions``);
        ``extra`` keyword arguments are passed to every reward unchanged."""
        n = len(completions)
        kwargs = self._kwargs(prompts, completions, columns, completion_ids, extra)
        outcomes: list[tuple[list[float | None], list[RewardFailure]] | None] = [None] * len(self.funcs)

        def work(k: int) -> None:
            outcomes[k] = run_reward(self.names[k], self.funcs[k], n, kwargs, self.timeout_s)

        if self.concurrent and len(self.funcs) > 1:
            # Rewards overlap: the built-ins wait on child processes, not on the GIL.
            threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(self.funcs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for k in range(len(self.funcs)):
                work(k)
        values: dict[str, list[float | None]] = {}
        failures: list[RewardFailure] = []
        for name, outcome in zip(self.names, outcomes):
            assert outcome is not None
            values[name], fails = outcome
            failures += fails
        if self.policy == "error":
            _raise_first(failures)
        return self._result(n, values, failures)

    __call__ = score

    def _kwargs(self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any] | None,
                completion_ids: Sequence[Sequence[int]] | None, extra: dict[str, Any]) -> dict[str, Any]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions (repeat each prompt per completion)")
        kwargs: dict[str, Any] = {}
        for key, col in (columns or {}).items():
            if key in ("prompts", "completions", "completion_ids"):
                raise ValueError(f"column {key!r} clashes with a reward argument of that name")
            if isinstance(col, Sequence) and not isinstance(col, (str, bytes)) and len(col) != n:
                raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
            kwargs[key] = list(col) if isinstance(col, tuple) else col
        kwargs.update(extra)
        if completion_ids is not None:
            if len(completion_ids) != n:
                raise ValueError(f"completion_ids has {len(completion_ids)} rows for {n} completions")
            kwargs["completion_ids"] = completion_ids
        kwargs["prompts"], kwargs["completions"] = list(prompts), list(completions)
        return kwargs

    def _result(self, n: int, values: dict[str, list[float | None]], failures: list[RewardFailure]
                ) -> RewardResult:
        total: list[float | None] = []
        for i in range(n):
            parts = [w * values[name][i] for name, w in zip(self.names, self.weights)  # type: ignore[operator]
                     if values[name][i] is not None]
            total.append(sum(parts) if parts else None)
        metrics: dict[str, float] = {}
        for name in self.names:
            mean, std = _mean_std(values[name])
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = std
            failed_rows = sum(n if f.row is None else 1 for f in failures if f.reward == name)
            metrics[f"rewards/{name}/failures"] = float(failed_rows)
        metrics["reward/mean"], metrics["reward/std"] = _mean_std(total)
        return RewardResult(list(self.names), list(self.weights), values, total, metrics, failures)

    def trl_reward_funcs(self) -> list[GuardedReward]:
        """The suite's rewards as TRL ``reward_funcs`` (pass ``reward_weights=suite.weights``),
        each wrapped with this suite's timeout and failure policy."""
        return [GuardedReward(name, fn, self.policy, self.timeout_s)
                for name, fn in zip(self.names, self.funcs)]


class GuardedReward:
    """One reward wrapped with a timeout and failure policy, callable the way TRL calls rewards.

    Under ``skip`` failed rows become None and, inside a TRL trainer, the count is logged via
    ``log_metric`` as ``rewards/<name>/failures``."""

    def __init__(self, name: str, fn: Callable[..., Any], policy: str = "error", timeout_s: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.__name__ = name
        self.fn, self.policy, self.timeout_s = fn, policy, timeout_s

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        values, failures = run_reward(self.__name__, self.fn, n,
                                      {**kwargs, "prompts": prompts, "completions": completions}, self.timeout_s)
        if self.policy == "error":
            _raise_first(failures)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"rewards/{self.__name__}/failures",
                       float(sum(n if f.row is None else 1 for f in failures)))
        return values


def score_rewards(
    reward_specs: Sequence[RewardSpec | tuple[RewardSpec, float]] | Mapping[str, float],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Any] | None = None,
    policy: str = "error",
    timeout_s: float | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    **extra: Any,
) -> RewardResult:
    """Score one batch with weighted rewards (one-shot :class:`RewardSuite`). See the module
    docstring for how None values and failures are handled."""
    suite = RewardSuite(reward_specs, policy=policy, timeout_s=timeout_s)
    return suite.score(prompts, completions, columns, completion_ids=completion_ids, **extra)
