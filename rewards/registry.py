"""Finding reward functions by name: built-ins, ``module:function``, ``file.py:function``,
and installed plugins (entry-point group ``dsv3_posttrain.rewards``).

A spec may end in keyword arguments, which are passed to the object it names (a factory):
``soft_overlong(max_len=8192, cache=2048)``, ``my_pkg.rewards:make_judge(threshold=0.5)``.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .code_reward import code_tests, code_tests_all, make_code_tests
from .errors import RewardError
from .format_reward import format_reward, language_consistency, make_format_reward, make_language_consistency
from .length_reward import make_soft_overlong, soft_overlong
from .math_verifier import make_math_accuracy, math_accuracy

__all__ = ["ENTRY_POINT_GROUP", "RewardInfo", "resolve", "resolve_named", "list_rewards", "builtin_names",
           "callable_name", "gold_column", "check_spec"]

ENTRY_POINT_GROUP = "dsv3_posttrain.rewards"

RewardFn = Callable[..., Any]


@dataclass(frozen=True)
class _Builtin:
    default: RewardFn  # what a bare name resolves to
    factory: Callable[..., RewardFn]  # what ``name(k=v)`` calls


_BUILTINS: dict[str, _Builtin] = {
    "math_accuracy": _Builtin(math_accuracy, make_math_accuracy),
    "code_tests": _Builtin(code_tests, functools.partial(make_code_tests, mode="fraction")),
    "code_tests_all": _Builtin(code_tests_all, functools.partial(make_code_tests, mode="all")),
    "format": _Builtin(format_reward, make_format_reward),
    "language_consistency": _Builtin(language_consistency, make_language_consistency),
    "soft_overlong": _Builtin(soft_overlong, make_soft_overlong),
}
_ALIASES = {"length": "soft_overlong"}


class RewardInfo(NamedTuple):
    """One row of :func:`list_rewards`: unpacks as ``(name, source, doc)``."""

    name: str
    source: str  # "built-in", "alias of X", or "plugin (<distribution> <module:attr>)"
    doc: str  # first line of the docstring


def builtin_names() -> list[str]:
    """Names (and aliases) of the built-in rewards."""
    return sorted([*_BUILTINS, *_ALIASES])


def callable_name(fn: Any) -> str:
    """Display name of a reward callable, as TRL derives it (partials unwrapped, instances by
    ``__name__`` or class name)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _first_doc_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    if not doc and not callable(obj):
        return ""
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def list_rewards() -> list[RewardInfo]:
    """Every reward a bare name can resolve to: built-ins, aliases and installed plugins."""
    rows = [RewardInfo(n, "built-in", _first_doc_line(b.default)) for n, b in sorted(_BUILTINS.items())]
    rows += [RewardInfo(a, f"alias of {t}", _first_doc_line(_BUILTINS[t].default)) for a, t in sorted(_ALIASES.items())]
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        source = f"plugin ({dist.name + ' ' if dist is not None else ''}{ep.value})"
        try:
            doc = _first_doc_line(ep.load())
        except Exception as exc:  # a broken plugin must not break the listing
            doc = f"(cannot load: {type(exc).__name__}: {exc})"
        rows.append(RewardInfo(ep.name, source, doc))
    return rows


# -- spec parsing ----------------------------------------------------------------------------
def _split_params(spec: str) -> tuple[str, dict[str, Any] | None]:
    """``"name(a=1, b='x')"`` -> ``("name", {"a": 1, "b": "x"})``; literal keyword values only.
    ``"name()"`` gives ``{}`` (call the factory with no arguments), a bare ``"name"`` None."""
    spec = spec.strip()
    if not spec.endswith(")") or "(" not in spec:
        return spec, None
    head, _, args = spec.partition("(")
    try:
        call = ast.parse(f"f({args}", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args
        params = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        assert None not in params
    except (SyntaxError, ValueError, TypeError, AssertionError):  # TypeError: {[1]: 2} (unhashable key)
        raise RewardError(
            f"cannot parse reward spec {spec!r}: arguments must be keyword=literal, e.g. soft_overlong(max_len=1024)"
        ) from None
    return head.strip(), params  # type: ignore[return-value]


def _get_attr_path(obj: Any, attr: str, owner: str) -> Any:
    """``obj.a.b`` for ``attr == "a.b"`` (e.g. ``Class.method``); RewardError naming ``owner``."""
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardError(f"{owner} has no {attr!r}") from None
    return obj


def _load_file(path_str: str, attr: str) -> Any:
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward file {path_str!r} not found (spec '{path_str}:{attr}')")
    # A stable, unique module name per file, so pickling by reference and reloading work.
    mod_name = f"_dsv3_reward_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise RewardError(f"cannot import reward file {path_str!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise RewardError(f"importing reward file {path_str!r} failed: {type(exc).__name__}: {exc}") from exc
    return _get_attr_path(module, attr, f"reward file {path_str!r}")


def _load_module_attr(module_name: str, attr: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(f"cannot import reward module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    return _get_attr_path(module, attr, f"module {module_name!r}")


def _unknown(name: str) -> RewardError:
    plugins = sorted(ep.name for ep in _entry_points())
    known = builtin_names() + plugins
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return RewardError(
        f"unknown reward {name!r}.{hint} Built-ins: {', '.join(builtin_names())}."
        + (f" Plugins: {', '.join(plugins)}." if plugins else " No plugins installed.")
        + " Custom rewards: 'package.module:function' or 'path/to/file.py:function'."
    )


def resolve_named(spec: str) -> tuple[str, RewardFn]:
    """Like :func:`resolve`, also returning the display name used for metrics."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"a reward spec must be a non-empty string, got {spec!r}")
    target, params = _split_params(spec)
    if target.startswith("reward_model:"):  # a trained V3 reward model directory (rewards/reward_model.py)
        from .reward_model import resolve_spec

        return "reward_model", resolve_spec(target, params)
    if ":" in target:
        where, _, attr = target.rpartition(":")
        if not where or not attr:
            raise RewardError(f"bad reward spec {spec!r}: expected 'module:function' or 'file.py:function'")
        is_file = where.endswith(".py") or "/" in where or "\\" in where
        obj = _load_file(where, attr) if is_file else _load_module_attr(where, attr)
        name = attr.rsplit(".", 1)[-1]
    else:
        name = _ALIASES.get(target, target)
        if name in _BUILTINS:
            builtin = _BUILTINS[name]
            if not params:
                return target, builtin.default
            try:
                return target, builtin.factory(**params)
            except Exception as exc:  # e.g. AttributeError from target=['en', 5]: one line, as for other factories
                raise RewardError(f"building reward {spec!r} failed: {exc}") from exc
        eps = [ep for ep in _entry_points() if ep.name == target]
        if not eps:
            raise _unknown(target)
        try:
            obj = eps[0].load()
        except Exception as exc:
            raise RewardError(f"reward plugin {target!r} ({eps[0].value}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        name = target
    if params is not None:  # "f(...)" calls f, with no arguments too: "f()"
        try:
            obj = obj(**params)
        except Exception as exc:
            raise RewardError(f"building reward {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise RewardError(f"reward {spec!r} resolved to a non-callable {type(obj).__name__}")
    return name, obj


def check_spec(spec: str) -> None:
    """Raises :class:`RewardError` where ``spec`` would not resolve, as :func:`resolve` would (files imported,
    built-ins built with their options), except that a ``reward_model:PATH`` is checked for a directory
    only, not loaded: for validating a recipe before anything runs."""
    target, _ = _split_params(spec) if isinstance(spec, str) else (spec, None)
    if isinstance(target, str) and target.startswith("reward_model:"):
        path = target[len("reward_model:"):].strip()
        if not path or not Path(path).expanduser().is_dir():
            raise RewardError(f"reward spec {spec!r}: no reward model directory at {path!r} "
                              "(a `dsv3-posttrain rm train` output)")
        return
    resolve_named(spec)


def gold_column(spec: str) -> str | None:
    """The dataset column a built-in reward scores against (``math_accuracy``'s ``gold_column``, "answer"
    unless the spec sets it), read from the spec alone: no file is imported and no model loaded, so a
    trainer can check its data before it builds its rewards. None for every other reward."""
    target, params = _split_params(spec) if isinstance(spec, str) else (None, None)
    builtin = _BUILTINS.get(_ALIASES.get(target, target)) if target else None
    param = inspect.signature(builtin.factory).parameters.get("gold_column") if builtin is not None else None
    if param is None:
        return None
    default = param.default
    return (params or {}).get("gold_column", default)


def resolve(spec: str) -> RewardFn:
    """Turn a reward spec into a callable ``f(prompts, completions, **columns)``.

    ``spec`` is a built-in name (see :func:`list_rewards`), ``package.module:function``,
    ``path/to/file.py:function``, or the name of an installed plugin (entry point in group
    ``dsv3_posttrain.rewards``); any of them may carry keyword arguments for a factory,
    e.g. ``soft_overlong(max_len=8192, cache=2048)``. A built-in name wins over a plugin of
    the same name. Raises :class:`RewardError` for unknown
    names (with the closest matches) and for specs that do not load.
    """
    return resolve_named(spec)[1]
