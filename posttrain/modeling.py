"""DeepSeek-V3 with its Multi-Token Prediction module, trainable.

transformers' `DeepseekV3ForCausalLM` builds no MTP module and drops the checkpoint's MTP keys;
its generic `MtpModel` (modeling_layers.py) is inference-only, names the block `mtp_block` and
re-indexes the MTP layer from 0 (which would make it a dense layer for V3). So this module adds
the V3 MTP module (report §2.2) as `model.layers[num_hidden_layers + k]`: `DeepseekV3Model.forward`
only runs `layers[:num_hidden_layers]`, and the parameter names are exactly the DeepSeek
checkpoint layout (`model.layers.{N}.enorm`, `.hnorm`, `.eh_proj`, the decoder block's own
`self_attn`/`mlp`/norms, `.shared_head.norm`), so `save_pretrained`/`from_pretrained` write and
read the layout vLLM's `deepseek_mtp` expects, per-expert names included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
)

from posttrain.lm_loss import IGNORE_INDEX, lm_head_cross_entropy
from posttrain.mla_attention import use_fused_mla
from posttrain.rms_norm import use_fused_rms_norm
from posttrain.routed_experts import use_fused_experts
from posttrain.swiglu import use_fused_mlp


def use_fused_kernels(model: nn.Module) -> None:
    """The toolkit's fused kernels for every module of ``model`` that has one, in place (same parameters and
    state-dict keys). Each runs on CUDA after its start-up check and is transformers' own code elsewhere."""
    use_fused_rms_norm(model)  # torch's fused RMSNorm kernel
    use_fused_experts(model)  # grouped_mm experts with fused dispatch/combine kernels
    use_fused_mla(model)  # MLA's query/key assembly as one kernel each way
    use_fused_mlp(model)  # dense and shared-expert SwiGLU as one kernel each way


def autocast_attention_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, q, k, v in the autocast dtype (floating tensors other than float64, autocast's
    own rule); without autocast, unchanged.

    MLA with fp32 weights under bf16 autocast hands the attention function a float32 query (its
    rotary part is computed with cos/sin in the fp32 hidden dtype, and the concatenation with the
    bf16 no-rope part promotes) but bf16 keys and values (the key buffer is allocated like the bf16
    `kv_b_proj` output). SDPA's autocast rule casts all three, exactly this cast; flex_attention
    called through torch.compile may not, and then runs in fp32 or rejects the mix. Cast here, the
    numerics are those of SDPA under autocast: the fp32 rotary is rounded once, at the kernel."""
    device_type = query.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return query, key, value
        dtype = torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return query, key, value

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t

    return cast(query), cast(key), cast(value)


def autocast_flex_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' `flex_attention` with q, k, v in one dtype under autocast (`autocast_attention_inputs`)."""
    query, key, value = autocast_attention_inputs(query, key, value)
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_autocast_flex_attention() -> None:
    """Makes `attn_implementation="flex_attention"` run `autocast_flex_attention_forward` (idempotent).
    transformers' registry is process-wide; the wrapper changes nothing outside autocast, and under
    autocast only gives flex what SDPA's autocast rule gives SDPA. The flex mask is unchanged."""
    AttentionInterface.register("flex_attention", autocast_flex_attention_forward)


class DeepseekV3SharedHead(nn.Module):
    """The MTP module's final norm; the output projection itself is the main model's `lm_head`."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states)


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """One MTP module (DeepSeek-V3 report §2.2, eq. 21-23).

    h'_i = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))], then a full V3 decoder block (MLA + MoE),
    then the shared output head. The concatenation order (embedding first) is the one of the
    released checkpoints as read by vLLM's `deepseek_mtp`, so a module trained here drafts there.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekV3SharedHead(config)

    def forward(
        self,
        previous_hidden: torch.Tensor,
        next_token_embeds: torch.Tensor,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the block's output, the chain input of the next depth; its `shared_head` norm,
        the input of the shared output head).

        The whole module runs in this one `forward` so that wrappers that act on `forward()` calls
        see all of it: FSDP2 gathers the module's parameters in hooks around it (a separate method
        would compute on sharded parameters), activation checkpointing wraps it."""
        projected = self.eh_proj(torch.cat([self.enorm(next_token_embeds), self.hnorm(previous_hidden)], dim=-1))
        hidden = super().forward(
            projected,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            use_cache=False,
        )
        return hidden, self.shared_head(hidden)


@dataclass
class MTPCausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` is the main next-token loss only; `mtp_loss` is the mean over MTP depths (report eq. 25
    without λ, which the trainer applies so that it can be scheduled)."""

    mtp_loss: torch.Tensor | None = None
    mtp_logits: tuple[torch.Tensor, ...] | None = None


def unwrap_model(model: nn.Module, *, through_peft: bool = True) -> nn.Module:
    """The model inside accelerate/DDP (`.module`) and torch.compile (`_orig_mod`) wrappers and,
    with `through_peft`, PEFT's (`get_base_model()`)."""
    m = model
    while True:
        if isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        elif isinstance(getattr(m, "_orig_mod", None), nn.Module):
            m = m._orig_mod
        elif through_peft and hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            return m


def sample_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed sample each token belongs to: a new sample starts where positions restart at 0."""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


class DeepseekV3ForCausalLMWithMTP(DeepseekV3ForCausalLM):
    """`DeepseekV3ForCausalLM` plus `config.num_nextn_predict_layers` MTP modules, trainable.

    Without MTP work (generation, plain forward) it behaves exactly as the parent class. The MTP
    loss is computed when `labels` are given and `compute_mtp` is not False. Packed rows are
    supported: sample boundaries come from `position_ids` restarting at 0, and an MTP input token
    or target never comes from another sample.
    """

    # The MTP layers are part of this model; nothing in the checkpoint is to be ignored.
    _keys_to_ignore_on_load_unexpected = None
    # transformers (5.x, `_can_set_experts_implementation`) lets a class pick its experts kernel
    # (grouped_mm by default) only if the source of the class's module applies the
    # `use_experts_implementation` decorator; this module does not, so the model silently ran the
    # per-expert Python loop ("eager"). Its experts are transformers' own decorated ones.
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        register_autocast_flex_attention()  # q, k, v of one dtype under autocast (the CUDA default kernel)
        n_main = config.num_hidden_layers
        for k in range(num_mtp_layers(config)):
            self.model.layers.append(DeepseekV3MTPLayer(config, n_main + k))
        use_fused_kernels(self)
        self.post_init()

    # ----------------------------------------------------------------------------------------
    @property
    def mtp_layers(self) -> list[DeepseekV3MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers :])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        compute_mtp: bool | None = None,
        detach_mtp_input: bool = False,
        return_logits: bool = True,
        lm_loss_backend: str = "auto",
        mtp_num_items: torch.Tensor | int | None = None,
        **kwargs,
    ) -> MTPCausalLMOutput:
        """`return_logits=False` (with `labels`): the main and MTP losses are computed by the chunked
        LM head + cross-entropy (`lm_head_cross_entropy`) and `logits` / `mtp_logits` are None; the
        `[tokens, vocab]` logits are never materialised (fp32 logits of a 16k-token row at Moonlight's
        163,840-entry vocabulary are 10 GiB per head). Same loss and gradients as the default path.
        `lm_loss_backend` picks its implementation (`posttrain.lm_loss.lm_head_cross_entropy`'s `backend`).
        `mtp_num_items`: each MTP depth's summed cross-entropy is divided by it (report eq. 24: 1/T, T the
        main loss's token count) instead of by the depth's own number of targets."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return_logits = return_logits or labels is None  # without labels the logits are the only output
        logits, loss = None, None
        if return_logits:
            logits = self.lm_head(hidden[:, slice_indices, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        else:
            # transformers' ForCausalLMLoss semantics: target of position i is labels[i + 1] (or the
            # caller's `shift_labels`), token mean, or a sum over `num_items_in_batch` when given.
            target = kwargs.get("shift_labels")
            if target is None:
                target = _shift_left(labels, 1, fill=IGNORE_INDEX)
            loss = lm_head_cross_entropy(
                hidden[:, slice_indices, :], self.lm_head, target[:, slice_indices],
                num_items=kwargs.get("num_items_in_batch"), backend=lm_loss_backend,
            )

        if compute_mtp is None:
            compute_mtp = labels is not None
        mtp_loss, mtp_logits = None, None
        if compute_mtp and self.mtp_layers:
            if input_ids is None:
                raise ValueError("MTP needs input_ids (the next tokens feed the MTP embedding).")
            mtp_logits, mtp_loss = self._mtp(
                hidden, input_ids, position_ids, labels, attention_mask, detach_mtp_input, return_logits=return_logits,
                lm_loss_backend=lm_loss_backend, num_items=mtp_num_items,
            )

        return MTPCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mtp_loss=mtp_loss,
            mtp_logits=mtp_logits,
        )

    def _mtp(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        detach_input: bool,
        return_logits: bool = True,
        lm_loss_backend: str = "auto",
        num_items: torch.Tensor | int | None = None,
    ) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        """(per-depth logits, or None with `return_logits=False` and labels; the MTP loss, the mean over
        depths of each depth's cross-entropy, report eq. 24-25 without λ: a token mean over the depth's
        targets, or the sum divided by `num_items` when given)."""
        return_logits = return_logits or labels is None
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        sample_ids = sample_ids_from_positions(position_ids)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.model.rotary_emb(hidden, position_ids)
        embed = self.model.embed_tokens
        prev = hidden.detach() if detach_input else hidden
        all_logits, losses = [], []
        for depth, layer in enumerate(self.mtp_layers, start=1):
            # Token t_{i+depth} feeds position i, but only from the same packed sample; elsewhere
            # (and at a sample's first position, as vLLM's deepseek_mtp does) the embedding is zero.
            next_ids = _shift_left(input_ids, depth, fill=0)
            same_sample = _shift_left(sample_ids, depth, fill=-1) == sample_ids
            keep = same_sample & (position_ids != 0)
            next_embeds = embed(next_ids) * keep.unsqueeze(-1).to(hidden.dtype)
            # Called as a module (not a method of it): FSDP2's unshard/reshard and activation
            # checkpointing hook `__call__`. `prev` is positional so that reentrant checkpointing
            # propagates its gradient.
            prev, head_input = layer(
                prev, next_embeds, position_embeddings=position_embeddings, attention_mask=mask, position_ids=position_ids
            )
            depth_logits = self.lm_head(head_input) if return_logits else None
            all_logits.append(depth_logits)
            if labels is not None:
                # Position i predicts t_{i+depth+1}; `labels` are unshifted (label[j] is the target
                # for token j's predecessor), so the target of position i is labels[i + depth + 1].
                target = _shift_left(labels, depth + 1, fill=IGNORE_INDEX)
                target_same = _shift_left(sample_ids, depth + 1, fill=-1) == sample_ids
                target = target.masked_fill(~target_same, IGNORE_INDEX)
                if return_logits:
                    losses.append(_token_mean_ce(depth_logits, target, num_items))
                else:
                    losses.append(lm_head_cross_entropy(head_input, self.lm_head, target, num_items=num_items,
                                                        backend=lm_loss_backend))
        mtp_loss = torch.stack(losses).mean() if losses else None
        return (tuple(all_logits) if return_logits else None), mtp_loss

    # ----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Saves as a plain `DeepseekV3ForCausalLM` checkpoint (that is the name vLLM and the Auto
        classes know); the MTP keys sit at `model.layers.{num_hidden_layers}` as in DeepSeek's release."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = os.path.join(save_directory, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                cfg = json.load(f)
            cfg["architectures"] = ["DeepseekV3ForCausalLM"]
            cfg["num_nextn_predict_layers"] = num_mtp_layers(self.config)
            with open(config_path, "w") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
        return out


def num_mtp_layers(config: DeepseekV3Config) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def _shift_left(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    out = torch.full_like(x, fill)
    if n < x.shape[-1]:
        out[..., : x.shape[-1] - n] = x[..., n:]
    return out


def _token_mean_ce(logits: torch.Tensor, target: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = target.reshape(-1)
    total = nn.functional.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is not None:
        return total / torch.as_tensor(num_items, device=total.device).clamp(min=1)
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)
