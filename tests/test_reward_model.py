"""The V3-based reward model (DeepSeek-V3 report §5.2.1): training (posttrain/rm), scoring as a reward
(rewards/reward_model.py), the generative judge, `rm score`, and the tiny recipe."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

import rewards
from posttrain.errors import ConfigError, UserError
from posttrain.recipe import load_config
from posttrain.rm.cli import main_rm
from posttrain.rm.config import RMRecipeConfig
from posttrain.rm.data import arith_preference_pairs, to_preference_example, to_preference_examples
from rewards import RewardError, RewardSuite
from rewards.reward_model import GenerativeJudge, RewardModelScorer, parse_judge_score

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "rm-tiny.yaml"
MIN_HELD_OUT_ACCURACY = 0.8


@pytest.fixture(scope="module")
def untrained_rm(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a fresh scalar head, saved as a reward model (no training): enough
    for the API and contract tests, which must not depend on what the RM has learned."""
    from posttrain.rm.model import load_reward_backbone, load_tokenizer

    out = tmp_path_factory.mktemp("rm") / "untrained"
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_reward_backbone(str(tiny_model_dir), tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _chat(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


# --- training on the built-in task ---------------------------------------------------------------
@pytest.mark.slow
def test_rm_learns_builtin_task_held_out(tiny_model_dir, tmp_path):
    """Train on correct-vs-wrong trace pairs of the train split (recipes/rm-tiny.yaml: 3200 fresh pairs,
    one pass of 200 steps x 16 pairs, lr 1e-3, 1 CPU thread — about 50-70 s on 2 shared cores), then
    score 200 pairs of the disjoint test split, balanced so that no prompt-blind rule beats 50%: the
    chosen trace must score above the rejected one in >= 80% of them. Measured with these settings
    over 5 seeds: 0.90-0.965 at step 200 (an untrained head: ~0.5)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rm.run import run_rm_training

    out = tmp_path / "rm"
    cfg = load_config(RMRecipeConfig, RECIPE, {"model_name_or_path": str(tiny_model_dir), "output_dir": str(out),
                                               "disable_tqdm": True})
    t0 = time.time()
    summary = run_rm_training(cfg)
    elapsed = time.time() - t0
    assert summary["global_step"] == 200 and summary["train_pairs"] == 3200
    assert summary["eval_pairs"] == 200 and "test" in summary["eval_dataset"]
    assert summary["eval_accuracy"] >= MIN_HELD_OUT_ACCURACY, summary
    assert summary["eval_margin"] > 0.5, summary
    print(f"\nheld-out accuracy {summary['eval_accuracy']:.3f}, margin {summary['eval_margin']:.2f}, {elapsed:.0f} s")

    # The saved directory is a plain HF sequence classifier, and the reward spec scores with it.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "DeepseekV3ForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id is not None
    # another draw of test-split pairs, scored through the reward spec GRPO uses
    held_out = to_preference_examples(arith_preference_pairs("test", 100, seed=7, balanced=True))
    fn = rewards.resolve(f"reward_model:{out}")
    prompts = [e["prompt"] for e in held_out]
    chosen = fn(prompts=prompts, completions=[e["chosen"] for e in held_out], trainer_state=None)
    rejected = fn(prompts=prompts, completions=[e["rejected"] for e in held_out], trainer_state=None)
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) >= MIN_HELD_OUT_ACCURACY
    saved = json.loads((out / "rm_summary.json").read_text())
    assert saved["eval_accuracy"] == summary["eval_accuracy"]



def test_builtin_pairs_are_split_disjoint_and_balanced():
    from rewards import extract_final_answer

    train = arith_preference_pairs("train", 300, seed=0)
    test = arith_preference_pairs("test", 100, seed=0, balanced=True)
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    for p in train + test:
        assert extract_final_answer(p["chosen"]) == p["answer"] != extract_final_answer(p["rejected"])
        # same wording, only the arithmetic differs
        assert len(p["chosen"].splitlines()) == len(p["rejected"].splitlines())

    def share_bigger(pairs):  # rejected answer above the right one = the trace added instead of subtracting
        return sum(int(extract_final_answer(p["rejected"])) > int(p["answer"]) for p in pairs) / len(pairs)

    # Training pairs keep the natural mix (subtractions flip more often); the balanced held-out set
    # gives every prompt-blind rule ("the adding trace loses", "the bigger answer wins") 50%.
    assert share_bigger(train) > 0.6 and share_bigger(test) == 0.5
    mixed = arith_preference_pairs("test", 10, seed=0, errors="mixed")
    assert [p["error"] for p in mixed] == ["operation", "misread"] * 5


def test_preference_rows_normalise_and_name_bad_rows():
    ex = to_preference_example({"prompt": "What is 2+2?", "chosen": "4", "rejected": [{"role": "assistant",
                                                                                      "content": "5"}]})
    assert ex == {"prompt": _chat("What is 2+2?"), "chosen": [{"role": "assistant", "content": "4"}],
                  "rejected": [{"role": "assistant", "content": "5"}]}
    # The chain-of-thought behind each response goes in front of it, in the R1 format.
    ex = to_preference_example({"prompt": _chat("2+2?"), "chosen": "\\boxed{4}", "rejected": "\\boxed{5}",
                                "rationale": {"chosen": "2 and 2 make 4.", "rejected": "2 and 2 make 5."}})
    assert ex["chosen"][0]["content"] == "<think>\n2 and 2 make 4.\n</think>\n\n\\boxed{4}"
    ex2 = to_preference_example({"prompt": "2+2?", "chosen": "\\boxed{4}", "rejected": "\\boxed{5}",
                                 "chosen_rationale": "2 and 2 make 4.", "rejected_rationale": "2 and 2 make 5."})
    assert ex2["rejected"][0]["content"].startswith("<think>\n2 and 2 make 5.")
    with pytest.raises(UserError, match="only the chosen response has a rationale"):
        to_preference_example({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_rationale": "why"})
    with pytest.raises(UserError, match=r"data\.jsonl line 3: missing 'rejected'"):
        to_preference_example({"prompt": "q", "chosen": "a", "__where__": "data.jsonl line 3"})
    # a table's columns are every row's: the message lists what this row has (it listed 'rejected' as present)
    with pytest.raises(UserError, match=r"missing 'rejected'.*\(this row has: \['chosen', 'prompt'\]\)"):
        to_preference_example({"prompt": "q", "chosen": "a", "rejected": None})
    with pytest.raises(UserError, match="pairs row 1: 'chosen' has a user turn"):
        to_preference_examples([{"prompt": "q", "chosen": "a", "rejected": "b"},
                                {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}],
                               source="pairs")


def test_rm_train_reads_jsonl_and_reports_bad_lines(tiny_model_dir, tmp_path):
    from posttrain.rm.run import run_rm_training

    good = {"prompt": "Mia has 3 apples. She finds 4 more apples. How many apples does Mia have?",
            "chosen": "3 + 4 = 7. The answer is \\boxed{7}.", "rejected": "3 - 4 = -1. The answer is \\boxed{-1}."}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    cfg = load_config(RMRecipeConfig, RECIPE, {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(data),
                                               "output_dir": str(tmp_path / "o"), "max_steps": 1})
    with pytest.raises(UserError, match=r"pairs\.jsonl line 2: missing 'rejected'"):
        run_rm_training(cfg)
    data.write_text((json.dumps(good) + "\n") * 4)
    assert main_rm(["train", "--recipe", str(RECIPE), "--model_name_or_path", str(tiny_model_dir),
                    "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
                    "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]) == 0
    summary = json.loads((tmp_path / "o" / "rm_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["train_pairs"] == 4
    assert "eval_accuracy" not in summary  # a user file has no held-out split unless eval_dataset_name names one
    assert RewardModelScorer(tmp_path / "o")(prompts=[good["prompt"]], completions=[good["chosen"]])


def test_backbone_is_the_checkpoint_with_a_new_scalar_head(tiny_model_dir):
    import torch
    from transformers import DeepseekV3ForCausalLM

    from posttrain.rm.model import load_reward_backbone, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rm = load_reward_backbone(str(tiny_model_dir), tok)
    lm = DeepseekV3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rm_state, lm_state = rm.state_dict(), lm.state_dict()
    backbone = [k for k in lm_state if k.startswith("model.")]
    assert backbone and all(torch.equal(rm_state[k], lm_state[k]) for k in backbone)  # experts, router bias too
    assert rm.score.weight.shape == (1, lm.config.hidden_size) and rm.config.num_labels == 1
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    with pytest.raises(UserError, match="no such directory"):
        load_tokenizer("/no/such/model")


def test_rm_resume_restores_the_routed_experts(untrained_rm, tiny_model_dir):
    """The RM trainer resumes through the strict DeepSeek-layout loader: Trainer's own reload skips
    the per-expert tensors, so a resumed RM would restart its experts from the backbone."""
    import torch

    from posttrain.checkpoints import DeepSeekLayoutCheckpoints, load_deepseek_checkpoint
    from posttrain.rm.model import load_reward_backbone, load_tokenizer
    from posttrain.rm.trainer import V3RewardTrainer

    assert issubclass(V3RewardTrainer, DeepSeekLayoutCheckpoints)
    saved = load_reward_backbone(str(untrained_rm), load_tokenizer(str(untrained_rm)))
    fresh = load_reward_backbone(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)))
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    with torch.no_grad():
        fresh.get_parameter(experts).add_(1.0)
        fresh.score.weight.zero_()
    assert load_deepseek_checkpoint(fresh, untrained_rm)
    assert torch.equal(fresh.state_dict()[experts], saved.state_dict()[experts])
    assert torch.equal(fresh.score.weight, saved.score.weight)



def test_the_saved_rm_config_promises_no_mtp_module(untrained_rm):
    """The RM loads no MTP layer and saves none; its config.json said num_nextn_predict_layers: 1."""
    import json

    from safetensors import safe_open

    config = json.loads((untrained_rm / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    with safe_open(str(untrained_rm / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(f"model.layers.{config['num_hidden_layers']}.")]


# --- scoring as a reward ---------------------------------------------------------------------------
def test_reward_model_spec_follows_the_grpo_contract(untrained_rm):
    fn = rewards.resolve(f"reward_model:{untrained_rm}")
    prompts = [_chat("Mia has 3 apples. She finds 4 more apples. How many apples does Mia have?")] * 3
    conversational = [[{"role": "assistant", "content": t}] for t in
                      ("<think>3 + 4 = 7</think> \\boxed{7}", "\\boxed{6}", "")]
    out = fn(prompts=prompts, completions=conversational, answer=["7"] * 3, trainer_state=None,
             completion_ids=[[1], [2], [3]])
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in out)
    texts = [c[0]["content"] for c in conversational]
    assert fn(prompts=prompts, completions=texts) == pytest.approx(out, abs=1e-5)  # text == conversational
    # Batching and padding do not change a row's score (the head reads the last non-pad token).
    alone = RewardModelScorer(untrained_rm, batch_size=1)(prompts[:1], texts[:1])
    mixed = RewardModelScorer(untrained_rm, batch_size=8)(prompts[:1] + [_chat("x " * 60)], texts[:1] + ["y " * 80])
    assert alone[0] == pytest.approx(mixed[0], abs=1e-4)
    # One loaded model per path, whatever the spec's options.
    other = rewards.resolve(f"reward_model:{untrained_rm}(batch_size=2, sigmoid=True)")
    assert other.model is fn.model and all(0.0 < v < 1.0 for v in other(prompts=prompts, completions=texts))

    suite = RewardSuite([(f"reward_model:{untrained_rm}", 1.0), ("format", 0.5)], policy="skip")
    res = suite.score(prompts, conversational, columns={"answer": ["7"] * 3})
    assert res.names[0] == "reward_model" and res.values["reward_model"] == pytest.approx(out, abs=1e-5)
    assert res.metrics["rewards/reward_model/failures"] == 0.0
    grpo_funcs = suite.trl_reward_funcs()  # what posttrain.grpo hands to TRL's GRPOTrainer
    assert grpo_funcs[0](prompts=prompts, completions=conversational, answer=["7"] * 3, trainer_state=None) == \
        pytest.approx(out, abs=1e-5)


def test_reward_model_spec_errors(tiny_model_dir, tmp_path):
    with pytest.raises(RewardError, match="not a model directory"):
        rewards.resolve(f"reward_model:{tmp_path / 'nope'}")
    with pytest.raises(RewardError, match="not a scalar reward model"):
        rewards.resolve(f"reward_model:{tiny_model_dir}")  # a causal LM, not an RM


# --- the generative judge --------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The steps are right.\nScore: 8/10", 0.8),
    ("Score: 7", 0.7),
    ("**Score:** 10/10", 1.0),
    ("score: 3 out of 5", 0.6),
    ("First I thought Score: 2/10, but on checking the answer holds. Score: 9/10", 0.9),
    ("Score: 0/10", 0.0),
    ("Score: 7.5/10", 0.75),
    ("Score: 12/10", None),
    ("Score: -1/10", None),
    ("I would give it a nine.", None),
    ("", None),
])
def test_judge_score_parsing(text, expected):
    got = parse_judge_score(text)
    assert got == (None if expected is None else pytest.approx(expected))


def test_judge_failure_policy_with_a_stub_model():
    answers = {"good": "Correct steps. Score: 9/10", "bad": "Wrong operation. Score: 1/10", "junk": "no verdict"}
    seen = []

    def stub(chats):
        seen.extend(chats)
        return [answers[c[-1]["content"].rsplit("Response:\n", 1)[1]] for c in chats]

    prompts = [_chat("Mia has 3 apples. She finds 4 more. How many?")] * 3
    skip = GenerativeJudge(generate=stub, policy="skip")
    assert skip(prompts=prompts, completions=["good", [{"role": "assistant", "content": "bad"}], "junk"]) == \
        [pytest.approx(0.9), pytest.approx(0.1), None]
    assert "Mia has 3 apples" in seen[0][-1]["content"] and "Score: N/10" in seen[0][-1]["content"]
    res = RewardSuite([skip], policy="skip").score(prompts, ["good", "bad", "junk"])
    assert res.values["generative_judge"][2] is None and res.total[2] is None
    with pytest.raises(RewardError, match=r"row 2: no 'Score: N/10' in the judge's answer 'no verdict'"):
        GenerativeJudge(generate=stub, policy="error")(prompts=prompts, completions=["good", "bad", "junk"])


@pytest.mark.slow
@pytest.mark.vllm
def test_judge_runs_through_vllm_on_the_tiny_model(tiny_model_dir):
    """The random tiny model writes random text: the check is that the engine starts with the CPU
    settings and one value (or None) comes back per completion."""
    judge = GenerativeJudge(str(tiny_model_dir), max_tokens=12, max_model_len=512)
    try:
        out = judge(prompts=[_chat("Mia has 3 apples. She finds 4 more. How many?")] * 3,
                    completions=["3 + 4 = 7. \\boxed{7}", "\\boxed{6}", "7 " * 600])
        assert len(out) == 3 and all(v is None or 0.0 <= v <= 1.0 for v in out)
        assert all(isinstance(a, str) for a in judge.last_answers[:2])
        assert out[2] is None and judge.last_answers[2] is None  # too long for max_model_len: skipped
    finally:
        judge.close()


# --- `rm score` and `rm train` on the command line -------------------------------------------------
def test_rm_score_cli(untrained_rm, tmp_path):
    rows = [{"prompt": "Mia has 3 apples. She finds 4 more apples. How many?", "completion": "\\boxed{7}", "id": 1},
            {"prompt": _chat("Leo has 5 coins. He loses 2 coins. How many?"),
             "completion": [{"role": "assistant", "content": "\\boxed{3}"}], "id": 2},
            {"prompt": "q", "completion": "", "id": 3}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main_rm(["score", "--model", str(untrained_rm), "--input", str(src), "--output", str(dst),
                    "--batch_size", "2"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2, 3] and all(isinstance(r["score"], float) for r in out)
    direct = RewardModelScorer(untrained_rm)([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert [r["score"] for r in out] == pytest.approx(direct, abs=1e-5)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n', r"in\.jsonl line 2: missing 'completion'"),
    ('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "completion": \n', r"in\.jsonl line 2: invalid JSON"),
    ('["q", "a"]\n', r"in\.jsonl line 1: expected a JSON object"),
    ('{"prompt": 3, "completion": "a"}\n', r"in\.jsonl line 1: 'prompt' must be text or a list"),
    ("\n", r"in\.jsonl: no rows"),
])
def test_rm_score_cli_bad_input(untrained_rm, tmp_path, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(RewardError, match=message):
        main_rm(["score", "--model", str(untrained_rm), "--input", str(src), "--output", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


def test_rm_score_input_that_is_not_utf8_names_its_line(tmp_path, capsys):
    """Was a UnicodeDecodeError traceback; checked before the model is loaded."""
    import cli
    from posttrain.rm.cli import read_score_rows

    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(RewardError, match=r"latin1\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at column 16: "):
        read_score_rows(src)
    out = tmp_path / "o.jsonl"
    argv = ["rm", "score", "--model", str(tmp_path), "--input", str(src), "--output", str(out)]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().startswith(f"dsv3-posttrain rm: error: {src} line 2: not valid UTF-8")
    assert not out.exists()


def test_rm_score_output_that_cannot_be_written_is_named_before_scoring(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "completion": "a"}\n')
    (tmp_path / "afile").write_text("keep me\n")
    for output, message in ((tmp_path, "is a directory; give a file path"),
                            (tmp_path / "afile" / "o.jsonl", "afile exists and is not a directory")):
        with pytest.raises(ConfigError, match=f"^output: {output}.*{message}$"):
            main_rm(["score", "--model", str(tmp_path / "no-model"), "--input", str(src), "--output", str(output)])
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_rm_cli_help_and_usage_errors(capsys, tmp_path):
    assert main_rm(["--help"]) == 0 and "rm train" in capsys.readouterr().out
    assert main_rm(["train", "--help"]) == 0
    assert "--model_name_or_path" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown action 'fit'"):
        main_rm(["fit"])
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'.*learning_rate"):
        main_rm(["train", "--recipe", str(RECIPE), "--lerning_rate", "1e-3"])
    with pytest.raises(RewardError, match="no such file"):
        main_rm(["score", "--model", str(tmp_path), "--input", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")])


def test_rm_tiny_recipe_validates():
    cfg = load_config(RMRecipeConfig, RECIPE)
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    assert cfg.dataset_name == "builtin:arith-preferences" and cfg.effective_eval_dataset() == (
        "builtin:arith-preferences?balanced=1", "test")
    assert cfg.max_length == 256 and cfg.learning_rate == 1e-3 and cfg.max_steps == 200 and cfg.torch_num_threads == 1
    assert load_config(RMRecipeConfig, RECIPE, ["--dataset_name", "pairs.jsonl"]).effective_eval_dataset() is None
    with pytest.raises(ConfigError, match="'max_steps' expects int"):
        load_config(RMRecipeConfig, RECIPE, ["--max_steps", "many"])


# --- found in review: seeding, periodic evaluation, margins, ties, FP8 backbones, loader errors -----------
def _pairs_file(tmp_path: Path, rows: list[dict]) -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


_PAIRS = [{"prompt": "Mia has 3 apples. She finds 4 more. How many?", "chosen": "\\boxed{7}", "rejected": "\\boxed{1}"},
          {"prompt": "Leo has 5 coins. He loses 2. How many?", "chosen": "\\boxed{3}", "rejected": "\\boxed{7}"}]


def test_rm_train_seed_repeats_the_scalar_head(tiny_model_dir, tmp_path):
    """The head is new and was drawn before Trainer seeds: two runs with one `seed` trained different RMs."""
    import torch
    from safetensors.torch import load_file

    from posttrain.rm.run import run_rm_training

    data = _pairs_file(tmp_path, _PAIRS)
    heads = []
    for run in (1, 2):
        torch.manual_seed(run)  # whatever the process drew before must not matter
        out = tmp_path / f"o{run}"
        run_rm_training(load_config(RMRecipeConfig, RECIPE, {
            "model_name_or_path": str(tiny_model_dir), "dataset_name": str(data), "output_dir": str(out),
            "max_steps": 1, "per_device_train_batch_size": 2, "disable_tqdm": True}))
        heads.append(load_file(str(out / "model.safetensors"))["score.weight"])
    assert torch.equal(heads[0], heads[1])


def test_rm_train_evaluates_during_training_when_eval_strategy_asks(tiny_model_dir, tmp_path, capsys):
    """`eval_strategy: steps` was a ValueError traceback from Trainer (no eval_dataset was passed)."""
    from posttrain.rm.run import run_rm_training

    data = str(_pairs_file(tmp_path, _PAIRS))
    cfg = load_config(RMRecipeConfig, RECIPE, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": data, "eval_dataset_name": data,
        "dataset_test_split": "train", "output_dir": str(tmp_path / "o"), "max_steps": 1,
        "per_device_train_batch_size": 2, "eval_strategy": "steps", "eval_steps": 1, "disable_tqdm": True})
    summary = run_rm_training(cfg)
    assert summary["global_step"] == 1 and summary["eval_pairs"] == 2
    assert "'eval_accuracy'" in capsys.readouterr().out  # TRL's held-out accuracy, logged at the step
    cfg = load_config(RMRecipeConfig, RECIPE, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": data, "output_dir": str(tmp_path / "o2"), "max_steps": 1, "eval_strategy": "steps"})
    with pytest.raises(ConfigError, match="eval_strategy='steps' evaluates on held-out pairs.*eval_dataset_name"):
        run_rm_training(cfg)


def test_preference_margin_must_be_finite():
    """A NaN margin (JSON `NaN`, pandas' missing value) made the loss NaN and then every weight, exit 0."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"p\.jsonl line 2: 'margin' must be a finite number, got (nan|inf)"):
            to_preference_example({"prompt": "q", "chosen": "a", "rejected": "b", "margin": bad,
                                   "__where__": "p.jsonl line 2"})
    assert to_preference_example({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2})["margin"] == 2.0


def test_preference_pairs_with_the_same_response_are_dropped(caplog):
    """chosen == rejected scores equal by construction: no gradient, and a miss in every accuracy."""
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": "a"}]}]
    with caplog.at_level("WARNING"):
        examples = to_preference_examples(rows, source="pairs")
    assert [e["rejected"][0]["content"] for e in examples] == ["b"]
    assert "dropped 1 pair(s)" in caplog.text and "pairs row 1" in caplog.text
    with pytest.raises(UserError, match="pairs: every pair has the same chosen and rejected response"):
        to_preference_examples(rows[1:], source="pairs")


def test_backbone_loads_from_an_fp8_checkpoint(tiny_model_dir, tmp_path):
    """The released V3 and an `fp8: true` SFT output are block-FP8 checkpoints; `rm train` on one was a
    RuntimeError traceback from transformers' FP8 loading. Dequantized as SFT and GRPO load them."""
    import torch

    from posttrain.fp8.convert import convert_bf16_to_fp8
    from posttrain.rm.model import load_reward_backbone, load_tokenizer

    fp8 = tmp_path / "fp8"
    convert_bf16_to_fp8(tiny_model_dir, fp8, progress=False)
    tok = load_tokenizer(str(fp8))
    rm = load_reward_backbone(str(fp8), tok)
    ref = load_reward_backbone(str(tiny_model_dir), tok).state_dict()
    assert rm.config.num_labels == 1 and not hasattr(rm.config, "quantization_config")
    state = rm.state_dict()
    assert set(state) == set(ref)
    experts = "model.layers.1.mlp.experts.gate_up_proj"  # FP8-quantized: close to the bf16 source, not equal
    assert torch.allclose(state[experts], ref[experts], atol=0.05) and not torch.equal(state[experts], ref[experts])


def test_reward_model_spec_bad_options_and_unfinished_directory(untrained_rm, tmp_path):
    """Each was a traceback (AttributeError, RuntimeError, AssertionError, OSError) out of a GRPO recipe's
    `reward_model:PATH(...)` or `rm score --device`."""
    import shutil

    for options, message in (("dtype='fp16'", "dtype must name a torch floating-point type .* got 'fp16'"),
                             ("device='gpu'", "device 'gpu'"),
                             ("device='cuda:7'", "device 'cuda:7', but torch sees"),
                             ("max_length=0", r"max_length must be >= 2, got 0")):  # 0 was read as unset
        with pytest.raises(RewardError, match=message):
            rewards.resolve(f"reward_model:{untrained_rm}({options})")
    partial = tmp_path / "partial"
    shutil.copytree(untrained_rm, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(RewardError, match="partial: cannot load its weights"):
        rewards.resolve(f"reward_model:{partial}")


def test_the_final_held_out_accuracy_uses_the_pairs_trls_evaluation_uses(tiny_model_dir, tmp_path):
    """TRL's evaluation drops pairs longer than max_length; the final summary's eval_accuracy / eval_margin scored
    every pair with long rows shortened (0.5625 on 16 pairs where TRL said 0.875 on 8, for the same weights)."""
    from posttrain.rm.run import run_rm_training

    long = "\\boxed{7} because " + "seven is the count " * 12
    rows = _PAIRS + [{**_PAIRS[0], "rejected": long}, {**_PAIRS[1], "rejected": long}]
    data = str(_pairs_file(tmp_path, rows))
    summary = run_rm_training(load_config(RMRecipeConfig, RECIPE, {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": data, "eval_dataset_name": data,
        "dataset_test_split": "train", "output_dir": str(tmp_path / "o"), "max_steps": 1, "max_length": 40,
        "per_device_train_batch_size": 2, "disable_tqdm": True}))
    # the two long pairs: dropped by TRL from training and from its evaluation, and now from the summary's too
    assert summary["train_pairs"] == 2 and summary["dropped_too_long"] == 2
    assert summary["eval_pairs"] == 2 and summary["eval_pairs_dropped_too_long"] == 2


def test_preference_rows_in_trls_implicit_prompt_format_and_multi_turn_responses():
    """TRL's implicit-prompt rows (chosen/rejected are whole conversations sharing their opening turns) were
    refused for want of a 'prompt'; a response with a user turn inside was merged into one assistant reply."""
    q = {"role": "user", "content": "What is 2+2?"}
    ex = to_preference_example({"chosen": [q, {"role": "assistant", "content": "4"}],
                                "rejected": [q, {"role": "assistant", "content": "5"}]})
    assert ex["prompt"] == [q] and ex["chosen"][0]["content"] == "4" and ex["rejected"][0]["content"] == "5"
    with pytest.raises(UserError, match="share no opening turn"):
        to_preference_example({"chosen": [{"role": "assistant", "content": "4"}],
                               "rejected": [{"role": "assistant", "content": "5"}]})
    with pytest.raises(UserError, match=r"'chosen' has a user turn; a response is assistant messages only"):
        to_preference_example({"prompt": "2+2?", "rejected": "5", "chosen": [
            {"role": "assistant", "content": "x"}, {"role": "user", "content": "really?"},
            {"role": "assistant", "content": "4"}]})
