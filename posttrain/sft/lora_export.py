"""`dsv3-posttrain export`: a LoRA SFT `checkpoint-N` (peft adapter + the balancer's state) turned into the
full model directory the end of the run would have written (`export.export_model`: merged weights, the
routers' moved `e_score_correction_bias`, DeepSeek layout, FP8 again for an FP8 base).

Loading the adapter with peft alone does not give the trained model: on transformers 5 peft remaps the
`gate_proj` / `up_proj` / `down_proj` targets of a V3 model onto the fused routed experts (the adapters of
the dense and shared-expert MLPs are dropped; `engines.compat.plain_lora_targets`), and the routers'
correction biases, which train under LoRA too, are not in the adapter but in the balancer's state
(`moe_balancer.pt`)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft's SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME


def export_lora_checkpoint(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike,
                           base: str | os.PathLike | None = None) -> Path:
    """Writes `checkpoint_dir`'s model (base + adapter merged, the checkpoint's router biases) + tokenizer
    to `output_dir`. `base` defaults to the adapter config's `base_model_name_or_path`.
    Every problem with the inputs is a `UserError` naming the path."""
    from engines.compat import plain_lora_targets
    from peft import PeftModel

    from ..balancing import BALANCER_STATE_FILE, ExpertLoadBalancer
    from ..fp8.training import load_pretrained
    from ..modeling import DeepseekV3ForCausalLMWithMTP
    from ..recipe import require_empty_output, require_model_dir
    from .export import export_model

    ckpt = Path(checkpoint_dir).expanduser()
    adapter = read_adapter_config(ckpt)
    named_by = None
    if base is None:
        base = adapter.get("base_model_name_or_path")
        named_by = ckpt / ADAPTER_CONFIG
        if not base or base == "None":  # "None": peft's record of an FP8 base before record_base_model
            raise UserError(f"{named_by} names no base model (base_model_name_or_path): give it with --base DIR")
    base = os.fspath(base)
    try:
        require_model_dir(base, "base", allow_hub=True)
    except UserError as e:
        if named_by is None:
            raise
        raise UserError(f"{e}; that is the base named in {named_by}: give the base model with --base DIR") from None
    out = Path(output_dir).expanduser()
    for name, path in (("the checkpoint", ckpt), ("the base model", Path(base).expanduser())):
        if path.is_dir() and out.resolve() == path.resolve():
            raise UserError(f"--output {output_dir} is {name}'s directory: write the export elsewhere")
    require_empty_output(output_dir)

    model = load_pretrained(DeepseekV3ForCausalLMWithMTP, base, dtype=_training_dtype(ckpt))  # FP8: dequantized
    try:
        with plain_lora_targets():  # the adapters on the modules they were trained on
            model = PeftModel.from_pretrained(model, str(ckpt))
    except RuntimeError as e:  # size mismatches: another model's adapter
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise UserError(f"{ckpt}: the adapter does not fit {base} ({first}); is it the model this run "
                        "trained?") from None
    # the routers' biases as the run left them at this step: the balancer's own state loader
    balancer = ExpertLoadBalancer(model, bias_update_speed=0.0, history_interval=0)
    try:
        loaded = balancer.load(ckpt)
    except ValueError as e:  # its MoE layers are not the base's
        raise UserError(f"{ckpt}: {e}; is {base} the model this run trained?") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch.load of a damaged file
        raise UserError(f"{ckpt / BALANCER_STATE_FILE}: cannot load it ({e})") from None
    finally:
        balancer.remove()
    if not loaded:
        log.info("%s has no balancer state (a run without balancing): the routers' biases are the base's", ckpt)
    tokenizer = _tokenizer(ckpt, base)
    return export_model(model, tokenizer, out)  # merges; FP8 base: written back as FP8 (finalize_fp8_export)


def read_adapter_config(ckpt: Path) -> dict:
    """`ckpt`'s adapter config; a `UserError` when `ckpt` is not a LoRA checkpoint directory."""
    if not ckpt.is_dir():
        what = "is a file" if ckpt.exists() else "does not exist"
        raise UserError(f"{ckpt} {what}: expected a LoRA checkpoint directory (checkpoint-N of an SFT run "
                        "with use_lora)")
    config = ckpt / ADAPTER_CONFIG
    if not config.is_file():
        if (ckpt / "config.json").is_file():
            raise UserError(f"{ckpt} is a full model checkpoint, not a LoRA one (no {ADAPTER_CONFIG}): it loads "
                            "in transformers and vLLM as it is, nothing to export")
        raise UserError(f"{ckpt} holds no LoRA adapter (no {ADAPTER_CONFIG}): expected a checkpoint-N of an SFT "
                        "run with use_lora")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config}: cannot read it ({e})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{config}: not a LoRA adapter config (peft_type {kind!r})")
    if not any((ckpt / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"{ckpt} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return data


def _training_dtype(ckpt: Path) -> torch.dtype:
    """The dtype the run loaded the base in (its `model_init_kwargs`, recorded in run_config.json), which is
    the dtype of its final model: fp32 unless the recipe said otherwise."""
    import torch

    from ..checkpoints import RUN_CONFIG_FILE

    try:
        settings = json.loads((ckpt / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return torch.float32
    kwargs = settings.get("model_init_kwargs") if isinstance(settings, dict) else None
    dtype = kwargs.get("dtype") if isinstance(kwargs, dict) else None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    return torch.float32


def _tokenizer(ckpt: Path, base: str):
    """The checkpoint's tokenizer (the trainer saves it there), else the base's; with the pad token the SFT run's
    tokenizer had (its final model has it too)."""
    from ..tokenizer import load_checkpoint_tokenizer

    from_checkpoint = (ckpt / "tokenizer_config.json").is_file()
    return load_checkpoint_tokenizer(str(ckpt) if from_checkpoint else base, "checkpoint" if from_checkpoint else "base")
