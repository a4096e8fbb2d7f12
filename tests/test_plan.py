"""`dsv3-posttrain plan`: parameter counts, memory, KV cache and step time against the DeepSeek-V3 report.

Report figures used (DeepSeek-V3 technical report, arXiv 2412.19437):
- abstract / §1: 671B total parameters, 37B activated per token;
- Table 1: 2664K H800 GPU hours of pre-training for 14.8T tokens = 180K GPU hours per trillion
  tokens, 3.7 days per trillion tokens on 2048 GPUs;
- §2.1.1 (and DeepSeek-V2 §2.1.4): MLA caches (d_c + d_h^R) = 512 + 64 elements per token per layer,
  as much as GQA with 2.25 groups;
- §3.2: 16-way PP, 64-way EP, ZeRO-1 DP on 2048 GPUs; §4.2: 4K sequences, batch 15360;
- Hugging Face model card: 685B released = 671B main + 14B MTP (embedding and head copies included).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from posttrain.errors import UserError
from posttrain.model_init import build_meta_model, count_parameters
from posttrain.plan import (
    CLUSTERS_DIR,
    Cluster,
    Parallel,
    Precision,
    Workload,
    activation_memory,
    flops_per_token,
    implied_mfu,
    kv_cache,
    layer_activation_bytes,
    load_model_shape,
    load_setup,
    main_plan,
    make_plan,
    parameter_counts,
    state_memory,
    tensor_inventory,
    weight_bytes,
)

V3 = load_model_shape("deepseek-v3")
H800_BF16_TFLOPS = 989.5


def plan_for(model: str = "deepseek-v3", cluster: str | None = None, **sections) -> dict:
    return make_plan(load_model_shape(model), *load_setup(cluster, sections))


# ---------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v3"])
def test_parameter_counts_equal_the_built_model(preset):
    overrides = {} if preset == "deepseek-v3" else {"vocab_size": 1024}
    built = count_parameters(build_meta_model(preset, **overrides))
    counts = parameter_counts(load_model_shape(preset))
    assert {k: counts[k] for k in built} == built


def test_inventory_names_and_shapes_are_the_models():
    """Non-expert tensors carry the model's own parameter names and shapes (so the FP8 naming rule
    applies to real names); the per-expert tensors add up to the fused expert tensors."""
    model = build_meta_model("small", vocab_size=1024)
    real = {n: tuple(p.shape) for n, p in model.named_parameters()}
    inv = tensor_inventory(load_model_shape("small"))
    planned = {t.name: t.shape for t in inv if not t.expert}
    fused = {n: s for n, s in real.items() if ".mlp.experts." in n}
    assert planned == {n: s for n, s in real.items() if n not in fused}
    for name, shape in fused.items():  # gate_up_proj [E, 2I, H] / down_proj [E, H, I]
        prefix = name.rsplit(".mlp.experts.", 1)[0]
        parts = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
        numel = sum(t.numel for t in inv if t.name.startswith(prefix + ".mlp.experts.{e}.")
                    and t.name.split(".")[-2] in {f"{p}_proj" for p in parts})
        assert numel == shape[0] * shape[1] * shape[2], name


def test_v3_parameter_counts_are_the_reports():
    c = parameter_counts(V3)
    assert round(c["main"] / 1e9) == 671  # report abstract: 671B total
    assert 37e9 <= c["activated"] < 38e9  # "37B activated for each token"
    assert round(c["mtp"] / 1e9, 1) == 11.6  # MTP trained here: shares embedding and head
    # The release stores the MTP module with its own embedding + head copies: "14B", "685B" in total.
    assert 13.4e9 < c["mtp_released"] < 14.0e9
    assert abs((c["main"] + c["mtp_released"]) / 685e9 - 1) < 0.005


def test_fp8_layers_are_the_reports_linears():
    by_name = {t.name: t for t in tensor_inventory(V3)}
    for name in ("model.layers.5.self_attn.q_a_proj.weight", "model.layers.5.self_attn.kv_b_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.5.mlp.shared_experts.up_proj.weight",
                 "model.layers.5.mlp.experts.{e}.gate_proj.weight", "model.layers.61.self_attn.o_proj.weight"):
        assert by_name[name].fp8, name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.5.mlp.gate.weight",
                 "model.layers.61.eh_proj.weight", "model.layers.5.input_layernorm.weight", "model.norm.weight"):
        assert not by_name[name].fp8, name


def test_fp8_weights_are_half_of_bf16_for_the_fp8_layers():
    one_gpu = Parallel(dp=1, tp=1, ep=1, pp=1, zero_stage=0)
    fp8 = state_memory(V3, one_gpu, Precision(weights="fp8"))[0]["weights"]
    bf16 = state_memory(V3, one_gpu, Precision(weights="bf16"))[0]["weights"]
    c = parameter_counts(V3)
    scales = sum(4 * t.fp8_scale_count for t in tensor_inventory(V3) if t.fp8)
    assert bf16 == 2 * c["total"]
    assert fp8 == bf16 - c["fp8_linear"] + scales  # FP8 tensors drop from 2 bytes to 1 (+ block scales)
    assert 0.9 < scales / (c["fp8_linear"] * 4 / 128**2) < 1.1  # one fp32 per 128 x 128 block
    kv_a = next(t for t in tensor_inventory(V3) if t.name.endswith("kv_a_proj_with_mqa.weight"))
    assert kv_a.fp8_scale_count == 5 * 56  # 576 x 7168: ceil-divided, the last row block partial
    assert weight_bytes(kv_a, "fp8") == 576 * 7168 + 4 * 280


# ----------------------------------------------------------------------------------- memory
def _states(par: Parallel, prec: Precision = Precision()) -> dict[str, float]:
    return state_memory(V3, par, prec)[0]


def test_doubling_dp_halves_sharded_state():
    for zero, halved, kept in ((3, ("weights", "grads", "master", "moments"), ()),
                               (1, ("master", "moments"), ("weights", "grads"))):
        a = _states(Parallel(dp=64, ep=8, zero_stage=zero))
        b = _states(Parallel(dp=128, ep=8, zero_stage=zero))
        for k in halved:
            assert b[k] == pytest.approx(a[k] / 2, rel=1e-12), (zero, k)
        for k in kept:
            assert b[k] == pytest.approx(a[k], rel=1e-12), (zero, k)
        assert a[kept[0] if kept else "weights"] > 0


def test_expert_parallel_divides_expert_state_only():
    c = parameter_counts(V3)
    dense = c["total"] - c["routed_experts"]
    g1 = _states(Parallel(dp=64, ep=1, zero_stage=0), Precision(grads="fp32"))["grads"]
    g8 = _states(Parallel(dp=64, ep=8, zero_stage=0), Precision(grads="fp32"))["grads"]
    assert g1 == pytest.approx(4 * c["total"])
    assert g8 == pytest.approx(4 * (dense + c["routed_experts"] / 8))
    # ZeRO-3 shards an expert over its dp x tp / ep replicas: with tp = pp = 1 every GPU holds
    # 1/world of each state, whatever ep (ep only shrinks the gathered layer).
    for ep in (1, 8, 64):
        s = _states(Parallel(dp=64, ep=ep, zero_stage=3), Precision(weights="bf16"))
        assert s["master"] == pytest.approx(4 * c["total"] / 64) and s["weights"] == pytest.approx(2 * c["total"] / 64)
    gather = [_states(Parallel(dp=64, ep=ep, zero_stage=3))["zero3_gather"] for ep in (1, 8)]
    assert gather[1] < gather[0] / 4  # two whole MoE layers (~11 GB each in FP8) vs their 1/8


def test_precision_bytes_per_parameter():
    base = _states(Parallel(dp=1, zero_stage=0), Precision(weights="bf16", grads="bf16", moments="fp32"))
    low = _states(Parallel(dp=1, zero_stage=0), Precision(weights="bf16", grads="fp32", moments="bf16"))
    n = parameter_counts(V3)["total"]
    assert (base["master"], base["grads"], base["moments"]) == (4 * n, 2 * n, 8 * n)
    assert (low["grads"], low["moments"]) == (4 * n, 4 * n)  # report §3.3.3: fp32 grads, bf16 m and v


def test_v3_layer_activation_bytes_follow_the_documented_formula():
    h, r_q, r_kv, d_r, n_h, d_qk, d_v = 7168, 1536, 512, 64, 128, 192, 128
    mla = 2 * (2 * h + 2 * r_q + (r_kv + d_r) + r_kv + n_h * (2 * d_qk + d_v) + n_h * d_v) + 4 * n_h
    moe = 2 * (2 * h + 8 * (2 * h + 3 * 2048) + 3 * 2048) + 4 * (256 + 8)
    assert layer_activation_bytes(V3, moe=True) == mla + moe == 571_040
    assert layer_activation_bytes(V3, moe=False) == mla + 2 * (2 * h + 3 * 18432)


def test_activations_scale_with_tokens_tp_and_recompute():
    par = Parallel(dp=8, tp=1, ep=1, pp=1)

    def acts(p=par, **wl) -> float:
        return activation_memory(V3, p, Workload(**wl), n_micro=1)[0]["activations"]

    assert acts(micro_batch=2, recompute="none") == pytest.approx(2 * acts(micro_batch=1, recompute="none"))
    assert acts(seq_len=8192, recompute="none") == pytest.approx(2 * acts(seq_len=4096, recompute="none"))
    assert acts(recompute="full") < acts(recompute="none") / 10
    assert acts(dataclasses.replace(par, tp=2), recompute="none") == pytest.approx(acts(recompute="none") / 2)
    # no recompute: all 61 layers; full: 61 layer inputs (2h bytes) + one MoE layer rematerialised
    tokens = 4096
    full = tokens * (61 * 2 * 7168 + layer_activation_bytes(V3, moe=True))
    assert acts(recompute="full") == full


def test_pipeline_stages_hold_1f1b_in_flight_micro_batches():
    stages = activation_memory(V3, Parallel(dp=128, ep=64, pp=16), Workload(recompute="none"), n_micro=120)
    assert [s["in_flight"] for s in stages] == list(range(16, 0, -1))
    assert sum(s["layers"] for s in stages) == 61
    assert stages[-1]["logits"] > 0 and stages[0]["logits"] == 0  # the head is on the last stage
    few = activation_memory(V3, Parallel(dp=128, ep=64, pp=16), Workload(recompute="none"), n_micro=2)
    assert few[0]["in_flight"] == 2


def test_report_cluster_plan_fits_and_fsdp_without_ep_does_not():
    plan = plan_for("deepseek-v3", "h800-2048")
    assert plan["world"] == 2048 and plan["parallel"] == dict(dp=128, tp=1, ep=64, pp=16, zero_stage=1)
    assert all(s["fits"] for s in plan["memory_stages"])  # DeepSeek trained V3 on exactly this
    small = plan_for("deepseek-v3", "h100-8x8-fsdp")  # 64 x 80 GiB: the sharded state alone is too big
    assert not small["memory_stages"][0]["fits"]
    states = sum(small["memory_stages"][0][k] for k in ("weights", "master", "grads", "moments"))
    assert states == pytest.approx(parameter_counts(V3)["total"] * (2 + 4 + 4 + 8) / 64)
    assert plan_for("deepseek-v3", "h200-16x8-fsdp")["memory_stages"][0]["fits"]


def test_every_cluster_file_loads_and_plans():
    files = sorted(CLUSTERS_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"h800-2048", "h100-8x8-fsdp", "h200-16x8-fsdp"}
    for f in files:
        cluster, par, prec, wl = load_setup(str(f))
        assert cluster.name == f.stem
        make_plan(V3, cluster, par, prec, wl)


# --------------------------------------------------------------------------------- KV cache
def test_mla_kv_cache_is_the_compressed_latent():
    kv = kv_cache(V3, Workload(kv_seqs=64, kv_context=32768, kv_dp=8))
    assert kv["per_token"] == (512 + 64) * 61 * 2 == 70_272  # ~70 KB per token in bf16
    assert kv["mha_per_token"] == 2 * 128 * 128 * 61 * 2
    assert kv["gqa_groups"] == 2.25  # report / DeepSeek-V2: MLA = GQA with 2.25 groups
    assert kv["total"] == 64 * 32768 * 70_272 and kv["per_gpu"] == kv["total"] / 8
    fp8 = kv_cache(V3, Workload(kv_seqs=64, kv_context=32768, kv_dp=8, kv_dtype="fp8"))
    assert fp8["total"] == kv["total"] / 2
    assert kv_cache(V3, Workload(), include_mtp=True)["per_token"] == 576 * 62 * 2


# ------------------------------------------------------------------------------ step time
def _report_flops_per_token(seq: int = 4096) -> float:
    """By hand: 6 x 37B activated + causal attention (3 x fwd; fwd = 2 n_h (d_qk + d_v) x s/2 per layer)."""
    return 6 * 37e9 + 3 * 61 * 2 * 128 * (192 + 128) * seq / 2


def test_flops_per_token_terms():
    f = flops_per_token(V3, 4096)
    assert f["attention"] == 3 * 61 * 128 * 320 * 4097
    assert f["dense"] == 6 * parameter_counts(V3)["matmul_activated"]
    assert 0.03 < f["mtp"] / (f["dense"] + f["attention"]) < 0.05  # one extra MoE layer + a head pass
    assert abs(f["total"] / _report_flops_per_token() - 1) < 0.05
    assert flops_per_token(V3, 4096, include_mtp=False)["mtp"] == 0


def test_planner_reproduces_table1_training_cost():
    """Table 1: 2664K GPU hours for 14.8T tokens (180K per trillion; 3.7 days on 2048 H800s)."""
    gpu_hours, tokens = 2664e3, 14.8e12
    assert gpu_hours / (tokens / 1e12) == pytest.approx(180e3, rel=1e-3)
    mfu = implied_mfu(_report_flops_per_token(), tokens, gpu_hours, H800_BF16_TFLOPS)
    assert 0.35 < mfu < 0.45  # ~39% of the bf16 dense peak (~20% of FP8 peak)
    plan = plan_for("deepseek-v3", "h800-2048", workload={"mfu": mfu})
    assert plan["tokens_per_step"] == 15360 * 4096
    # Tolerance 5%: the planner counts 37.55B activated (not 37B) and the MTP module's FLOPs.
    assert plan["time"]["gpu_hours_per_trillion"] == pytest.approx(180e3, rel=0.05)
    assert plan["time"]["days_per_trillion"] == pytest.approx(3.7, abs=0.2)
    assert plan["time"]["step_s"] == pytest.approx(
        plan["tokens_per_step"] * plan["flops_per_token"]["total"] / (2048 * H800_BF16_TFLOPS * 1e12 * mfu))
    # and with its own FLOP count the planner implies ~40%
    own = implied_mfu(plan["flops_per_token"]["total"], tokens, gpu_hours, H800_BF16_TFLOPS)
    assert 0.38 < own < 0.43


def test_mfu_basis_fp8_halves_the_rate():
    bf16 = plan_for("tiny", workload={"mfu": 0.4})["time"]["step_s"]
    fp8 = plan_for("tiny", workload={"mfu": 0.4, "mfu_basis": "fp8"})["time"]["step_s"]
    assert fp8 == pytest.approx(bf16 * 989.5 / 1979)


# ----------------------------------------------------------------------------------- CLI
def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main_plan(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--cluster", "--mfu", "--recompute", "--kv_context", "--zero_stage", "--json", "h800-2048"):
        assert word in out, word


def test_table_states_the_assumptions(capsys):
    assert main_plan(["--model", "deepseek-v3", "--cluster", "h800-2048"]) == 0
    out = capsys.readouterr().out
    assert "ASSUMED MFU 40.0%" in out and "70,272 B" in out and "2.25 groups" in out
    assert "stage 0" in out and "stage 15" in out and "ZeRO-1" in out


def test_json_output(capsys):
    assert main_plan(["--model", "small", "--nodes", "2", "--gpus_per_node", "4", "--ep", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world"] == 8 and data["parallel"]["dp"] == 8 and data["parallel"]["ep"] == 4
    assert data["parameters"]["total"] == parameter_counts(load_model_shape("small"))["total"]
    assert data["memory_stages"][0]["total"] > 0 and data["time"]["step_s"] > 0


def test_model_from_checkpoint_config(tmp_path):
    from posttrain.presets import preset_config

    preset_config("small", vocab_size=1024).save_pretrained(tmp_path)  # transformers' own config.json
    from_dir = load_model_shape(str(tmp_path))
    assert dataclasses.replace(from_dir, name="small") == load_model_shape("small")
    assert load_model_shape(str(tmp_path / "config.json")).hidden_size == 256
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="kv_lora_rank"):
        load_model_shape(str(tmp_path))


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match=r"--model.*deepseek-v4.*deepseek-v3"):
        main_plan(["--model", "deepseek-v4"])


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("nodez: 2\n", r"nodez.*did you mean nodes"),
        ("nodes: -1\n", r"cluster\.nodes"),
        ("memory_gib: lots\n", r"memory_gib"),
        ("parallel: {dp: 3}\n", r"parallel\.dp"),
        ("parallel: {ep: 3}\n", r"parallel\.ep"),
        ("parallel: {zero_stage: 4}\n", r"zero_stage"),
        ("parallel: {tp: 3}\n", r"parallel\.tp"),
        ("parallel: {tp: 8}\n", r"parallel\.tp: 8 does not divide the 4 attention heads"),
        ("precision: {weights: fp8, master: none}\n", r"precision\.master"),
        ("workload: {mfu: 1.5}\n", r"workload\.mfu"),
        ("workload: {global_batch: 12}\n", r"workload\.global_batch"),
        ("parallel: [1, 2]\n", r"'parallel' must be a mapping"),
    ],
)
def test_bad_cluster_fields_are_user_errors_naming_the_field(tmp_path, yaml_text, match):
    f = tmp_path / "c.yaml"
    f.write_text("name: c\n" + yaml_text)  # defaults: 1 node x 8 GPUs
    with pytest.raises(UserError, match=match):
        main_plan(["--model", "tiny", "--cluster", str(f)])


def test_bad_flags_and_missing_cluster_are_user_errors():
    with pytest.raises(UserError, match="--cluster"):
        main_plan(["--cluster", "no-such-cluster"])
    with pytest.raises(UserError, match=r"parallel\.pp"):
        main_plan(["--model", "tiny", "--pp", "8"])  # 8 stages for 2 layers
    with pytest.raises(UserError, match=r"weights"):
        main_plan(["--weights", "fp16"])


# The shipped GPU recipes, the accelerate config each is launched with, and the cluster file that sizes
# it (None: the config's one node of 80 GiB GPUs). accelerate's FSDP2 has no expert, tensor or pipeline
# parallelism, so each is planned as ZeRO-3 over all its GPUs.
GPU_RECIPES = {
    "sft-deepseek-v3.yaml": ("deepseek-v3", "fsdp2-deepseek-v3.yaml", "h200-32x8-fsdp"),
    "grpo-deepseek-v3.yaml": ("deepseek-v3", "fsdp2-deepseek-v3.yaml", "h200-32x8-fsdp"),
    "sft-moonlight-16b.yaml": ("moonlight-16b", "fsdp2-1node.yaml", None),
    "grpo-moonlight-16b.yaml": ("moonlight-16b", "fsdp2-1node.yaml", None),
}
GRPO_PROMPT_TOKENS = 512  # ours: the recipes do not bound the prompts


@pytest.mark.parametrize("recipe", sorted(GPU_RECIPES))
def test_shipped_gpu_recipes_fit_the_gpus_they_are_launched_on(recipe):
    """One micro-batch of the recipe, on the world its accelerate config launches, fits per the plan. TRL's
    GRPO runs a whole micro-batch (per_device_train_batch_size completions) through one forward: 16 rows of
    8.7k tokens on V3 planned at 480 GiB per GPU."""
    from pathlib import Path

    from posttrain.recipe import read_recipe

    root = Path(__file__).resolve().parents[1]
    model, accelerate_config, cluster = GPU_RECIPES[recipe]
    data = read_recipe(root / "recipes" / recipe)
    launch = read_recipe(root / "recipes" / "accelerate" / accelerate_config)
    world, nodes = launch["num_processes"], launch["num_machines"]
    micro, ga = data["per_device_train_batch_size"], data["gradient_accumulation_steps"]
    grpo = recipe.startswith("grpo-")
    seq_len = data["max_completion_length"] + GRPO_PROMPT_TOKENS if grpo else data["max_length"]
    overrides = {"cluster": {"nodes": nodes, "gpus_per_node": world // nodes},
                 "parallel": {"tp": 1, "ep": 1, "pp": 1, "zero_stage": 3},
                 "workload": {"micro_batch": micro, "seq_len": seq_len, "global_batch": micro * ga * world}}
    if cluster is None:
        overrides["cluster"]["memory_gib"] = 80
        overrides["precision"] = {"weights": "bf16", "master": "fp32", "grads": "fp32", "moments": "fp32"}
    else:  # the cluster file is this launch: its GPUs, its layout, the SFT recipe's batch
        c, par, _, wl = load_setup(cluster)
        assert (c.nodes, c.world) == (nodes, world), (cluster, accelerate_config)
        assert (par.tp, par.ep, par.pp, par.zero_stage) == (1, 1, 1, 3)
        if not grpo:
            assert (wl.micro_batch, wl.seq_len, wl.global_batch) == (micro, seq_len, micro * ga * world)
    c, par, prec, wl = load_setup(cluster, overrides)
    if grpo and data.get("vllm_mode") == "colocate":  # the engine's share of each GPU is not the trainer's
        c = dataclasses.replace(c, memory_gib=c.memory_gib * (1 - data["vllm_gpu_memory_utilization"]))
    stage = make_plan(load_model_shape(model), c, par, prec, wl)["memory_stages"][0]
    assert stage["fits"], f"{recipe}: {stage['total'] / 2**30:.1f} GiB per GPU planned, {c.memory_gib:g} GiB available"
