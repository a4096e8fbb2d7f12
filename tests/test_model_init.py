"""The embedded default model: a real V3-architecture checkpoint that transformers and vLLM load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, DeepseekV3ForCausalLM

from posttrain.model_init import build_meta_model, count_parameters
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP


def test_config_is_v3_with_vllm_cpu_constraints(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64  # vLLM CPU MLA: 576-wide latent
    assert cfg["q_lora_rank"] and cfg["hidden_size"] <= 256 and cfg["num_hidden_layers"] <= 4
    assert cfg["first_k_dense_replace"] == 1
    assert cfg["n_routed_experts"] >= 8 and cfg["n_shared_experts"] == 1
    assert cfg["n_routed_experts"] // cfg["n_group"] >= 2 and cfg["topk_group"] < cfg["n_group"]
    assert cfg["num_nextn_predict_layers"] == 1
    assert cfg["dtype"] == "float32"


def test_safetensors_hold_mtp_at_layer_n_in_deepseek_layout(tiny_model_dir):
    n = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    mtp = {k for k in keys if k.startswith(f"model.layers.{n}.")}
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                   "mlp.experts.0.gate_proj.weight", "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight",
                   "input_layernorm.weight", "post_attention_layernorm.weight"):
        assert f"model.layers.{n}.{suffix}" in mtp, suffix
    assert not any(".experts.gate_up_proj" in k for k in keys), "experts must be stored per expert"
    for layer in range(1, n + 1):
        assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in keys


def test_transformers_loads_without_missing_weights_and_trains(tiny_model_dir):
    model, info = DeepseekV3ForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("Mia has 3 apples. She buys 4 more.")["input_ids"]])
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad is not None
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0


def test_mtp_model_loads_everything_and_trains(tiny_model_dir):
    model, info = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(model.model.layers[2].eh_proj.weight, f.get_tensor("model.layers.2.eh_proj.weight"))
    ids = torch.randint(3, 500, (2, 24))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    (out.loss + 0.3 * out.mtp_loss).backward()
    assert model.model.layers[2].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[2].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_tokenizer_special_tokens_and_assistant_mask(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.bos_token_id == 0
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.eos_token_id == 1
    for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    msgs = [{"role": "system", "content": "Verify."}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\\boxed{5}"}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>Verify.<｜User｜>2 + 3?<｜Assistant｜><think>\n2 + 3 = 5\n</think>\n\\boxed{5}<｜end▁of▁sentence｜>"
    assistant = tok.decode([i for i, m in zip(ids, mask) if m])
    assert assistant == "<think>\n2 + 3 = 5\n</think>\n\\boxed{5}<｜end▁of▁sentence｜>"  # end-of-turn included
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜>")
    # the think tags are single tokens but not special (as in DeepSeek-R1's tokenizer): a decode that skips
    # special tokens (TRL's completions, vLLM's text, the distill teachers) keeps them; every hf-teacher
    # sample was rejected as no_think while they were special
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer, skip_special_tokens=True) == "<think>\n2 + 3 = 5\n</think>\n\\boxed{5}"


def test_same_seed_same_weights(tmp_path, tiny_model_dir):
    from posttrain.model_init import init_model

    again = init_model("tiny", tmp_path / "again", seed=0)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as a, safe_open(str(again / "model.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_deepseek_v3_preset_builds_on_meta_device():
    model = build_meta_model("deepseek-v3")
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    # DeepSeek-V3 report: 671B parameters in the main model, 37B activated per token.
    assert 660e9 < counts["main"] < 680e9
    assert 36e9 < counts["activated"] < 39e9
    assert model.config.num_hidden_layers == 61 and len(model.mtp_layers) == 1


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_loads_and_generates(vllm_llm, tiny_model_dir):
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tom has 5 pens."}], tokenize=False, add_generation_prompt=True)
    outs = vllm_llm.generate([prompt] * 3, SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True), use_tqdm=False)
    assert len(outs) == 3 and all(len(o.outputs) == 2 for o in outs)
    assert all(len(c.token_ids) == 8 for o in outs for c in o.outputs)
