"""FP8 in SFT and GRPO runs: ``fp8: true`` recipes, and DeepSeek FP8 checkpoints in and out.

The one place where the FP8 building blocks of this package meet the trainers:

* :func:`load_pretrained` -- ``from_pretrained`` for training that also takes a DeepSeek FP8
  checkpoint (``quantization_config.quant_method: fp8``): its FP8 weights are dequantized by
  :func:`~posttrain.fp8.checkpoint.open_fp8_checkpoint` (128x128 blocks, ceil-divided, one
  tensor at a time as transformers loads it) into high-precision master weights (report
  §3.3: master weights stay high precision).
  transformers 5.19 cannot be used for this: on a machine without an FP8-capable GPU its
  ``FineGrainedFP8`` quantizer switches to ``dequantize=True``, and ``Fp8Dequantize``
  (integrations/finegrained_fp8.py) derives the block as ``rows // scale_rows`` -- the
  576-row ``kv_a_proj_with_mqa`` with its 5-row scale grid fails to load ("Weight shape
  (576, ...) not divisible by scale grid"), and shapes that happen to divide come out with
  the wrong block. The model remembers where it came from (``FP8_SOURCE_ATTR``), and TRL's
  GRPO reference model, which TRL loads itself from ``config._name_or_path``, is routed
  through the same loader (:func:`install_trl_reference_loader`).
* :func:`apply_fp8_training` -- after the trainer is built: ``fp8: true`` puts the
  attention projections (MLA ``q_a/q_b/kv_a/kv_b/o``), the dense MLP, the shared experts
  and the routed experts (also inside the MTP block) on the FP8 layers of
  :mod:`.linear` / :mod:`.experts` (report §3.3.2); embeddings, ``lm_head``, the router
  (``mlp.gate``) and its bias, norms and MTP ``eh_proj`` stay high precision (§3.3.1).
  ``fp8_bf16_moments`` makes AdamW keep its moments in bf16 (§3.3.3).
* :func:`finalize_fp8_export` -- after the final save: a model loaded from an FP8 checkpoint
  is written back in that checkpoint's own format (:func:`~.checkpoint.save_fp8_checkpoint`:
  same shards, ``weight_scale_inv``, ``quantization_config``, other tensors in their stored
  dtypes). Intermediate ``checkpoint-N`` directories keep the high-precision master weights:
  they exist to resume from, and resuming from re-quantized weights would not be exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UserError
from ..modeling import unwrap_model
from .checkpoint import FP8CheckpointMeta, open_fp8_checkpoint, save_fp8_checkpoint
from .layout import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, read_config
from .linear import FP8Recipe, swap_linears_to_fp8

__all__ = [
    "FP8_SOURCE_ATTR",
    "apply_fp8_training",
    "check_checkpoint",
    "finalize_fp8_export",
    "fp8_row_multiple",
    "fp8_source",
    "install_trl_reference_loader",
    "is_fp8_checkpoint",
    "load_pretrained",
]

log = logging.getLogger(__name__)

FP8_SOURCE_ATTR = "_posttrain_fp8_source"
FP8_BACKWARDS = ("fp8", "bf16")
ASYNC_LOAD_ENV = "HF_DEACTIVATE_ASYNC_LOAD"  # read by transformers at each load


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")  # from_pretrained's, passed on to the Hub


def _checkpoint_config(path: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """``config.json`` of a local directory, or of a Hub id (fetched as from_pretrained would); {} if unreadable."""
    if Path(path).is_dir():
        return read_config(path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = json.loads(Path(hf_hub_download(str(path), CONFIG_FILE, **hub_kwargs)).read_text())
    except (OSError, ValueError, EntryNotFoundError):  # no such repo, offline and not cached, not a repo id ...
        return {}  # from_pretrained then says what is wrong
    return config if isinstance(config, dict) else {}


def is_fp8_checkpoint(path: str | os.PathLike | None, **hub_kwargs: Any) -> bool:
    """True for a checkpoint (a local directory or a Hub id) whose ``config.json`` declares DeepSeek's block FP8."""
    if not path:
        return False
    qc = _checkpoint_config(path, **hub_kwargs).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "fp8"


def fp8_row_multiple(device_type: str) -> int | None:
    """The token count a packed row is padded to a multiple of when FP8 layers train on ``device_type``.

    On CUDA, 128 (one FP8 tile). ``F.scaled_mm`` gets M padded to 16 and K to 128 (posttrain.fp8.gemm), and
    the wgrad GEMM contracts over tokens. So a row of, say, 8177 tokens makes every FP8 linear copy its
    activation, its output gradient and both wgrad operands into padded buffers, at every step: 4 copies
    and their scale grids per layer. A pad segment of at most 127 tokens costs less than that.
    The pad segment is never a target, is excluded from the expert counts, and attends only to itself
    (posttrain.sft.packing.PackedCollator). Elsewhere the reference GEMM takes any shape: None."""
    from .gemm import TILE

    return TILE if device_type == "cuda" else None


def check_fp8_fields(cfg: Any) -> None:
    """Validate the ``fp8*`` recipe fields (called from the recipe configs' ``__post_init__``)."""
    if getattr(cfg, "fp8_backward", "fp8") not in FP8_BACKWARDS:
        raise ConfigError(f"fp8_backward must be one of {FP8_BACKWARDS}, got {cfg.fp8_backward!r}")
    if not getattr(cfg, "fp8", False) and getattr(cfg, "fp8_backward", "fp8") != "fp8":
        # it picks the backward of the FP8 layers; without fp8 there are none, and it was ignored without a word
        raise ConfigError(f"fp8_backward={cfg.fp8_backward!r} sets the backward of FP8 layers, which only fp8: true "
                          "creates; set fp8: true, or leave fp8_backward unset")


# --- loading ---------------------------------------------------------------------------------------


def load_pretrained(cls: type, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)``, except that a DeepSeek FP8 checkpoint is dequantized by our loader.

    For an FP8 checkpoint the weights come in as ``kwargs["dtype"]`` (default fp32) master
    weights, ``quantization_config`` is dropped from the live config (so intermediate
    checkpoints are plain high-precision ones), and the checkpoint's metadata is kept on the
    model for :func:`finalize_fp8_export`. (GRPO's trainer installs :func:`install_trl_reference_loader`, so that
    TRL's reference model loads the same way.)

    Before anything is built, :func:`check_checkpoint` turns what the user can fix (no such directory, no
    or corrupt weight files, a config.json that is not JSON or not of ``cls``'s model_type) into a
    one-line :class:`~posttrain.errors.UserError`; so is a config field of the wrong type, weights whose
    shapes do not match config.json, and weights the model has but the checkpoint lacks (transformers
    would initialise them randomly and only warn). ``output_loading_info=True`` returns ``(model, info)``
    as transformers does.
    """
    if isinstance(path, str) and path.startswith("~"):
        path = os.path.expanduser(path)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
    check_checkpoint(path, cls, config=kwargs.get("config"), **hub_kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    with _user_errors(path):
        if is_fp8_checkpoint(path, **hub_kwargs):
            model, info = _load_fp8(cls, path, kwargs, hub_kwargs)
        else:
            model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    _check_loading_info(path, model, info)
    return (model, info) if want_info else model


def _load_fp8(cls: type, path: str | os.PathLike, kwargs: dict[str, Any],
              hub_kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    if not Path(path).is_dir():
        # a Hub id (deepseek-ai/DeepSeek-V3 is block FP8): our loader reads local shards, so fetch them as
        # from_pretrained would; left to transformers they go through the dequantizer this loader replaces
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"], **hub_kwargs)
        for k in _HUB_KWARGS:
            kwargs.pop(k, None)
        check_checkpoint(path, cls, config=kwargs.get("config"))  # the files, now that they are here
    from transformers import AutoConfig, GenerationConfig

    dtype = kwargs.pop("dtype", torch.float32)
    if dtype in (None, "auto"):
        dtype = torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    for unsupported in ("quantization_config", "state_dict"):
        if kwargs.pop(unsupported, None) is not None:
            raise ValueError(f"{unsupported} cannot be given when loading the FP8 checkpoint {path}")
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # lazy tensors: transformers materializes (dequantizes) one at a time, so the load never holds
    # a second high-precision copy of the model
    state, meta = open_fp8_checkpoint(path, dtype)
    if not hasattr(cls, "mtp_layers"):
        # transformers' own class builds no MTP module (it would drop these keys with a warning)
        n = config.num_hidden_layers
        state = {k: v for k, v in state.items() if not _is_layer_at_or_after(k, n)}
    with _materialize_one_tensor_at_a_time():
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                          output_loading_info=True, **kwargs)
    del state
    model.config._name_or_path = str(path)  # TRL builds the GRPO reference model from it
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    setattr(model, FP8_SOURCE_ATTR, meta)
    log.info("loaded FP8 checkpoint %s: %d FP8 weights dequantized to %s master weights",
             path, len(meta.fp8_weights), str(dtype).replace("torch.", ""))
    return model, info


_WEIGHT_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers still loads these
DEEPSEEK_V3 = "deepseek_v3"


def _looks_local(path: str) -> bool:
    """A path the user meant as a directory (a Hub id is ``name`` or ``org/name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _expected_model_type(cls: type) -> str | None:
    return getattr(getattr(cls, "config_class", None), "model_type", None) or None


def check_checkpoint(path: str | os.PathLike, cls: type | None = None, *, config: Any = None,
                     **hub_kwargs: Any) -> None:
    """Raise a one-line :class:`~posttrain.errors.UserError` naming the file for what a user can fix in the
    checkpoint ``path`` before ``cls.from_pretrained`` reads it: no such directory, no or unreadable
    ``config.json``, a model_type other than ``cls``'s (``deepseek_v3``: a Llama checkpoint, or a V3 one
    relabelled, would load with its routed experts randomly initialised), no weight files, an index naming
    missing shards, a safetensors file whose header is corrupt or that is truncated. Only the headers are
    read. For a Hub id only the model_type is checked (from its config.json, as from_pretrained fetches it).
    ``cls`` None: any model_type. ``config``: the config object the caller passes to from_pretrained (its
    model_type is the one checked)."""
    p = str(path)
    local = Path(p)
    if not local.is_dir():
        if local.exists():
            raise UserError(f"{p}: not a directory (a model checkpoint is a directory with config.json and "
                            "model*.safetensors)")
        if _looks_local(p):
            raise UserError(f"{p}: no such directory")
        _check_model_type(p, cls, config, _checkpoint_config(p, **hub_kwargs))  # a Hub id
        return
    config_file = local / CONFIG_FILE
    config_dict: dict | None = None
    if config is None:
        if not config_file.is_file():
            raise UserError(f"{p}: no {CONFIG_FILE}; not a model checkpoint directory")
        try:
            config_dict = json.loads(config_file.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config_dict, dict):
            raise UserError(f"{config_file}: not a JSON object")
    _check_model_type(p, cls, config, config_dict)
    _check_weight_files(local)


def _check_model_type(path: str, cls: type | None, config: Any, config_dict: dict | None) -> None:
    want = _expected_model_type(cls) if cls is not None else None
    if want is None:  # no class (a distillation teacher may be any model), or one without a model_type
        return
    if config is not None:
        got, where = getattr(config, "model_type", None), f"{path}: config"
    elif config_dict:
        got, where = config_dict.get("model_type"), f"{path}/{CONFIG_FILE}" if Path(path).is_dir() else path
    else:
        return  # a Hub id whose config.json could not be fetched: from_pretrained says why
    if got == want:
        return
    have = f"model_type {got!r}" if got else "no model_type"
    if want == DEEPSEEK_V3:
        raise UserError(f"{where}: {have}; this toolkit trains DeepSeek-V3-architecture checkpoints "
                        f"(model_type '{DEEPSEEK_V3}')")
    raise UserError(f"{where}: {have}; {cls.__name__} loads model_type {want!r}")


def _check_weight_files(d: Path) -> None:
    from safetensors import SafetensorError, safe_open

    files: list[Path] = []
    index = d / INDEX_FILE
    if (d / SINGLE_FILE).is_file():
        files.append(d / SINGLE_FILE)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index (JSON with a weight_map of tensor -> file): "
                            f"{type(e).__name__}: {e}") from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(f"{index}: names {missing[0]}{more}, not in {d}")
        files += [d / s for s in shards]
    if not files:
        if any((d / f).is_file() for f in _TORCH_WEIGHTS):
            return  # transformers' pickle format: from_pretrained reads it
        shards = sorted(f.name for f in d.glob("model-*-of-*.safetensors") if _WEIGHT_SHARD.match(f.name))
        if shards:
            raise UserError(f"{d}: {shards[0]} ... but no {INDEX_FILE} to say which tensor is in which shard")
        raise UserError(f"{d}: no weight files ({SINGLE_FILE} or model-*-of-*.safetensors with {INDEX_FILE})")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except SafetensorError as e:  # reads the header only; a truncated file fails the size check too
            problem = str(e).removeprefix("Error while deserializing header: ")
            raise UserError(f"{f}: not a valid safetensors file ({problem})") from None


@contextlib.contextmanager
def _user_errors(path: str | os.PathLike) -> Iterator[None]:
    """The failures of ``from_pretrained`` that are the checkpoint's, as one-line UserErrors naming it."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    try:
        yield
    except StrictDataclassFieldValidationError as e:
        # "Validation error for field 'hidden_size':\n    TypeError: Field 'hidden_size' expected int, got str ..."
        problem = re.sub(r"^\w+Error: ", "", str(e).strip().splitlines()[-1].strip())
        where = f"{path}/{CONFIG_FILE}" if Path(path).is_dir() else str(path)
        raise UserError(f"{where}: {problem}") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise UserError(f"{path}: weights of another shape than {CONFIG_FILE} gives them (transformers' load "
                        "report above lists them as MISMATCH; a routed-expert stack of the wrong size means "
                        "experts missing from the checkpoint)") from None


def _check_loading_info(path: str | os.PathLike, model: nn.Module, info: Mapping[str, Any]) -> None:
    """Weights the model has and the checkpoint lacks were initialised randomly: an error, not a warning.
    (What a class legitimately adds, e.g. the reward model's score head, is in its
    ``_keys_to_ignore_on_load_missing`` and not reported.)"""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    hint = ""
    n_main = getattr(model.config, "num_hidden_layers", None)
    if n_main is not None and all(_is_layer_at_or_after(k, n_main) for k in missing):
        hint = (f"; config.json has num_nextn_predict_layers: {getattr(model.config, 'num_nextn_predict_layers', 0)} "
                "but the checkpoint has no such MTP module (set it to 0 to train without MTP)")
    raise UserError(f"{path}: the checkpoint lacks {len(missing)} of the model's weights ({shown}); they would "
                    f"be initialised randomly{hint}")


@contextlib.contextmanager
def _materialize_one_tensor_at_a_time() -> Iterator[None]:
    """transformers (5.x, core_model_loading) materializes the state dict's lazy values on a thread
    pool that runs ahead of the loop consuming them; a materialized value here is a freshly
    dequantized tensor, so run-ahead would hold a second high-precision copy of much of the model.
    ``HF_DEACTIVATE_ASYNC_LOAD`` makes it materialize each value when it is consumed."""
    previous = os.environ.get(ASYNC_LOAD_ENV)
    os.environ[ASYNC_LOAD_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ASYNC_LOAD_ENV, None)
        else:
            os.environ[ASYNC_LOAD_ENV] = previous


def _is_layer_at_or_after(name: str, n: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n


def install_trl_reference_loader() -> None:
    """Make TRL's GRPO load its reference model from an FP8 checkpoint through :func:`load_pretrained`.

    trl 1.16's ``GRPOTrainer.__init__`` builds the reference model (``beta > 0``) with
    ``create_model_from_path(config._name_or_path, ...)``, i.e. transformers' FP8 loading (see
    the module docstring). FP8 checkpoints go through :func:`load_pretrained` instead, every other
    path to TRL's own function (``engines.compat.apply_trl_reference_loader``). Idempotent.
    """
    from engines.compat import apply_trl_reference_loader

    def load_reference(model_id: str, architecture: type | None = None, **kwargs: Any) -> nn.Module:
        import transformers

        if architecture is None:
            arch_name = (read_config(model_id).get("architectures") or ["DeepseekV3ForCausalLM"])[0]
            architecture = getattr(transformers, arch_name)
        kwargs.setdefault("device_map", None)
        return load_pretrained(architecture, model_id, **kwargs)

    apply_trl_reference_loader(is_fp8_checkpoint, load_reference)


def fp8_source(model: nn.Module) -> FP8CheckpointMeta | None:
    """The FP8 checkpoint ``model`` was loaded from by :func:`load_pretrained` (through PEFT/accelerate wrappers)."""
    return getattr(unwrap_model(model), FP8_SOURCE_ATTR, None)


# --- training ---------------------------------------------------------------------------------------


def apply_fp8_training(trainer: Any, cfg: Any) -> dict[str, Any]:
    """Apply the recipe's ``fp8`` / ``fp8_backward`` / ``fp8_bf16_moments`` to a built trainer; returns a summary.

    Call it once, after the trainer is constructed and before ``train()`` (layers are swapped
    in place and share their ``Parameter`` objects, so the optimizer, checkpoints and weight
    sync see the same tensors). A no-op summary for recipes without FP8.
    """
    model = unwrap_model(trainer.model, through_peft=False)  # LoRA is detected below
    source = fp8_source(model)
    summary: dict[str, Any] = {
        "fp8": bool(getattr(cfg, "fp8", False)),
        "fp8_linear_layers": 0,
        "fp8_expert_modules": 0,
        "fp8_backward": getattr(cfg, "fp8_backward", "fp8"),
        "bf16_moments": bool(getattr(cfg, "fp8_bf16_moments", False)),
        "fp8_checkpoint_in": source is not None,
    }
    if summary["fp8"]:
        if hasattr(model, "peft_config") or hasattr(model, "get_base_model"):
            raise ConfigError("fp8: true is not supported together with use_lora (LoRA wraps the Linear layers)")
        check_fp8_fields(cfg)
        swapped = swap_linears_to_fp8(model, recipe=FP8Recipe(backward=summary["fp8_backward"]))
        experts = [n for n in swapped if not isinstance(model.get_submodule(n), nn.Linear)]
        summary["fp8_linear_layers"] = len(swapped) - len(experts)
        summary["fp8_expert_modules"] = len(experts)
        if not swapped:
            raise ConfigError("fp8: true found no attention / MLP / expert projection to put on FP8 layers")
    if summary["bf16_moments"]:
        _use_bf16_moments(trainer, cfg)
    if summary["fp8"] or summary["bf16_moments"] or source is not None:
        log.info(
            "FP8 (DeepSeek-V3 report §3.3): %d Linear layers and %d fused expert modules on FP8 layers%s; "
            "embeddings, lm_head, router, norms and MTP eh_proj in %s; AdamW moments in %s; final export: %s",
            summary["fp8_linear_layers"], summary["fp8_expert_modules"],
            f" (backward: {summary['fp8_backward']})" if summary["fp8"] else "",
            str(next(model.parameters()).dtype).replace("torch.", ""),
            "bf16" if summary["bf16_moments"] else "the parameter dtype",
            "FP8 (input checkpoint format)" if source is not None else "high precision",
        )
    return summary


def _use_bf16_moments(trainer: Any, cfg: Any) -> None:
    """AdamW with bf16 first/second moments (report §3.3.3), built lazily by the Trainer like its own AdamW."""
    from .optim import AdamWLowPrecisionMoments

    optim = str(getattr(cfg.optim, "value", cfg.optim))
    if not optim.startswith("adamw"):
        raise ConfigError(f"fp8_bf16_moments replaces AdamW, but optim is {optim!r}")
    if getattr(trainer, "optimizer", None) is not None:
        raise ConfigError("fp8_bf16_moments: the trainer already has an optimizer")
    trainer.optimizer_cls_and_kwargs = (
        AdamWLowPrecisionMoments,
        {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
         "moment_dtype": torch.bfloat16},
    )


# --- export ---------------------------------------------------------------------------------------


class _SavedTensors(Mapping):
    """The tensors of a saved safetensors directory, read one at a time (mmap), by name."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.files = sorted(directory.glob("*.safetensors"))
        self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self._alias: dict[str, str] = {}  # name -> the saved tensor it is a copy of

    def add_alias(self, name: str, of: str) -> None:
        self._alias[name] = of
        self._where[name] = self._where[of]

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._alias.get(name, name)
        return self._where[source].get_tensor(source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._where.clear()
        self._handles.clear()


_MTP_SHARED_COPY = {re.compile(r"model\.layers\.\d+\.embed_tokens\.weight"): "model.embed_tokens.weight",
                    re.compile(r"model\.layers\.\d+\.shared_head\.head\.weight"): "lm_head.weight"}


def _mtp_shared_copies(checkpoint_names: Iterable[str], saved: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """DeepSeek's release stores the MTP layer's embedding and output head as copies of the main model's
    (README_WEIGHTS: they are shared); the model here shares them and saves neither. Each such name of
    the checkpoint that the saved tensors lack -> the main model's tensor it copies."""
    out = {}
    for name in checkpoint_names:
        if name in saved:
            continue
        for pattern, of in _MTP_SHARED_COPY.items():
            if pattern.fullmatch(name) and of in saved:
                out[name] = of
    return out


def finalize_fp8_export(model: nn.Module, output_dir: str | os.PathLike, *, main_process: bool = True) -> bool:
    """Rewrite the model just saved to ``output_dir`` in its FP8 input checkpoint's format; False if not FP8-loaded.

    Reads the high-precision DeepSeek-layout tensors that ``save_pretrained`` / ``Trainer.save_model``
    wrote (so it works whatever gathered them, FSDP included), re-quantizes the FP8 weights per
    128x128 block with the source's block size and scale format (an unchanged weight keeps its
    original bits and scale), casts every other tensor back to its stored dtype, writes the
    source's shard layout, index and ``config.json`` (``quantization_config`` included), and
    removes the high-precision weight files. Only ``main_process`` writes.
    """
    meta = fp8_source(model)
    if meta is None or not main_process:
        return meta is not None
    out = Path(output_dir)
    saved = _SavedTensors(out)
    if not saved.files:
        raise FileNotFoundError(f"no saved safetensors in {out} to export as FP8")
    hp_files = {f.name for f in saved.files}
    if meta.source_dir is not None and meta.source_dir.resolve() == out.resolve():
        # the source shards were just overwritten: no original bits to compare with, re-quantize all
        meta = replace(meta, source_dir=None)
    for name, of in _mtp_shared_copies(meta.layout.weight_map, saved).items():
        saved.add_alias(name, of)
    try:
        # side files (tokenizer ...) are the trainer's to write; the source's could be stale run outputs
        save_fp8_checkpoint(saved, meta, out, side_files=False)
    finally:
        saved.close()
    keep = set(meta.layout.shards())
    for name in hp_files - keep:
        (out / name).unlink(missing_ok=True)
    if not meta.layout.indexed:
        (out / INDEX_FILE).unlink(missing_ok=True)
    log.info("exported %s as FP8 (%d FP8 weights, block %s, layout of %s)",
             out, len(meta.fp8_weights), list(meta.block), meta.source_dir)
    return True

