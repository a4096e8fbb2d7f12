"""Recipes: one YAML file per run, overridable with `--key value`, parsed into typed config dataclasses.

The config classes are dataclasses whose fields are documented where they are declared (TRL's
style); many extend TRL's or transformers' argument classes, so field names mean what a TRL user
expects. Every problem is a `ConfigError` naming the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


class _DuplicateKey(ValueError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    value without a word, so a recipe edited by appending `max_steps: 1` under an earlier `max_steps: 300`
    ran with whichever came last."""

    def construct_mapping(self, node, deep=False):
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:  # the mapping's own keys: a `<<` merge's may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"line {line}: key {key_node.value!r} is given twice (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Reads a YAML recipe into a mapping; a missing or malformed file is a `ConfigError`."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"recipe {p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_RecipeLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--key v1 v2 …` (a list, as TRL's parser reads a list field) and bare
    `--flag` (meaning true) → {key: raw string, list of raw strings, or True}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: options are given as --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            value = argv[i + 1] if j == i + 2 else list(argv[i + 1:j])
            i = j
        else:
            value, i = True, i + 1
        out[key.replace("-", "_")] = value
    return out


def split_recipe_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--recipe FILE` (or `--recipe=FILE`) out of a command line; the rest are overrides. A `--recipe`
    without a file is a `ConfigError` (it would otherwise read as an override of an unknown key 'recipe')."""
    recipe, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--recipe" or argv[i].startswith("--recipe="):
            if argv[i] == "--recipe":
                recipe, i = (argv[i + 1] if i + 1 < len(argv) else ""), i + 2
            else:
                recipe, i = argv[i].split("=", 1)[1], i + 1
            if not recipe.strip() or recipe.startswith("--"):
                raise ConfigError("--recipe needs a file: --recipe FILE")
        else:
            rest.append(argv[i])
            i += 1
    return recipe, rest


def require_output_path(path: str | os.PathLike | None, field: str = "output_dir", directory: bool = True) -> None:
    """An output the command will write (a directory, or a file with `directory=False`) must be creatable
    where it is asked for: not an existing file where a directory goes (or the reverse), and not below a
    file. Otherwise a `ConfigError` naming it, before any work is done (instead of FileExistsError /
    NotADirectoryError from deep inside a run). None or "" is left to the command's own check."""
    if path is None or not os.fspath(path).strip():
        return
    out = Path(os.fspath(path)).expanduser()
    if out.exists() and out.is_dir() != directory:
        what = "is a directory; give a file path" if out.is_dir() else "exists and is not a directory"
        raise ConfigError(f"{field}: {os.fspath(path)} {what}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{field}: {os.fspath(path)}: {parent} exists and is not a directory")
            break


def require_empty_output(path: str | os.PathLike, field: str = "output") -> None:
    """A command that writes a whole model directory (init-model, export) must not write into one that holds
    anything: its files would be mixed with another model's or run's, and theirs partly written over."""
    out = Path(os.fspath(path)).expanduser()
    held = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    if held:
        raise ConfigError(f"--{field} {os.fspath(path)} already exists and is not empty (holds {', '.join(held[:3])}"
                          f"{' …' if len(held) > 3 else ''}): choose a new or empty directory, or remove it first")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def load_config(
    cls: type[T],
    recipe: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    section: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Builds `cls` from `defaults`, then the recipe (or its `section` mapping), then `overrides`.

    Command-line strings are converted to each field's declared type; YAML values are checked
    against it. Unknown keys fail with the closest valid names.
    """
    values: dict[str, Any] = dict(defaults or {})
    source = "defaults"
    if recipe is not None:
        data = read_recipe(recipe)
        if section is not None and isinstance(data.get(section), dict):
            data = data[section]
        values.update(data)
        source = str(recipe)
    if overrides:
        ov = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        values.update(ov)
        if ov:
            source = f"{source} + command line" if recipe else "command line"
    return build_config(cls, values, source)


def build_config(cls: type[T], values: Mapping[str, Any], source: str = "config") -> T:
    """Checks `values` against `cls`'s fields and instantiates it."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}' for {cls.__name__}{hint}")
        if key in _FIELD_READERS:  # already the field's final value (no second reading of "none")
            try:
                kwargs[key] = _FIELD_READERS[key](value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            continue
        kwargs[key] = coerce(value, hints.get(key, Any), key, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:
        # ArithmeticError: library __post_init__s divide by the values they are given (TRL's GRPOConfig
        # takes `generation_batch_size % num_generations`), so a zero there is the user's, not a bug
        raise ConfigError(f"{source}: invalid {cls.__name__}: {e}") from None


def _read_report_to(value: Any) -> Any:
    from .trainer_args import normalize_report_to

    return normalize_report_to(value)


def _read_resume(value: Any) -> str | None:
    from .trainer_args import normalize_resume

    return normalize_resume(value)


def _read_scale_rewards(value: Any) -> str:
    from .trainer_args import normalize_scale_rewards

    return normalize_scale_rewards(value)


# Fields read as TRL/transformers read them rather than by their declared type (SFT, GRPO, RM):
# `--report_to none` means no integration there, while coercing to `str | None` would make it None,
# which transformers turns into `[None]` and rejects when the trainer is built.
# `resume_from_checkpoint` is `str | None` in transformers, but a YAML `true` or a bare
# `--resume_from_checkpoint` flag (a bool) means "the newest checkpoint" to posttrain.checkpoints.
# GRPO's `scale_rewards` is `str` in TRL, which documents `true` / `false` for it too.
_FIELD_READERS: dict[str, Any] = {"report_to": _read_report_to, "resume_from_checkpoint": _read_resume,
                                  "scale_rewards": _read_scale_rewards}

# org/name, as the Hub spells a repository id
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def require_model_dir(
    path: str | os.PathLike | None,
    field: str = "model_name_or_path",
    *,
    required_hint: str = "",
    allow_hub: bool = False,
) -> None:
    """The one check of a model path before anything is loaded (sft, grpo, rm, eval): a missing or
    mistyped directory is a `ConfigError` naming it, not transformers' "Repo id must use
    alphanumeric chars" traceback. With `allow_hub`, an `org/name` id whose first part is not a
    local directory is left for transformers to fetch from the Hub. A local directory must hold a
    `config.json` that is a JSON object (an empty or half-written directory otherwise fails deep in
    transformers or vLLM)."""
    if path is None or not os.fspath(path).strip():
        raise ConfigError(f"{field} is required" + (f" ({required_hint})" if required_hint else ""))
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            if (local / "adapter_config.json").is_file():  # a LoRA run's checkpoint-N: peft alone misloads it
                raise ConfigError(f"{field}: {text} is a LoRA checkpoint (adapter weights only, no config.json); "
                                  f"make it a full model with `dsv3-posttrain export {text} --output OUT` and use OUT")
            raise ConfigError(f"{field}: {text} is not a checkpoint directory (no config.json in it)")
        try:
            data = json.loads(config.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"{field}: cannot read {config}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{field}: {config}: not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{field}: {config}: invalid JSON ({e.msg} at line {e.lineno}, "
                              f"column {e.colno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{field}: {config}: expected a JSON object, got {type(data).__name__}")
        return
    if local.exists():
        raise ConfigError(f"{field}: {text} is a file, not a checkpoint directory")
    if allow_hub and _HUB_ID.match(text) and not Path(text.split("/")[0]).is_dir():
        problem = _hub_model_problem(text)
        if problem is None:
            return
        raise ConfigError(f"{field}: no checkpoint directory at {text}, nor a Hub model of that id ({problem})")
    hub = " (and not a Hub id of the form org/name)" if allow_hub else ""
    raise ConfigError(f"{field}: no checkpoint directory at {text}{hub}")


def _hub_model_problem(repo_id: str) -> str | None:
    """None when the Hub, or its local cache when offline, has `repo_id`'s config.json (what from_pretrained reads
    first); else why not, in one line. A missing local path such as runs/tiny-model (no ./runs yet) has the form of
    a Hub id: left to transformers, it ended in an OSError traceback once the Hub lookup failed."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "config.json")
    except Exception as e:  # no such repository, a gated one, offline and not cached, ...: all the user's to fix
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    return None


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def coerce(value: Any, tp: Any, key: str, source: str = "config") -> Any:
    """Converts `value` to `tp` or raises a `ConfigError` naming `key` and the expected type."""
    if (key.endswith("_kwargs") and isinstance(value, str) and _has_mapping(tp)
            and value.strip().lower() not in ("none", "null") and not value.strip().startswith("{")):
        # transformers/TRL type their `*_kwargs` fields `dict | str` only so that a command line can give
        # JSON; any other text would be kept as a string and fail as `**kwargs` deep in the run
        raise ConfigError(f"{source}: '{key}' expects a mapping of keyword arguments, written as JSON or YAML "
                          f"(e.g. --{key} '{{\"name\": 1.0}}'), got {value!r}")
    try:
        return _coerce(value, tp)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: '{key}' expects {type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _coerce(value: Any, tp: Any) -> Any:
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        if isinstance(value, str) and value.strip().startswith("{") and _has_mapping(tp):
            # a mapping written as text is read as one or rejected, never kept as a `str` alternative
            return _coerce(value, next(a for a in args if _is_mapping(a)))
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, arg)
            except (ValueError, TypeError):
                continue
        raise TypeError
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = _parse_str_collection(value, list)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if isinstance(value, str):
            value = _parse_str_collection(value, dict)
        if not isinstance(value, dict):
            raise TypeError
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.replace("_", ""))
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        return tp(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError
    return value


def _is_mapping(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) in (dict, Mapping, typing.Mapping)


def _has_mapping(tp: Any) -> bool:
    """`tp` is a mapping type, or a union with one."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(tp))
    return _is_mapping(tp)


def _parse_str_collection(text: str, kind: type) -> Any:
    text = text.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise ValueError(f"neither JSON nor YAML: {text!r}") from None
    if kind is list:
        return [t.strip() for t in text.split(",") if t.strip()]
    raise TypeError


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (for run manifests and reports)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, enum.Enum):
            v = v.value
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[f.name] = v
    return out


def describe_fields(cls: type, own_only: bool = False, exclude: Sequence[str] = ()) -> str:
    """`--help` text for a config class: one line per field with type, default and help."""
    lines = []
    skip = set(exclude)
    if own_only:
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                skip |= {f.name for f in dataclasses.fields(base)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            "(computed)" if f.default_factory is dataclasses.MISSING else f.default_factory()
        )
        help_text = f.metadata.get("help", "")
        lines.append(f"  --{f.name} {type_name(hints.get(f.name, Any))} (default: {default!r})\n      {help_text}")
    return "\n".join(lines)
