"""Model-backed teachers on the tiny V3 checkpoint: the vLLM (CPU build) and transformers
backends produce n samples per prompt through the whole pipeline.  The tiny model is
random, so only the pipeline is checked, not the content."""

import json
import os
from pathlib import Path

import pytest

from data_pipelines.distill import DistillConfig, run_distill


@pytest.fixture()
def tiny_model(tiny_model_dir) -> Path:  # the session's checkpoint (tests/conftest.py)
    return tiny_model_dir


def _check(out: Path, stats: dict, n_prompts: int, n: int, max_tokens: int, teacher_prefix: str):
    kept = [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
    rejected = [json.loads(line) for p in sorted((out / "rejected").glob("*.jsonl")) for line in p.read_text().splitlines()]
    samples = [r for r in kept if r["sample_type"] == "r1_system"] + rejected
    assert len(samples) == stats["samples"]["total"] == n_prompts * n
    per_prompt: dict[str, list[int]] = {}
    for r in samples:
        per_prompt.setdefault(r["source_id"], []).append(r["sample_index"])
        assert r["teacher"].startswith(teacher_prefix)
        assert 1 <= r["completion_tokens"] <= max_tokens and r["prompt_tokens"] > 10
    assert len(per_prompt) == n_prompts and all(sorted(v) == list(range(n)) for v in per_prompt.values())
    # a random model almost never closes </think> with the right boxed answer
    assert {r["rejection_reason"] for r in rejected} <= {"too_long", "unclosed_think", "no_answer", "wrong_answer",
                                                          "too_short", "language_mixing", "repetition",
                                                          "malformed_think"}
    assert stats["lengths"]["unit"] == "tokens"


def test_hf_backend_pipeline(tiny_model, tmp_path):
    cfg = DistillConfig(dataset_name="builtin:arith?n_train=3", backend="hf", model_name_or_path=str(tiny_model),
                        dtype="float32", num_generations=2, max_completion_length=8, output_dir=str(tmp_path / "o"),
                        disable_tqdm=True)
    stats = run_distill(cfg)
    _check(tmp_path / "o", stats, 3, 2, 8, "hf:")


@pytest.mark.vllm
def test_vllm_backend_built_from_config(monkeypatch, tmp_path):
    """make_teacher hands the config's engine settings to vllm.LLM (no engine started)."""
    vllm = pytest.importorskip("vllm")
    from data_pipelines.teachers import make_teacher

    seen = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.update(kw) or object())
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    cfg = DistillConfig(backend="vllm", model_name_or_path=str(tmp_path), tensor_parallel_size=1, dtype="float32",
                        max_model_len=512, seed=3, vllm_kwargs={"max_num_seqs": 8}, output_dir=str(tmp_path))
    teacher = make_teacher(cfg)
    assert teacher.name == f"vllm:{tmp_path}"
    assert {k: seen[k] for k in ("model", "tensor_parallel_size", "dtype", "max_model_len", "seed", "max_num_seqs")} == \
        {"model": str(tmp_path), "tensor_parallel_size": 1, "dtype": "float32", "max_model_len": 512, "seed": 3,
         "max_num_seqs": 8}
    assert seen["attention_config"] == {"backend": "CPU_MLA"}  # fp32 on CPU: the reference MLA backend
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # so the CPU rope fix reaches the engine


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_pipeline(vllm_llm, tiny_model, tmp_path, monkeypatch):
    """The whole pipeline on the session's shared vLLM engine (tests/conftest.py)."""
    import data_pipelines.teachers as T
    from data_pipelines.teachers.vllm_backend import VLLMTeacher

    monkeypatch.setattr(T, "make_teacher", lambda cfg: VLLMTeacher.from_llm(vllm_llm, f"vllm:{cfg.model_name_or_path}"))
    cfg = DistillConfig(dataset_name="builtin:arith?n_train=6", backend="vllm", model_name_or_path=str(tiny_model),
                        num_generations=4, max_completion_length=24, output_dir=str(tmp_path / "o"),
                        shard_size=4, disable_tqdm=True)
    stats = run_distill(cfg)
    _check(tmp_path / "o", stats, 6, 4, 24, "vllm:")
    # per-prompt seeds: the same prompts give the same samples again
    again = run_distill(DistillConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "p")}))
    assert again["lengths"] == stats["lengths"]
    assert (tmp_path / "o" / "rejected" / "rejected-00000.jsonl").read_text() == \
        (tmp_path / "p" / "rejected" / "rejected-00000.jsonl").read_text()


def test_vllm_prompt_longer_than_max_model_len_is_rejected_not_a_crash(tmp_path, monkeypatch):
    """vLLM refuses a whole batch when one prompt is longer than max_model_len: the run died with its
    traceback, and again at the same shard on every resume. That prompt is not sent; its samples are
    recorded as rejected (too_long) and the other prompts are sampled as usual."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    import data_pipelines.teachers as T
    from data_pipelines.teachers.vllm_backend import VLLMTeacher

    good = "<think>\n2 + 3 = 5\n</think>\n\n\\boxed{5}"

    class Tokenizer:  # one token per word
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [0] * len(" ".join(m["content"] for m in messages).split())

    class FakeLLM:  # what chat_completions reads of vllm.LLM
        model_config = SimpleNamespace(max_model_len=16)

        def get_tokenizer(self):
            return Tokenizer()

        def chat(self, chats, params, use_tqdm=False):
            lengths = [len(Tokenizer().apply_chat_template(c, True, True)) for c in chats]
            if max(lengths) > self.model_config.max_model_len:
                raise ValueError("This model's maximum context length is 16 tokens")  # as vLLM does
            return [SimpleNamespace(prompt_token_ids=[0] * k, outputs=[
                SimpleNamespace(index=i, token_ids=[1, 2, 3], finish_reason="stop", text=good)
                for i in range(p.n)]) for k, p in zip(lengths, params)]

    monkeypatch.setattr(T, "make_teacher", lambda cfg: VLLMTeacher.from_llm(FakeLLM(), "vllm:fake"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n"
                    + json.dumps({"prompt": "What is " + " + ".join(["1"] * 30) + "?", "answer": "30"}) + "\n")
    stats = run_distill(DistillConfig(dataset_name=str(path), backend="vllm", model_name_or_path="fake",
                                      num_generations=2, output_dir=str(tmp_path / "o"), disable_tqdm=True))
    assert stats["samples"]["kept"] == 2 and stats["samples"]["total"] == 4
    assert stats["rejections"] == {"too_long": {"count": 2, "rate": 0.5}}


def test_token_counts_from_model_tokenizer(tiny_model, tmp_path):
    """A backend without a tokenizer (scripted) gets counts from model_name_or_path's tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path / "o"
    stats = run_distill(DistillConfig(dataset_name="builtin:arith?n_train=4", model_name_or_path=str(tiny_model),
                                      reference_column="solution", output_dir=str(out), disable_tqdm=True))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
    for r in rows:
        assert r["completion_tokens"] == len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
        teacher_prompt = [m for m in r["messages"][:-1] if m["role"] != "system"]  # what the teacher saw
        assert r["prompt_tokens"] == len(tok.apply_chat_template(teacher_prompt, add_generation_prompt=True,
                                                                 tokenize=True)["input_ids"])
    assert stats["lengths"]["unit"] == "tokens"
