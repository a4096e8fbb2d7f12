"""Sample-masked SFT (issue 4): data → packing → isolation → MTP → trainer → checkpoint round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_pipelines.errors import DataError
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP, sample_ids_from_positions
from data_pipelines.arith_task import sft_rows
from posttrain.recipe import build_config, load_config
from posttrain.sft import SFTRecipeConfig, build_trainer, run_sft
from posttrain.sft.data import IGNORE_INDEX, tokenize_dataset
from posttrain.sft.packing import PackedCollator, pack_samples
from subprocess_env import repo_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def distill_dir(tmp_path_factory) -> Path:
    """A distill output directory: kept rows in data/train-*.jsonl, plus what else distill writes."""
    root = tmp_path_factory.mktemp("distill")
    rows = sft_rows(240)
    write_jsonl(root / "data" / "train-00000.jsonl", rows[:120])
    write_jsonl(root / "data" / "train-00001.jsonl", rows[120:])
    write_jsonl(root / "rejected" / "rejected-00000.jsonl",
                [{"id": "r", "prompt": rows[0]["messages"][:1], "response": "wrong", "rejection_reason": "wrong"}])
    write_jsonl(root / "ledger.jsonl", [{"index": 0, "ids": ["a"]}])
    (root / "run_config.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _cfg(model_dir, data, out, **kw) -> SFTRecipeConfig:
    values = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out),
        max_steps=20, learning_rate=3e-3, warmup_steps=3, lr_scheduler_kwargs={"min_lr": 3e-4},
        per_device_train_batch_size=2, max_length=256, logging_steps=1, save_steps=10, seed=0,
        disable_tqdm=True,
    )
    values.update(kw)
    return build_config(SFTRecipeConfig, values)


# ---------------------------------------------------------------------------------------------
# data


def test_messages_loss_on_assistant_tokens_only(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "<think>\n4 + 4 = 8\n</think>\n\nThe answer is \\boxed{8}."},
    ]
    ds, stats = tokenize_dataset(_ds([{"messages": msgs}]), tokenizer, max_length=512)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert labels[0] == IGNORE_INDEX and ids[0] == tokenizer.bos_token_id
    targets = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    eos = tokenizer.eos_token
    assert targets == "It is 5." + eos + msgs[-1]["content"] + eos  # both turns, each with its end-of-turn
    assert stats.target_tokens == sum(t != IGNORE_INDEX for t in labels) and stats.format == "messages"


def test_prompt_completion_formats(tokenizer):
    conv = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
            "completion": [{"role": "assistant", "content": "The answer is \\boxed{5}."}]}
    ds, _ = tokenize_dataset(_ds([conv]), tokenizer, max_length=512)
    targets = tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX])
    assert targets == "The answer is \\boxed{5}." + tokenizer.eos_token
    plain = {"prompt": "2 + 3 =", "completion": " 5"}
    ds, stats = tokenize_dataset(_ds([plain]), tokenizer, max_length=512)
    assert tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX]) == " 5" + tokenizer.eos_token
    assert stats.format == "prompt_completion"


def test_conversational_prompt_completion_trains_on_assistant_turns_only(tokenizer):
    """As TRL: the assistant mask applies on top of the completion mask. Before, a completion's later user
    turn was trained on, and with completion_only_loss=False the system and user turns of the prompt."""
    eos = tokenizer.eos_token
    multi = {"prompt": [{"role": "user", "content": "q1"}],
             "completion": [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a2"}]}
    as_messages = {"messages": multi["prompt"] + multi["completion"]}
    system = {"prompt": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q1"}],
              "completion": [{"role": "assistant", "content": "a1"}]}

    def targets(row, **kw):
        ds, _ = tokenize_dataset(_ds([row]), tokenizer, max_length=512, **kw)
        return tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE_INDEX])

    assert targets(multi) == targets(as_messages) == f"a1{eos}a2{eos}"
    assert targets(system, completion_only_loss=False) == f"a1{eos}"
    assert targets(system, assistant_only_loss=False, completion_only_loss=False).startswith("SYS")  # asked for


def test_a_tool_turn_the_chat_template_drops_is_a_bad_row(tokenizer):
    """The embedded template has no tool branch: the tool's output vanished from the sample, and the answer
    after it was trained without the output it answers."""
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "call"},
                        {"role": "tool", "content": "TOOL_RESULT_42"}, {"role": "assistant", "content": "it is 42"}]}
    with pytest.raises(DataError, match=r"row 0: message 2 \(role 'tool'\) is not in the chat template's rendering"):
        tokenize_dataset(_ds([row]), tokenizer, max_length=512)
    ds, stats = tokenize_dataset(_ds([row, {"messages": row["messages"][:2]}]), tokenizer, max_length=512,
                                 on_bad_row="skip")
    assert len(ds) == 1 and stats.bad_rows == 1


def test_too_long_samples_dropped_or_truncated_and_counted(tokenizer):
    rows = sft_rows(12)
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
    limit = sorted(lengths)[6]
    n_long = sum(n > limit for n in lengths)
    ds, stats = tokenize_dataset(_ds(rows), tokenizer, max_length=limit, truncation="drop")
    assert stats.too_long == stats.dropped_too_long == n_long > 0 and len(ds) == 12 - n_long
    ds, stats = tokenize_dataset(_ds(rows), tokenizer, max_length=limit, truncation="truncate")
    assert stats.truncated == n_long and max(len(x) for x in ds["input_ids"]) == limit
    assert len(ds) + stats.dropped_no_target == 12


def test_bad_rows_name_the_row_or_are_skipped_and_counted(tmp_path, tokenizer):
    from data_pipelines.loading import load_rows

    good = sft_rows(3)
    rows = [good[0], {"id": "x", "answer": "1"}, good[1],
            {"messages": [{"role": "user", "content": "hi"}]}, good[2]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    ds = load_rows(str(path), "train")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: no 'messages'"):
        tokenize_dataset(ds, tokenizer, max_length=512, source=str(path))
    ds2 = load_rows(str(write_jsonl(tmp_path / "bad2.jsonl", [good[0], rows[3]])), "train")
    with pytest.raises(DataError, match=r"bad2\.jsonl line 2: conversation has no assistant turn"):
        tokenize_dataset(ds2, tokenizer, max_length=512)
    out, stats = tokenize_dataset(ds, tokenizer, max_length=512, on_bad_row="skip")
    assert len(out) == 3 and stats.bad_rows == 2
    assert [b["location"].rsplit(" ", 1)[-1] for b in stats.bad_examples] == ["2", "4"]
    bad_msg = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}]
    with pytest.raises(DataError, match="row 0: messages message 1 is not a"):
        tokenize_dataset(_ds(bad_msg), tokenizer, max_length=512)
    with pytest.raises(DataError, match="empty"):
        tokenize_dataset(_ds([]), tokenizer, max_length=512)
    with pytest.raises(DataError, match=r"'messages' column.*columns are: \['question'\]"):
        tokenize_dataset(_ds([{"question": "q"}]), tokenizer, max_length=512)
    with pytest.raises(DataError, match="no trainable sample left"):
        tokenize_dataset(_ds([rows[3]]), tokenizer, max_length=512, on_bad_row="skip")


def test_run_sft_reports_bad_input_as_user_errors(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        run_sft(_cfg(tiny_model_dir, empty, tmp_path / "o1"))
    with pytest.raises(DataError, match="no such file"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "o2"))


# ---------------------------------------------------------------------------------------------
# packing


def _samples(tokenizer, n=60, max_length=256):
    ds, _ = tokenize_dataset(_ds(sft_rows(n)), tokenizer, max_length=max_length)
    return ds


def test_bfd_packing_keeps_every_sample_whole(tokenizer):
    samples = _samples(tokenizer)
    packed = pack_samples(samples, 512)
    assert len(packed) < len(samples) / 4
    assert all(len(r) <= 512 and sum(s) == len(r) for r, s in zip(packed["input_ids"], packed["seq_lengths"]))
    originals = sorted(tuple(x) for x in samples["input_ids"])
    pieces = []
    for ids, lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        start = 0
        for n in lengths:
            pieces.append(tuple(ids[start:start + n]))
            start += n
    assert sorted(pieces) == originals
    fill = sum(map(len, packed["input_ids"])) / (512 * len(packed))
    assert fill > 0.9


def test_collator_isolates_samples(tokenizer):
    packed = pack_samples(_samples(tokenizer), 256)
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id)([packed[0], packed[len(packed) - 1]])
    assert "attention_mask" not in batch
    pos, labels, mask = batch["position_ids"], batch["labels"], batch["token_mask"]
    for r, lengths in enumerate([packed[0]["seq_lengths"], packed[len(packed) - 1]["seq_lengths"]]):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        assert pos[r, starts].tolist() == [0] * len(starts)
        assert (labels[r, starts] == IGNORE_INDEX).all()  # no sample's first token is a target
        n = sum(lengths)
        assert mask[r, :n].all() and not mask[r, n:].any()
        if n < pos.shape[1]:  # the pad tail is a segment of its own, never a target
            assert pos[r, n] == 0 and (labels[r, n:] == IGNORE_INDEX).all()
    assert batch["num_tokens"] == int(mask.sum())
    flat = PackedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)([packed[0], packed[1]])
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["cu_seq_lens_q"].tolist()[-1] == flat["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------
# isolation: the packed-attention traps


def _alone_and_packed(model, samples, collated, row=0, lengths=None):
    ids, pos = collated["input_ids"][row:row + 1], collated["position_ids"][row:row + 1]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits[0]
        alone = [model(torch.tensor([s]), use_cache=False).logits[0] for s in samples]
    return packed, alone


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_segmented"])
def test_packed_samples_equal_their_solo_runs(attn, tiny_model_dir, tokenizer):
    if attn == "sdpa_segmented":
        from posttrain.sft.attention import register_segmented_sdpa

        register_segmented_sdpa()
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                         attn_implementation=attn).eval()
    samples = _samples(tokenizer, 12)
    rows = [{"input_ids": sum(samples["input_ids"][0:3], []), "labels": sum(samples["labels"][0:3], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][0:3]]},
            {"input_ids": sum(samples["input_ids"][3:5], []), "labels": sum(samples["labels"][3:5], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][3:5]]}]
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id)(rows)  # row 1 gets a pad tail
    with torch.no_grad():
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
        leak_mask = model(batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
        leak_cache = model(batch["input_ids"], position_ids=batch["position_ids"]).logits  # default use_cache
    losses, counts = [], []
    for r, idx in enumerate([(0, 1, 2), (3, 4)]):
        start = 0
        for i in idx:
            s, lab = samples["input_ids"][i], samples["labels"][i]
            with torch.no_grad():
                solo = model(torch.tensor([s]), labels=torch.tensor([lab]), use_cache=False)
            seg = slice(start, start + len(s))
            assert (out.logits[r, seg] - solo.logits[0]).abs().max() <= 1e-5
            if start > 0 and attn != "sdpa_segmented":  # a later sample sees its predecessors through either trap
                assert (leak_mask[r, seg] - solo.logits[0]).abs().max() > 1e-3
                assert (leak_cache[r, seg] - solo.logits[0]).abs().max() > 1e-3
            elif attn == "sdpa_segmented":  # samples come from position_ids, whatever the mask or cache
                assert (leak_mask[r, seg] - solo.logits[0]).abs().max() <= 1e-5
                assert (leak_cache[r, seg] - solo.logits[0]).abs().max() <= 1e-5
            losses.append(solo.loss)
            counts.append(sum(t != IGNORE_INDEX for t in lab[1:]))
            start += len(s)
    weighted = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    assert torch.allclose(out.loss, weighted, atol=1e-5)


def test_padding_free_flat_row_is_isolated_too(tiny_model_dir, tokenizer):
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = _samples(tokenizer, 6)
    rows = [{"input_ids": s, "labels": l} for s, l in zip(samples["input_ids"][:4], samples["labels"][:4])]
    flat = PackedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=64)(rows)
    kwargs = {k: flat[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with torch.no_grad():
        logits = model(flat["input_ids"], position_ids=flat["position_ids"], use_cache=False, **kwargs).logits[0]
        start = 0
        for s in samples["input_ids"][:4]:
            solo = model(torch.tensor([s]), use_cache=False).logits[0]
            assert (logits[start:start + len(s)] - solo).abs().max() <= 1e-5
            start += len(s)


def test_segmented_attention_matches_sdpa_with_padding_and_cache(tiny_model_dir, tokenizer):
    """The CPU kernel is plain SDPA whenever a padding mask or a KV cache is in play."""
    from posttrain.sft.attention import register_segmented_sdpa

    name = register_segmented_sdpa()
    ref = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seg = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                       attn_implementation=name).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True)
               for c in ("Mia has 3 apples. She finds 4 more apples. How many apples does Mia have?", "2 + 2?")]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        a = ref.generate(**enc, max_new_tokens=8, do_sample=False)
        b = seg.generate(**enc, max_new_tokens=8, do_sample=False)
        la = ref(**enc, use_cache=False).logits
        lb = seg(**enc, use_cache=False).logits
    assert torch.equal(a, b)
    real = enc["attention_mask"].bool()
    assert (la[real] - lb[real]).abs().max() <= 1e-5


def test_segmented_attention_reads_the_sample_bounds_once_per_forward(tiny_model_dir):
    """Every layer (MTP included) gets the same position ids: the host reads them once per forward, not once
    per layer (on CUDA each read waits for the GPU); new or changed position ids are read again."""
    from host_sync import HostSyncRecorder
    from posttrain.sft.attention import register_segmented_sdpa

    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                         attn_implementation=register_segmented_sdpa()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).logits
        reads = []
        for position_ids in (pos.clone(), pos.clone()):
            with HostSyncRecorder() as rec:
                got = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).logits
                position_ids[0, 12:] = torch.arange(18)  # in place: the same values, a new version
                model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)
            reads.append(rec.syncs.count("Tensor.tolist"))
            assert torch.equal(got, want)
    assert reads == [2, 2]  # one per forward (2 main layers + MTP would be 3 each, read per layer)


def test_segmented_attention_runs_under_torch_compile_at_changing_row_widths(tiny_model_dir):
    """`torch_compile: true` on the CPU default: the compiled model trains on one packed row after another.
    Dynamo used to trace the per-sample split, with the sample bounds read through the per-forward cache:
    a later row (of ~20 samples, as the built-in task packs them) was split by another row's bounds ("Split
    sizes add up to 101 but got the tensor's size of s50"; in `dsv3-posttrain sft --torch_compile true`, by
    unrelated symbols). The compiled model's losses and gradients are the eager model's."""
    from posttrain.sft.attention import register_segmented_sdpa

    torch._dynamo.reset()
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                         attn_implementation=register_segmented_sdpa()).train()
    compiled = torch.compile(model, backend="aot_eager")
    weight = model.model.layers[0].self_attn.o_proj.weight
    rows = []
    for k in (20, 21, 19):
        lengths = torch.randint(2, 12, (k,), generator=torch.Generator().manual_seed(k))
        pos = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
        rows.append((torch.randint(0, model.config.vocab_size, pos.shape, generator=torch.Generator().manual_seed(k)), pos))
    got = {}
    for name, fn in (("compiled", compiled), ("eager", model)):  # the compiled rows in a row, as training runs them
        got[name] = []
        for ids, pos in rows:
            out = fn(input_ids=ids, position_ids=pos, labels=ids, use_cache=False, return_logits=False)
            (out.loss + out.mtp_loss).backward()
            got[name].append((out.loss.detach(), out.mtp_loss.detach(), weight.grad.clone()))
            model.zero_grad()
    torch.testing.assert_close(got["compiled"], got["eager"], rtol=1e-5, atol=1e-6)


def test_attention_defaults_per_device_and_flex_refused_for_cpu_training(tmp_path):
    """Unset attn_implementation: flex_attention on CUDA, sdpa_segmented on CPU; both read samples
    from position_ids, so padding_free (one flat row per batch) follows. flex has no CPU backward:
    a CPU run asking for it stops at model load with the reason, not deep inside backward."""
    from posttrain.errors import ConfigError
    from posttrain.sft.attention import default_attn_implementation

    assert default_attn_implementation("cuda") == "flex_attention"
    assert default_attn_implementation("cpu") == "sdpa_segmented"
    cfg = SFTRecipeConfig(output_dir=str(tmp_path))
    expected = "flex_attention" if torch.cuda.is_available() else "sdpa_segmented"
    assert cfg.resolved_attn_implementation() == expected and cfg.resolved_padding_free()
    assert cfg.model_kwargs()["attn_implementation"] == expected
    assert not SFTRecipeConfig(output_dir=str(tmp_path), attn_implementation="sdpa").resolved_padding_free()
    flex_cpu = SFTRecipeConfig(output_dir=str(tmp_path), attn_implementation="flex_attention", use_cpu=True)
    assert flex_cpu.resolved_padding_free()
    with pytest.raises(ConfigError, match="flex_attention.*CPU.*sdpa_segmented"):
        flex_cpu.model_kwargs()


def _token_mask(block_mask, batch: int, length: int) -> torch.Tensor:
    """[batch, q, kv] booleans of a flex BlockMask, from its mask_mod (token level, not block level)."""
    b = torch.arange(batch)[:, None, None]
    q, kv = torch.arange(length)[None, :, None], torch.arange(length)[None, None, :]
    return block_mask.mask_mod(b, torch.zeros((), dtype=torch.long), q, kv)


def test_flex_block_mask_isolates_packed_samples_in_main_and_mtp_layers(tiny_model_dir, tokenizer):
    """transformers' flex_attention mask builder (masking_utils.flex_attention_mask, 5.19) on packed
    rows: every attention layer, the MTP block's included, gets a BlockMask that is causal inside
    each sample (position_ids restarts) and empty across samples, pad tail included. The attention
    is then run as SDPA over that mask (torch's flex kernel needs a compile on CPU and has no CPU
    backward): packed logits and MTP loss equal each sample run alone."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    seen: list[tuple[int, object]] = []

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen.append((module.layer_idx, attention_mask))
        dense = _token_mask(attention_mask, query.shape[0], query.shape[2]).unsqueeze(1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("flex_mask_probe", probe)
    AttentionMaskInterface.register("flex_mask_probe", flex_attention_mask)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                         attn_implementation="flex_mask_probe").eval()
    samples = _samples(tokenizer, 12)
    rows = [{"input_ids": sum(samples["input_ids"][0:3], []), "labels": sum(samples["labels"][0:3], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][0:3]]},
            {"input_ids": sum(samples["input_ids"][3:5], []), "labels": sum(samples["labels"][3:5], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][3:5]]}]
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id)(rows)  # row 1 gets a pad tail
    # eager create_block_mask: transformers asks for a compiled one, ~20 s of C++ compile on CPU
    # (torch internals: the `torch._dynamo.config.disable` switch, torch 2.13)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
    n_main = model.config.num_hidden_layers
    assert sorted(i for i, _ in seen) == list(range(n_main + 1))  # the MTP block is layers[n_main]
    sid = sample_ids_from_positions(batch["position_ids"])
    length = sid.shape[1]
    expected = (sid[:, :, None] == sid[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    for layer, mask in seen:
        assert isinstance(mask, BlockMask), layer
        assert torch.equal(_token_mask(mask, 2, length), expected), layer
    solo_model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    mtp_sum, mtp_n = 0.0, 0
    for r, idx in enumerate([(0, 1, 2), (3, 4)]):  # each sample alone, on the plain sdpa model
        start = 0
        for i in idx:
            s, lab = samples["input_ids"][i], samples["labels"][i]
            with torch.no_grad():
                solo = solo_model(torch.tensor([s]), labels=torch.tensor([lab]), use_cache=False)
            assert (out.logits[r, start:start + len(s)] - solo.logits[0]).abs().max() <= 1e-5
            n = sum(t != IGNORE_INDEX for t in lab[2:])  # MTP targets: labels[j + 2] inside the sample
            mtp_sum, mtp_n, start = mtp_sum + float(solo.mtp_loss) * n, mtp_n + n, start + len(s)
    assert float(out.mtp_loss) == pytest.approx(mtp_sum / mtp_n, rel=1e-5)


@pytest.mark.slow
def test_flex_attention_forward_on_cpu_equals_segmented_sdpa(tiny_model_dir, tokenizer):
    """transformers' own `flex_attention` (compiled; forward only on CPU) on packed rows gives the
    logits and MTP loss of the per-sample kernel. ~25 s: the compile of the block mask and kernel."""
    from posttrain.sft.attention import register_segmented_sdpa

    samples = _samples(tokenizer, 6)
    rows = [{"input_ids": sum(samples["input_ids"][0:3], []), "labels": sum(samples["labels"][0:3], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][0:3]]}]
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id)(rows)
    outs = {}
    for attn in ("flex_attention", register_segmented_sdpa()):
        model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                             attn_implementation=attn).eval()
        with torch.no_grad():
            outs[attn] = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                               use_cache=False)
    flex, seg = outs["flex_attention"], outs["sdpa_segmented"]
    assert (flex.logits - seg.logits).abs().max() <= 1e-5
    torch.testing.assert_close(flex.mtp_loss, seg.mtp_loss, rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_flex_attention_training_step_on_cuda_matches_segmented_sdpa(tiny_model_dir, tokenizer):
    """The CUDA default kernel, forward and backward (fp32, TF32 off): loss, MTP loss and every
    gradient of a packed-row step equal the per-sample SDPA kernel's."""
    from posttrain.sft.attention import register_segmented_sdpa

    torch.backends.cuda.matmul.allow_tf32 = False
    samples = _samples(tokenizer, 12)
    rows = [{"input_ids": sum(samples["input_ids"][i:i + 3], []), "labels": sum(samples["labels"][i:i + 3], []),
             "seq_lengths": [len(x) for x in samples["input_ids"][i:i + 3]]} for i in (0, 3)]
    batch = {k: v.to("cuda") for k, v in PackedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows).items()
             if isinstance(v, torch.Tensor)}
    results = {}
    for attn in ("flex_attention", register_segmented_sdpa()):
        model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                             attn_implementation=attn).to("cuda")
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False,
                    return_logits=False)
        (out.loss + 0.3 * out.mtp_loss).backward()
        results[attn] = (out.loss.detach(), out.mtp_loss.detach(),
                         {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    flex, seg = results["flex_attention"], results["sdpa_segmented"]
    torch.testing.assert_close(flex[0], seg[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(flex[1], seg[1], rtol=1e-5, atol=0)
    for name, g in seg[2].items():
        assert float((flex[2][name] - g).abs().max()) <= 1e-4 * float(g.abs().max()) + 1e-8, name


# ---------------------------------------------------------------------------------------------
# MTP (report §2.2)


def test_mtp_targets_never_cross_sample_boundaries(tiny_model_dir, tokenizer):
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a = _samples(tokenizer, 4)
    ids_a, lab_a = a["input_ids"][0], list(a["labels"][0])
    ids_b, lab_b = a["input_ids"][1], list(a["labels"][1])
    with torch.no_grad():
        solo_a = model(torch.tensor([ids_a]), labels=torch.tensor([lab_a]), use_cache=False)
        # A's last position predicts, two ahead, the 2nd token after A: in a packed row that is B's
        # second token. Make it the token A's MTP head wants most there, and a target of B.
        bait = int(solo_a.mtp_logits[0][0, -1].argmax())
        ids_b = [ids_b[0], bait] + ids_b[2:]
        lab_b = [IGNORE_INDEX, bait] + lab_b[2:]
        solo_b = model(torch.tensor([ids_b]), labels=torch.tensor([lab_b]), use_cache=False)
        ids = torch.tensor([ids_a + ids_b])
        labels = torch.tensor([lab_a + lab_b])
        pos = torch.tensor([list(range(len(ids_a))) + list(range(len(ids_b)))])
        packed = model(ids, position_ids=pos, labels=labels, use_cache=False)

    def n_mtp(lab):  # MTP targets of a sample: labels[i + 2] for positions i inside it
        return sum(t != IGNORE_INDEX for t in lab[2:])

    na, nb = n_mtp(lab_a), n_mtp(lab_b)
    expected = (solo_a.mtp_loss * na + solo_b.mtp_loss * nb) / (na + nb)
    assert torch.allclose(packed.mtp_loss, expected, atol=1e-5)
    # the same logits scored with a sample-blind shift (targets may come from B) give another loss
    logits = packed.mtp_logits[0][0]
    naive = torch.full_like(labels[0], IGNORE_INDEX)
    naive[:-2] = labels[0, 2:]
    assert naive[len(ids_a) - 1] == bait
    leaky = torch.nn.functional.cross_entropy(logits, naive, ignore_index=IGNORE_INDEX)
    assert abs(leaky - packed.mtp_loss) > 1e-4


def test_mtp_weight_schedule():
    cfg = SFTRecipeConfig(output_dir="x", mtp_loss_weight=0.3, mtp_loss_weight_final=0.1, mtp_loss_weight_switch=0.5)
    assert [cfg.mtp_weight_at(s, 10) for s in (0, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]
    assert SFTRecipeConfig(output_dir="x").mtp_weight_at(99, 100) == 0.3


# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def trained(tiny_model_dir, distill_dir, tmp_path_factory):
    """One short SFT run on the built-in task's scripted traces (distill layout), kept in memory."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = _cfg(tiny_model_dir, distill_dir, out)
    trainer = build_trainer(cfg)
    summary = run_sft(cfg, trainer=trainer)
    return {"cfg": cfg, "trainer": trainer, "summary": summary, "out": out}


@pytest.mark.parametrize("field, value", [
    ("loss_type", "dft"), ("router_aux_loss_coef", "0.001"), ("chat_template_path", "my_template.jinja"),
    ("eos_token", "<|end|>"), ("shuffle_dataset", "true"), ("truncation_mode", "keep_end"),
    ("activation_offloading", "true"), ("eval_packing", "false"), ("dataset_text_field", "content"),
])
def test_sftrainer_options_this_sft_does_not_apply_are_refused(field, value, tmp_path, capsys):
    """TRL SFTConfig options that only SFTTrainer reads were listed in `sft --help` and accepted, then dropped:
    `--loss_type dft` trained plain NLL, `--chat_template_path` kept the tokenizer's template. Now each is a
    ConfigError naming the field, and `sft --help` does not offer it; its default still passes."""
    import cli
    from posttrain.errors import ConfigError
    from posttrain.recipe import load_config

    with pytest.raises(ConfigError, match=rf"^{field}=.* is an option of TRL's SFTTrainer that this SFT "
                       "does not apply: .*; leave it unset$"):
        load_config(SFTRecipeConfig, None, ["--output_dir", str(tmp_path), f"--{field}", value])
    load_config(SFTRecipeConfig, None, ["--output_dir", str(tmp_path), "--loss_type", "nll", "--eval_packing", "true"])
    assert cli.main(["sft", "--help"]) == 0
    assert f"--{field} " not in capsys.readouterr().out


def test_pad_to_multiple_of_help_says_what_auto_does_with_fp8(tmp_path, monkeypatch):
    """`sft --help` gave TRL's text, "'auto' pads to a multiple of 128 on Neuron ... and does not pad elsewhere",
    while `auto` pads to 128 when fp8 trains on CUDA."""
    import dataclasses

    from posttrain.sft import config as sft_config

    help_text = {f.name: f for f in dataclasses.fields(SFTRecipeConfig)}["pad_to_multiple_of"].metadata["help"]
    assert "does not pad elsewhere" not in help_text and "128 when fp8 trains on CUDA" in help_text
    cfg = SFTRecipeConfig(output_dir=str(tmp_path), fp8=True, pad_to_multiple_of="auto")
    cfg.use_cpu = False
    monkeypatch.setattr(sft_config, "_cuda", lambda: True)
    assert cfg.resolved_pad_to_multiple_of() == 128


def test_fp8_rows_are_padded_to_the_fp8_tile_on_cuda_only(tiny_model_dir, distill_dir, tmp_path, monkeypatch):
    """`fp8: true` on the GPU pads each packed row to a multiple of 128 tokens (its FP8 GEMMs then copy no
    operand, tests/test_fp8_gemm_contract.py); a number in `pad_to_multiple_of` wins; elsewhere no padding.
    The trainer's collator takes the resolved value."""
    from posttrain.errors import ConfigError
    from posttrain.sft import config as sft_config

    on_gpu = SFTRecipeConfig(output_dir=str(tmp_path), fp8=True)
    on_gpu.use_cpu = False  # what the config resolves to on a CUDA machine
    monkeypatch.setattr(sft_config, "_cuda", lambda: True)
    assert on_gpu.resolved_pad_to_multiple_of() == 128
    on_gpu.fp8 = False
    assert on_gpu.resolved_pad_to_multiple_of() is None
    monkeypatch.setattr(sft_config, "_cuda", lambda: False)
    assert SFTRecipeConfig(output_dir=str(tmp_path), fp8=True).resolved_pad_to_multiple_of() is None
    assert SFTRecipeConfig(output_dir=str(tmp_path), pad_to_multiple_of="64").resolved_pad_to_multiple_of() == 64
    for bad in ("x", 0, -8):
        with pytest.raises(ConfigError, match="pad_to_multiple_of must be a positive integer"):
            SFTRecipeConfig(output_dir=str(tmp_path), pad_to_multiple_of=bad)
    # the trainer's collator pads by the resolved value (here as if on a GPU with fp8)
    monkeypatch.setattr(SFTRecipeConfig, "resolved_pad_to_multiple_of", lambda self: 128)
    trainer = build_trainer(_cfg(tiny_model_dir, distill_dir, tmp_path / "out"))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert trainer.data_collator.pad_to_multiple_of == 128 and batch["input_ids"].shape[1] % 128 == 0


def _train_logs(out):
    return [h for h in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_short_run_learns_and_logs(trained):
    logs = _train_logs(trained["out"])
    assert len(logs) == 20
    for key in ("loss", "lm_loss", "mtp_loss", "moe/maxvio", "grad_norm", "learning_rate",
                "train/tokens_per_second", "mtp_loss_weight", "moe/seq_balance_loss"):
        assert all(key in h for h in logs), key
    first = logs[0]["lm_loss"]
    last = sum(h["lm_loss"] for h in logs[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert sum(h["mtp_loss"] for h in logs[-3:]) / 3 < 0.8 * logs[0]["mtp_loss"]
    # loss = lm + λ·mtp + balance
    h = logs[0]
    assert h["loss"] == pytest.approx(h["lm_loss"] + 0.3 * h["mtp_loss"] + h["moe/seq_balance_loss"], rel=1e-4)
    data = trained["summary"]["data"]
    assert data["kept"] == 240 and data["packed_rows"] < 0.6 * 240 and data["pack_fill"] > 0.7, data
    assert (trained["out"] / "expert_load.png").stat().st_size > 1000


def test_checkpoint_reloads_exactly(trained, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    out = trained["out"]
    # the trained model lives on the trainer's device (cuda when there is one); the reloads on the CPU
    live = {k: v.detach().cpu() for k, v in trained["trainer"].model.state_dict().items()}
    reloaded = DeepseekV3ForCausalLMWithMTP.from_pretrained(out, dtype=torch.float32)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, live[k]), k
    plain = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers' own class
    for k, v in plain.state_dict().items():
        assert torch.equal(v, live[k]), k
    n = reloaded.config.num_hidden_layers
    saved = load_file(str(out / "model.safetensors"))
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    mtp_keys = [k for k in saved if k.startswith(f"model.layers.{n}.")]
    assert {f"model.layers.{n}.{p}.weight" for p in ("enorm", "hnorm", "eh_proj", "shared_head.norm")} <= set(mtp_keys)
    assert f"model.layers.{n}.mlp.experts.0.gate_proj.weight" in mtp_keys  # per-expert DeepSeek names
    assert not torch.equal(saved[f"model.layers.{n}.eh_proj.weight"], initial[f"model.layers.{n}.eh_proj.weight"])
    bias = f"model.layers.{n}.mlp.gate.e_score_correction_bias"
    assert saved[bias].dtype == torch.float32 and not torch.equal(saved[bias], initial[bias])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]


def test_resume_matches_uninterrupted_run(trained, tiny_model_dir, distill_dir, tmp_path, caplog):
    src = trained["out"]
    resumed = tmp_path / "resumed"
    shutil.copytree(src / "checkpoint-10", resumed / "checkpoint-10")  # "killed" after step 10 …
    partial = resumed / "checkpoint-15"  # … while writing the next checkpoint: model only, no state
    partial.mkdir()
    shutil.copy(src / "checkpoint-20" / "model.safetensors", partial / "model.safetensors")
    with caplog.at_level("WARNING", logger="posttrain.checkpoints"):
        run_sft(_cfg(tiny_model_dir, distill_dir, resumed, resume_from_checkpoint="last"))
    assert "settings that differ" not in caplog.text  # output_dir differs: bookkeeping, not a setting
    full, again = _train_logs(src), _train_logs(resumed)
    assert [h["step"] for h in again] == list(range(1, 21))
    # CPU: bit-exact. CUDA: within the fp32 drift of nondeterministic reductions (tests/resume_tolerance.py).
    from resume_tolerance import same_loss, same_maxvio

    cuda = trained["trainer"].args.device.type == "cuda"
    for a, b in zip(full[10:], again[10:]):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert a[key] == same_loss(b[key], cuda), (a["step"], key)
        assert a["moe/maxvio"] == same_maxvio(b["moe/maxvio"], cuda), a["step"]
    from safetensors.torch import load_file

    x, y = load_file(str(src / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    if cuda:  # the drift is tiny next to what the 10 resumed steps moved each weight
        start = load_file(str(src / "checkpoint-10" / "model.safetensors"))
        for k in x:
            assert float((x[k].float() - y[k].float()).norm()) <= 1e-3 * float((x[k].float() - start[k].float()).norm()) + 1e-6, k
    else:
        assert all(torch.equal(x[k], y[k]) for k in x)
    hist = torch.load(resumed / "checkpoint-20" / "moe_balancer.pt", weights_only=True)
    ref = torch.load(src / "checkpoint-20" / "moe_balancer.pt", weights_only=True)
    assert hist["history_steps"] == ref["history_steps"] == list(range(1, 21))
    if cuda:  # load fractions: a flipped token moves an entry by ~1/(routed tokens) ~ 1e-3
        torch.testing.assert_close(hist["history"], ref["history"], rtol=0, atol=2e-3)
    else:
        assert torch.equal(hist["history"], ref["history"])


def test_a_checkpoint_is_complete_before_trainer_deletes_the_older_ones(tiny_model_dir, distill_dir, tmp_path,
                                                                        monkeypatch):
    """With save_total_limit=1 Trainer deletes the previous checkpoint right after the new one's
    trainer_state.json. The balancer's state used to follow in an on_save callback, after the deletion:
    a kill in between left no checkpoint to resume from. At each deletion the new one is complete."""
    import transformers.trainer

    from posttrain.checkpoints import last_complete_checkpoint
    from posttrain.sft.run import build_trainer

    out = tmp_path / "out"
    trainer = build_trainer(_cfg(tiny_model_dir, distill_dir, out, max_steps=4, save_steps=2, save_total_limit=1))
    assert trainer.checkpoint_state_files() == ["moe_balancer.pt"]
    seen, rotate = [], transformers.trainer.rotate_checkpoints

    def rotate_and_record(*args, **kwargs):
        seen.append((trainer.state.global_step, last_complete_checkpoint(out, trainer.checkpoint_state_files())))
        return rotate(*args, **kwargs)

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", rotate_and_record)
    trainer.train()
    assert seen == [(2, str(out / "checkpoint-2")), (4, str(out / "checkpoint-4"))]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]


def test_a_resume_with_other_settings_says_which(trained, tiny_model_dir, distill_dir, tmp_path, caplog):
    """Trainer lets a restart change its settings, and the optimizer and LR schedule then continue from their
    saved state: a changed learning_rate would do nothing, silently. The resume names each change."""
    from posttrain.sft.run import build_trainer

    out = tmp_path / "out"
    shutil.copytree(trained["out"] / "checkpoint-20", out / "checkpoint-20")
    trainer = build_trainer(_cfg(tiny_model_dir, distill_dir, out, learning_rate=1e-5, max_length=200))
    with caplog.at_level("WARNING", logger="posttrain.checkpoints"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-20"))  # at max_steps: loads, trains nothing
    assert "settings that differ from the run that wrote it" in caplog.text
    assert "learning_rate: 0.003 -> 1e-05" in caplog.text and "max_length: 256 -> 200" in caplog.text
    assert "hub_token" not in (out / "checkpoint-20" / "run_config.json").read_text()


def test_a_fresh_start_over_an_earlier_run_is_refused_unless_overwritten(tiny_model_dir, distill_dir, tmp_path):
    """Trainer would write over the earlier run's checkpoints and final model, and a later resume could pick
    up one of its checkpoints (here step 7, past this run's max_steps)."""
    from posttrain.errors import ConfigError

    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(checkpoint-7\).*--resume_from_checkpoint true"):
        run_sft(_cfg(tiny_model_dir, distill_dir, out, max_steps=2))
    assert (out / "checkpoint-7").is_dir() and not (out / "model.safetensors").exists()  # nothing touched
    run_sft(_cfg(tiny_model_dir, distill_dir, out, max_steps=2, overwrite_output_dir=True))
    assert not (out / "checkpoint-7").exists() and (out / "model.safetensors").exists()


def test_an_output_dir_that_holds_a_model_is_not_written_over(tiny_model_dir, distill_dir, tmp_path):
    """`--output_dir` = `--model_name_or_path` finished with "done" and the input model's weights replaced;
    a directory holding another model was written over the same way. Both are refused, nothing touched."""
    import hashlib

    from posttrain.errors import ConfigError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match=r"is model_name_or_path: the run would write over the model it starts from"):
        run_sft(_cfg(model, distill_dir, model, max_steps=1))
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(ConfigError, match=r"output_dir \S+ holds an earlier run \(config\.json, model\.safetensors"):
        run_sft(_cfg(model, distill_dir, other, max_steps=1))
    for d in (model, other):
        assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == digest
        assert not (d / "trainer_state.json").exists()


def test_gradient_accumulation_is_token_weighted(tiny_model_dir, distill_dir, tmp_path):
    """bs 2 × 1 micro-batch and bs 1 × 2 micro-batches take the same (SGD: scale-sensitive) step."""
    states = []
    for bs, ga in ((2, 1), (1, 2)):
        cfg = _cfg(tiny_model_dir, distill_dir, tmp_path / f"ga{ga}", max_steps=1, per_device_train_batch_size=bs,
                   gradient_accumulation_steps=ga, seq_balance_alpha=0.0, save_strategy="no", optim="sgd",
                   warmup_steps=0, learning_rate=1e-1, max_grad_norm=0.0,  # no clipping: scale matters
                   save_final_model=False, max_train_samples=40)
        trainer = build_trainer(cfg)
        run_sft(cfg, trainer=trainer)
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], atol=2e-6), k


def test_mtp_loss_is_token_weighted_across_micro_batches(tiny_model_dir, tmp_path):
    """With the loss on whole samples (assistant_only_loss false) the MTP head has one target fewer per sample
    than the main head. Its mean over its own targets weighed micro-batches by the main head's counts: two
    packed rows with 2 and 1 samples gave MTP gradients ~5e-3 apart as one batch and as two micro-batches.
    Normalised by the main head's count (report eq. 24, 1/T) they agree to fp32 rounding."""
    from posttrain.sft.run import build_trainer

    data = tmp_path / "rows.jsonl"
    write_jsonl(data, sft_rows(24))
    trainer = build_trainer(_cfg(tiny_model_dir, data, tmp_path / "out", max_length=128, assistant_only_loss=False,
                                 seq_balance_alpha=0.0, save_strategy="no"))
    trainer.current_gradient_accumulation_steps = 2
    rows = sorted(trainer.train_dataset, key=lambda r: len(r["seq_lengths"]))
    rows = [rows[0], rows[-1]]  # the fewest and the most samples per row
    assert len(rows[0]["seq_lengths"]) != len(rows[1]["seq_lengths"])
    micro = [trainer.data_collator([r]) for r in rows]
    n_items = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in micro)
    model = trainer.model
    model.train()

    def grads(batches):
        model.zero_grad()
        for batch in batches:
            trainer.compute_loss(model, batch, num_items_in_batch=n_items).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    apart, together = grads(micro), grads([trainer.data_collator(rows)])
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    worst = max(float((apart[k] - together[k]).abs().max() / together[k].abs().max()) for k in together
                if k.startswith(mtp) and together[k].abs().max() > 0)
    assert worst < 1e-5, worst  # fp32 rounding: ~5e-7; before: ~5e-4


def test_lora_trains_adapters_and_merges_on_export(tiny_model_dir, distill_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    cfg = _cfg(tiny_model_dir, distill_dir, out, use_lora=True, lora_r=4, max_steps=4, save_strategy="no",
               learning_rate=1e-2, bias_update_speed=0.01, max_train_samples=40)
    trainer = build_trainer(cfg)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(".experts." in n and "shared_experts" not in n for n in names)
    run_sft(cfg, trainer=trainer)
    before, after = load_file(str(Path(tiny_model_dir) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)  # merged: the plain DeepSeek layout, no adapter keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.self_attn.q_a_proj.weight" in changed
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in changed
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in changed  # balancing still runs
    assert not any(".mlp.experts." in k or k.endswith("mlp.gate.weight") or "embed" in k for k in changed)
    DeepseekV3ForCausalLMWithMTP.from_pretrained(out)


@pytest.mark.parametrize("alpha", [0, -16])
def test_lora_alpha_must_be_positive(alpha, tmp_path):
    """LoRA scales its update by lora_alpha / lora_r: at 0 the adapters got no gradient and a run trained
    nothing but the biases (the export equalled the base model); below 0 the update's sign flipped."""
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=f"lora_alpha must be > 0 with use_lora, got {alpha}"):
        load_config(SFTRecipeConfig, None,
                    ["--output_dir", str(tmp_path), "--use_lora", "true", "--lora_alpha", str(alpha)])


@pytest.mark.parametrize("targets, message", [
    (["q_a_proj", "o_prj"], "lora_target_modules: 'o_prj' names no module of this model"),
    (["experts"], "lora_target_modules: 'experts' names .*DeepseekV3(NaiveMoe|Experts)"),
    (["gate"], "lora_target_modules: 'gate' names .*DeepseekV3TopkRouter"),
])
def test_lora_targets_are_checked_against_the_model(targets, message, tiny_model_dir, tmp_path):
    """A misspelt name among good ones was skipped silently by peft (that module simply did not train); all
    misspelt, or a non-Linear module (the fused routed experts, the router), was a peft traceback."""
    from posttrain.errors import ConfigError
    from posttrain.sft.lora import apply_lora

    cfg = build_config(SFTRecipeConfig,
                       {"output_dir": str(tmp_path), "use_lora": True, "lora_target_modules": targets})
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=message):
        apply_lora(model, cfg)


_VLLM_SCRIPT = """
import json, sys
from vllm import SamplingParams
from engines.vllm_engine import make_llm

if __name__ == "__main__":
    llm = make_llm(sys.argv[1], max_model_len=256)
    outs = llm.generate([sys.argv[2]], SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    print("RESULT" + json.dumps(list(outs[0].outputs[0].token_ids)))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_trained_checkpoint_generates_in_vllm(trained):
    """vLLM (CPU build) loads the saved checkpoint from disk and generates. In a child process: the
    session's shared engine (conftest `vllm_llm`, on the untrained checkpoint) may be alive in this
    one, and a process should hold one engine at a time."""
    import os
    import subprocess
    import sys

    prompt = trained["trainer"].processing_class.apply_chat_template(
        [{"role": "user", "content": "Mia has 3 apples. She finds 4 more apples. How many apples does Mia have?"}],
        tokenize=False, add_generation_prompt=True)
    env = repo_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(trained["out"]), prompt], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    token_ids = json.loads(lines[-1][len("RESULT"):])
    assert len(token_ids) > 0


# ---------------------------------------------------------------------------------------------
# recipes


def test_recipes_parse_with_report_defaults():
    tiny = load_config(SFTRecipeConfig, ROOT / "recipes" / "sft-tiny.yaml")
    assert tiny.bf16 is False and tiny.gradient_checkpointing is False and tiny.packing
    # bf16 is only accepted on a GPU host; use_cpu lets this CPU machine check the rest of the recipe
    real = load_config(SFTRecipeConfig, ROOT / "recipes" / "sft-deepseek-v3.yaml", {"use_cpu": True})
    assert real.bf16 and real.gradient_checkpointing and real.chunked_lm_loss
    # flex attention's document mask on one flat row per batch; parsed here, refused at load on CPU
    assert real.attn_implementation == "flex_attention" and real.resolved_padding_free()
    moon = load_config(SFTRecipeConfig, ROOT / "recipes" / "sft-moonlight-16b.yaml", {"use_cpu": True})
    assert moon.bf16 and moon.attn_implementation == "flex_attention" and moon.resolved_padding_free()
    assert real.num_train_epochs == 2 and real.learning_rate == 5e-6
    assert real.lr_scheduler_type == "cosine_with_min_lr" and real.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert real.mtp_loss_weight == 0.3 and real.mtp_loss_weight_final == 0.1
    assert real.bias_update_speed == 1e-3 and real.seq_balance_alpha == 1e-4
    defaults = SFTRecipeConfig(output_dir="x")
    assert (defaults.bf16, defaults.gradient_checkpointing, defaults.learning_rate, defaults.num_train_epochs) == (
        False, False, 5e-6, 2.0)
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="truncation"):
        build_config(SFTRecipeConfig, {"output_dir": "x", "truncation": "cut"})
    with pytest.raises(ConfigError, match="mtp_los_weight.*did you mean mtp_loss_weight"):
        build_config(SFTRecipeConfig, {"output_dir": "x", "mtp_los_weight": 0.1})


@pytest.mark.parametrize("argv, message", [
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1, got 0"),
    (["--learning_rate", "-1"], "learning_rate must be a number >= 0, got -1.0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an integer >= 1, got 0"),
    (["--use_lora", "true", "--lora_r", "0"], "lora_r must be >= 1 with use_lora, got 0"),
    (["--attn_implementation", "flashy"], "attn_implementation 'flashy' is not a known attention kernel"),
    (["--attn_implementation", "flash_attention2"], "did you mean flash_attention_2"),
    (["--lr_scheduler_kwargs", "min_lr=1"], "'lr_scheduler_kwargs' expects a mapping"),
    (["--max_length", "none"], "'max_length' expects int, got 'none'"),
    # trained nothing (or one step for 0), wrote the input model back and said "done"
    (["--max_steps", "0"], "max_steps must be an integer >= 1, or -1 to train for num_train_epochs, got 0"),
    (["--max_steps", "-5"], "max_steps must be an integer >= 1, or -1 to train for num_train_epochs, got -5"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0 when max_steps is -1, got 0"),
    # a TypeError / ValueError from the schedule once the model was loaded
    (["--lr_scheduler_kwargs", '{"min_lrr": 0.1}'], "unexpected keyword argument 'min_lrr'"),
    (["--lr_scheduler_kwargs", '{"num_cycles": 0.5}'], "One of min_lr or min_lr_rate should be set"),
    # transformers refused it once the data and the model were loaded, in a traceback
    (["--eval_strategy", "steps"], "eval_strategy 'steps' needs dataset_test_split"),
    # said "the dataset is empty" of a file with rows
    (["--max_train_samples", "0"], "max_train_samples must be an integer >= 1 (or unset for every row), got 0"),
])
def test_config_rejects_what_would_fail_only_in_the_run(argv, message, tmp_path):
    """Each used to be accepted and to fail after the model was loaded (ZeroDivisionError, peft's rank
    check, transformers' kernel check, `**` of a str) or, for max_length, the help promised None."""
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(SFTRecipeConfig, None, ["--output_dir", str(tmp_path), *argv])


def test_another_lr_schedule_does_not_inherit_the_reports_min_lr(tmp_path):
    """The default kwargs {'min_lr': 1e-6} stayed with `--lr_scheduler_type linear`, which then failed
    ("unexpected keyword argument 'min_lr'"); TRL's own default schedule takes no kwargs."""
    def kwargs(*argv):
        return load_config(SFTRecipeConfig, None, ["--output_dir", str(tmp_path), *argv]).lr_scheduler_kwargs

    assert kwargs() == kwargs("--lr_scheduler_kwargs", "{}") == {"min_lr": 1e-6}  # cosine_with_min_lr, the report's
    assert kwargs("--lr_scheduler_type", "linear") == kwargs("--lr_scheduler_type", "constant") == {}
    assert kwargs("--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}') == {"min_lr_rate": 0.1}


def test_config_accepts_every_kernel_transformers_and_this_package_offer(tmp_path):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for attn in ("eager", "sdpa_segmented", "kernels-community/flash-attn3", *ALL_ATTENTION_FUNCTIONS.valid_keys()):
        assert build_config(SFTRecipeConfig, {"output_dir": str(tmp_path), "attn_implementation": attn}
                            ).attn_implementation == attn
    assert build_config(SFTRecipeConfig, {"output_dir": str(tmp_path), "learning_rate": 0.0}).learning_rate == 0.0
    from posttrain.recipe import describe_fields

    entry = describe_fields(SFTRecipeConfig).split("--max_length ")[1].split("\n  --")[0]
    assert "no truncation" not in entry and "not None" in entry  # the help says what the check enforces


def test_on_bad_row_skip_drops_rows_the_loader_cannot_read_and_counts_them(tmp_path, tiny_model_dir, tokenizer):
    """`on_bad_row: skip` stopped at an invalid-JSON line, a string `messages` and a number `content`
    (load_rows was called without bad_rows); they are now skipped and counted with the other bad rows."""
    from posttrain.sft.run import build_train_dataset

    good = sft_rows(8)
    lines = [json.dumps(r) for r in good]
    lines[2] = '{"messages": [ {"role":"user"'  # line 3: invalid JSON
    lines[4] = json.dumps({"messages": "hello"})  # line 5: a string among lists
    lines[5] = json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]})
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "q"}]})  # line 7: no assistant turn
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tiny_model_dir, path, tmp_path / "o", on_bad_row="skip", packing=False)
    _, info = build_train_dataset(cfg, tokenizer)
    assert (info["rows"], info["bad_rows"], info["kept"]) == (8, 4, 4)
    assert sorted(int(b["location"].rsplit(" ", 1)[1]) for b in info["bad_examples"]) == [3, 5, 6, 7]
    assert all(b["location"].startswith(f"{path} line ") for b in info["bad_examples"])
    # max_train_samples: rows past the ones used (lines 1, 2, 4) are not read, so not counted
    _, info = build_train_dataset(_cfg(tiny_model_dir, path, tmp_path / "o", on_bad_row="skip",
                                       max_train_samples=3), tokenizer)
    assert (info["rows"], info["bad_rows"], info["kept"]) == (4, 1, 3)
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON"):  # error (the default) still stops
        build_train_dataset(_cfg(tiny_model_dir, path, tmp_path / "o"), tokenizer)
    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text('{"messages": [\n{oops\n')
    with pytest.raises(DataError, match=r"no trainable sample left of 2 rows \(2 bad; the first, .*all_bad\.jsonl "
                                        r"line 1: invalid JSON"):
        build_train_dataset(_cfg(tiny_model_dir, all_bad, tmp_path / "o", on_bad_row="skip"), tokenizer)




def test_eval_strategy_evaluates_the_test_split_and_refuses_a_single_file(tiny_model_dir, tmp_path):
    """With a directory of splits, eval_lm_loss is logged on the held-out rows. A single file is every split to
    the loader, so `dataset_test_split` there evaluated on the training rows without a word."""
    from posttrain.errors import ConfigError

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sft_rows(24))
    write_jsonl(data / "test.jsonl", sft_rows(30)[24:])
    cfg = _cfg(tiny_model_dir, data, tmp_path / "o", max_steps=2, eval_strategy="steps", eval_steps=2,
               dataset_test_split="test", save_strategy="no", save_final_model=False)
    trainer = build_trainer(cfg)
    assert trainer.data_info["eval"]["rows"] == 6 and trainer.data_info["rows"] == 24
    run_sft(cfg, trainer=trainer)
    assert any("eval_lm_loss" in h for h in trainer.state.log_history)
    single = _cfg(tiny_model_dir, data / "train.jsonl", tmp_path / "o2", max_steps=1, eval_strategy="steps",
                  dataset_test_split="test")
    with pytest.raises(ConfigError, match=r"is a single file, whose rows are the training split"):
        run_sft(single)


def test_the_logged_losses_do_not_move_with_how_the_batch_is_split(tiny_model_dir, tmp_path):
    """lm_loss and mtp_loss were plain means of per-micro-batch means: with samples of different lengths, 4 x 1
    and 1 x 4 logged different values for the same optimised loss. They are token-weighted now."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(8))
    logged = []
    for bs, ga in ((4, 1), (1, 4)):
        cfg = _cfg(tiny_model_dir, data, tmp_path / f"ga{ga}", max_steps=1, per_device_train_batch_size=bs,
                   gradient_accumulation_steps=ga, packing=False, save_strategy="no", save_final_model=False,
                   logging_steps=1)
        trainer = build_trainer(cfg)
        run_sft(cfg, trainer=trainer)
        logged.append(next(h for h in trainer.state.log_history if "lm_loss" in h))
    lengths = {len(r["messages"][-1]["content"]) for r in sft_rows(4)}
    assert len(lengths) > 1  # samples of different lengths: micro-batch means differ from the token mean
    for key in ("loss", "lm_loss", "mtp_loss"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5), (key, logged)
