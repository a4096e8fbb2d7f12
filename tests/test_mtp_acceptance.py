"""The MTP drafter's acceptance on the evaluation's answers (eval_hooks/mtp_acceptance.py, eval stage
`mtp_acceptance`): which tokens count, that batching changes nothing, and that the report compares
stages on the same problems."""

from __future__ import annotations

import json

import pytest
import torch

from eval_hooks.mtp_acceptance import drafter_hits
from eval_hooks.report import grouped_paired_difference, write_report
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return DeepseekV3ForCausalLMWithMTP.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def _drafts(model, ids: list[int]) -> list[int]:
    """The MTP module's top-1 guess at each position j (for token j + 2), from one unpadded sequence."""
    with torch.no_grad():
        x = torch.tensor([ids])
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state
        return model._mtp(hidden, x, None, None, None, detach_input=True)[0][0][0].argmax(-1).tolist()


def _answer_the_drafter_guesses(model, prompt: list[int], first: int, length: int) -> list[int]:
    """An answer whose every token after the first is what the MTP module guessed for it: acceptance 1."""
    answer = [first]
    while len(answer) < length:
        answer.append(_drafts(model, prompt + answer)[len(prompt) + len(answer) - 2])
    return answer


def test_every_answer_token_after_the_first_is_a_draft_and_a_hit_when_the_drafter_guessed_it(model):
    prompt = [5, 17, 40, 9]
    guessed = _answer_the_drafter_guesses(model, prompt, first=33, length=7)
    off = guessed[:3] + [(t + 1) % model.config.vocab_size for t in guessed[3:]]  # the last 4 tokens changed
    # position len(prompt) + 3 of `off` is still guessed right if its draft does not depend on the changed
    # tokens after it; count with the drafts of `off` itself
    drafts_off = _drafts(model, prompt + off)
    expected_off = sum(drafts_off[len(prompt) + j - 2] == off[j] for j in range(1, len(off)))
    counts = drafter_hits(model, [prompt], [[guessed, off, [7]]])  # a one-token answer drafts nothing
    assert counts == [(6 + expected_off, 12)]
    assert expected_off < 6


def test_batching_and_padding_change_nothing(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 6, 4)]
    answers = [[torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
               for lengths in ((5, 2, 9), (1, 7), (4, 4, 12, 3))]
    one_by_one = []
    for prompt, group in zip(prompts, answers):
        hits = drafts = 0
        for answer in group:
            d = _drafts(model, prompt + answer)
            for j in range(1, len(answer)):
                hits += d[len(prompt) + j - 2] == answer[j]
                drafts += 1
        one_by_one.append((hits, drafts))
    assert drafter_hits(model, prompts, answers, batch_size=3) == one_by_one
    assert drafter_hits(model, prompts, answers, batch_size=64) == one_by_one
    assert [n for _, n in one_by_one] == [4 + 1 + 8, 0 + 6, 3 + 3 + 11 + 2]


def test_the_eval_stage_writes_each_problem_s_acceptance(tiny_model_dir, tmp_path):
    from tests.test_eval_hooks import ScriptedEngine, two_problems
    from transformers import AutoTokenizer

    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    f = two_problems(tmp_path)
    texts = [["\\boxed{5}", "so \\boxed{7}", "5"], ["\\boxed{5} then", "7", "x"]]
    cfg = EvalStage(dataset_name=str(f), dataset_split="train", num_problems=2, max_tokens=8, sampled_pass1_k=3,
                    mtp_acceptance=True)
    evaluate_checkpoints({"sft": str(tiny_model_dir)}, cfg, tmp_path / "eval", ScriptedEngine(tok, texts))
    measured = json.loads((tmp_path / "eval" / "sft.json").read_text())["mtp_acceptance"]
    ids = [[tok(t, add_special_tokens=False)["input_ids"] for t in group] for group in texts]
    assert measured["drafts"] == sum(max(len(a) - 1, 0) for group in ids for a in group)
    assert len(measured["per_problem"]) == 2 and measured["on"].startswith("sampled pass@1 answers (3 per problem")
    assert 0 <= measured["rate"] <= 1
    cfg.sampled_pass1_k = 0  # then on the greedy answers: each problem's first
    evaluate_checkpoints({"sft": str(tiny_model_dir)}, cfg, tmp_path / "eval1", ScriptedEngine(tok, texts))
    greedy = json.loads((tmp_path / "eval1" / "sft.json").read_text())["mtp_acceptance"]
    assert greedy["on"] == "greedy answers" and greedy["drafts"] == sum(len(group[0]) - 1 for group in ids)
    cfg.mtp_acceptance = False
    evaluate_checkpoints({"sft": str(tiny_model_dir)}, cfg, tmp_path / "eval2", ScriptedEngine(tok, texts))
    assert "mtp_acceptance" not in json.loads((tmp_path / "eval2" / "sft.json").read_text())


def test_report_compares_the_stages_acceptance_on_the_same_problems(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    groups = [f"g{i % 5}" for i in range(40)]
    per_problem = {"init": [None] * 40,  # no answer long enough to draft on: no row, no comparison
                   "sft": [0.8] * 20 + [0.9] * 19 + [None],  # problem 39: likewise
                   "grpo": [0.85] * 20 + [0.88] * 19 + [0.5]}
    for name, values in per_problem.items():
        (out / "eval" / f"{name}.json").write_text(json.dumps({
            "accuracy": 0.5, "n": 40, "correct": [True] * 20 + [False] * 20, "groups": groups,
            "mtp_acceptance": {"rate": 0.85, "drafts": 400, "on": "greedy answers", "per_problem": values}}))
    manifest = {"name": "t", "recipe": "r.yaml", "stages": {"eval": {"status": "done", "metrics": {
        name: {"accuracy": 0.5, "n": 40} for name in per_problem}}}}
    write_report(out, manifest)
    printed = capsys.readouterr().out
    assert "## MTP drafter acceptance on the evaluation's answers" in printed and "on the greedy answers" in printed
    d = grouped_paired_difference(per_problem["sft"][:39], per_problem["grpo"][:39], groups[:39])
    assert d["difference"] == pytest.approx((20 * 0.05 - 19 * 0.02) / 39)
    lo, hi = d["ci95"]
    assert f"| grpo − sft | {d['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | 20 | 19 |" in printed
    assert "| init |" not in printed.split("## MTP drafter")[1] and "sft − init" not in printed.split("## MTP drafter")[1]
    results = json.loads((out / "results.json").read_text())
    assert "mtp_acceptance" not in results["init"]
    assert results["sft"]["mtp_acceptance"]["mean"] == pytest.approx((20 * 0.8 + 19 * 0.9) / 39)
    assert results["grpo"]["mtp_acceptance"]["vs_sft"]["difference"] == pytest.approx(d["difference"])
