"""The ground-floor `engines` package: its import boundary, one place that builds `vllm.LLM`, one home for
patches, one set of sampling/completion types, and the HF engine (source checks are AST walks, so lazy
imports inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("engines", "posttrain", "rewards", "data_pipelines", "eval_hooks")


def _modules() -> list[Path]:
    return sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "cli.py"]


def _imported(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports (relative imports resolved to its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0] if node.level == 0 else path.relative_to(ROOT).parts[0])
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("engines", {"posttrain", "rewards", "data_pipelines", "eval_hooks"}),
    ("rewards", {"posttrain", "data_pipelines", "eval_hooks"}),
])
def test_import_boundaries(package, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imported(p) & forbidden) for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_one_module_builds_vllm_llm():
    builders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name == "LLM":
                    builders.append(str(path.relative_to(ROOT)))
    assert builders == ["engines/vllm_engine.py"]


def _library_attribute_assignments(path: Path) -> list[str]:
    """`x.attr = ...` / `setattr(x, ...)` where `x` was bound by importing a third-party module or its member."""
    tree = ast.parse(path.read_text())
    library: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            library.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] not in PROJECT)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in PROJECT:
            library.update(a.asname or a.name for a in node.names)
    library -= set(sys.stdlib_module_names)

    def base(expr: ast.expr) -> str | None:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for sub in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(sub, ast.Attribute) and base(sub) in library:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(sub)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and base(node.args[0]) in library:
            found.append(f"{where}:{node.lineno}: setattr({ast.unparse(node.args[0])}, ...)")
    return found


def test_only_compat_assigns_to_library_attributes():
    found = [hit for p in _modules() if p != ROOT / "engines/compat.py" for hit in _library_attribute_assignments(p)]
    assert found == []


def test_the_scan_finds_a_library_patch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import vllm.model_executor.layers.utils as u\nfrom trl.trainer import grpo_trainer\n"
                   "u.dispatch = None\nsetattr(grpo_trainer, 'x', 1)\n")
    assert len(_library_attribute_assignments(bad)) == 2


def test_vllm_multiprocessing_env_is_set_in_one_place():
    setters = [str(p.relative_to(ROOT)) for p in _modules() if 'environ["VLLM_ENABLE_V1_MULTIPROCESSING"]' in p.read_text()
               or "environ.setdefault(\"VLLM_ENABLE_V1_MULTIPROCESSING\"" in p.read_text()]
    assert setters == ["engines/compat.py"]


def test_one_set_of_sampling_and_completion_types():
    import data_pipelines.teachers as teachers
    import engines
    from engines import types

    assert teachers.Completion is engines.Completion is types.Completion
    assert teachers.SamplingSettings is engines.SamplingSettings is types.SamplingSettings
    for path in _modules():
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        if path != ROOT / "engines/types.py":
            assert not defined & {"Completion", "SamplingSettings", "SamplingConfig", "prompt_seed", "sample_seed"}, path


def test_prompt_seed():
    from engines import prompt_seed

    # token ids keep the seeds GRPO's rollouts have always used
    import hashlib

    ids = [5, 9, 200]
    assert prompt_seed(3, ids) == int.from_bytes(hashlib.sha1(b"3|5,9,200").digest()[:4], "big") & 0x7FFFFFFF
    chat = [{"role": "user", "content": "2+2?"}]
    assert prompt_seed(0, chat) == prompt_seed(0, [dict(chat[0])])  # by value
    seeds = {prompt_seed(0, chat), prompt_seed(1, chat), prompt_seed(0, chat, 0), prompt_seed(0, chat, 1),
             prompt_seed(0, "2+2?"), prompt_seed(0, ids)}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)


def test_hf_engine_seeded_samples_do_not_depend_on_the_batch(tiny_model_dir):
    """What the `hf` teacher and GRPO's HF fallback rely on: with a seed, a prompt's samples are the same
    alone or in a batch, the caller's random stream is untouched, and each sampled token has its log-prob."""
    from transformers import AutoTokenizer

    from engines import SamplingSettings
    from engines.hf import HFGenerateEngine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFGenerateEngine(model, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                              [tok.eos_token_id])
    a = tok("Mia has 3 apples.", add_special_tokens=False)["input_ids"]
    b = tok("What is 12 + 7? Think first.", add_special_tokens=False)["input_ids"]
    sampling = SamplingSettings(temperature=1.0, max_tokens=6, seed=11)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    both = engine.generate([a, b], 2, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)
    alone = engine.generate([b], 2, sampling)
    assert [c.token_ids for c in both[1]] == [c.token_ids for c in alone[0]]
    for c in both[0] + both[1]:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in c.logprobs)


def test_grpo_server_mode_limits_are_one_line_errors_before_loading(tmp_path):
    """`vllm_mode: server` cannot take an FP8 policy's weights, and needs CUDA for its NCCL weight sync:
    both said before any model is loaded or server contacted."""
    import json

    from posttrain.errors import UserError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import check_server_mode

    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    cfg = GRPORecipeConfig(output_dir=str(tmp_path / "o"), model_name_or_path=str(fp8), use_vllm=True,
                           vllm_mode="server")
    with pytest.raises(UserError, match="is an FP8 checkpoint: weight sync to a vLLM server"):
        check_server_mode(cfg)
    cfg.model_name_or_path = str(plain)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs CUDA; on CPU use vllm_mode: colocate"):
            check_server_mode(cfg)
    cfg.vllm_mode = "colocate"
    check_server_mode(cfg)
