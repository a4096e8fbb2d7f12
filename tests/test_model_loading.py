"""`load_pretrained` (posttrain.fp8.training), the one loader of SFT, GRPO, the RM and eval: a checkpoint the
user can fix is one line naming the file and the problem (a UserError: exit status 2 from the CLI, no
traceback), not a SafetensorError / OSError / StrictDataclassFieldValidationError / RuntimeError traceback.
And a checkpoint that would load with weights randomly initialised is refused: a V3 checkpoint relabelled
model_type "llama" trained with its routed experts re-initialised, only transformers' warning table said so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import UserError
from posttrain.fp8.training import load_pretrained
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny checkpoint, to corrupt."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "M"))


def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _drop_tensors(d: Path, prefix: str) -> None:
    state = load_file(d / "model.safetensors")
    kept = {k: v for k, v in state.items() if not k.startswith(prefix)}
    assert len(kept) < len(state), prefix
    save_file(kept, d / "model.safetensors", metadata={"format": "pt"})


def _load(d: Path | str, cls=DeepseekV3ForCausalLMWithMTP):
    return load_pretrained(cls, str(d), dtype=torch.float32)


def _raises(d: Path | str, message: str, cls=DeepseekV3ForCausalLMWithMTP) -> str:
    with pytest.raises(UserError) as e:
        _load(d, cls)
    text = str(e.value)
    assert "\n" not in text, text
    assert text.startswith(str(d)), text  # names the checkpoint (or the file in it)
    assert message in text, text
    return text


def test_the_intact_checkpoint_loads_and_output_loading_info_is_passed_on(model_dir):
    model, info = load_pretrained(DeepseekV3ForCausalLMWithMTP, str(model_dir), output_loading_info=True)
    assert isinstance(model, DeepseekV3ForCausalLMWithMTP) and not info["missing_keys"]
    assert isinstance(_load(model_dir), DeepseekV3ForCausalLMWithMTP)


@pytest.mark.parametrize("size, problem", [(1000, "invalid header length"), (0, "header too small"),
                                           (-1, "incomplete metadata, file not fully covered")])
def test_a_truncated_safetensors_file_is_named(model_dir, size, problem):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:size] if size >= 0 else data[: len(data) // 2])
    _raises(model_dir, f"{weights}: not a valid safetensors file ({problem})")


def test_a_directory_without_weight_files(model_dir):
    (model_dir / "model.safetensors").unlink()
    _raises(model_dir, f"{model_dir}: no weight files (model.safetensors or model-*-of-*.safetensors")


def test_a_sharded_checkpoint_whose_index_names_a_missing_shard(model_dir):
    state = load_file(model_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, model_dir / shard, metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    index = model_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    assert isinstance(_load(model_dir), DeepseekV3ForCausalLMWithMTP)  # sharded: fine
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    _raises(model_dir, f"{index}: names model-00002-of-00002.safetensors, not in {model_dir}")
    index.unlink()
    _raises(model_dir, "model-00001-of-00002.safetensors ... but no model.safetensors.index.json")


def test_no_config_json_and_config_json_that_is_not_json(model_dir):
    config = model_dir / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    _raises(model_dir, f"{config}: not valid JSON")
    config.unlink()  # transformers built DeepSeek-V3's full-size default config and failed on every shape
    _raises(model_dir, f"{model_dir}: no config.json")


def test_a_no_such_directory(tmp_path):
    _raises(tmp_path / "nope", f"{tmp_path / 'nope'}: no such directory")


def test_a_config_field_of_the_wrong_type(model_dir):
    _edit_config(model_dir, hidden_size="abc")
    _raises(model_dir, f"{model_dir}/config.json: Field 'hidden_size' expected int, got str (value: 'abc')")


def test_a_v3_checkpoint_relabelled_llama_is_refused_not_trained_with_random_experts(model_dir):
    """Was rc 0: transformers loaded it into the V3 class, reported the fused routed experts MISSING and
    initialised them randomly."""
    _edit_config(model_dir, model_type="llama")
    want = (f"{model_dir}/config.json: model_type 'llama'; this toolkit trains DeepSeek-V3-architecture "
            "checkpoints (model_type 'deepseek_v3')")
    assert _raises(model_dir, want) == want
    from transformers import DeepseekV3ForSequenceClassification  # the RM's class: the same check

    _raises(model_dir, "model_type 'llama'", cls=DeepseekV3ForSequenceClassification)


def test_a_llama_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(d)
    _raises(d, f"{d}/config.json: model_type 'llama'")


def test_missing_routed_expert_weights_are_refused(model_dir):
    _drop_tensors(model_dir, "model.layers.1.mlp.experts.")
    _raises(model_dir, f"{model_dir}: the checkpoint lacks 2 of the model's weights "
                       "(model.layers.1.mlp.experts.down_proj, model.layers.1.mlp.experts.gate_up_proj); "
                       "they would be initialised randomly")


def test_one_missing_expert_or_a_shape_that_config_json_does_not_give(model_dir, tmp_path):
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    _drop_tensors(model_dir, "model.layers.1.mlp.experts.3.")  # 7 of 8 experts: a fused stack of the wrong size
    _raises(model_dir, f"{model_dir}: weights of another shape than config.json gives them")
    _edit_config(other, vocab_size=2048)
    _raises(other, "weights of another shape than config.json gives them")


def test_a_config_promising_an_mtp_module_the_checkpoint_lacks(model_dir):
    _drop_tensors(model_dir, "model.layers.2.")  # tiny: 2 main layers, the MTP module is layer 2
    _raises(model_dir, "config.json has num_nextn_predict_layers: 1 but the checkpoint has no such MTP module")
    _edit_config(model_dir, num_nextn_predict_layers=0)
    assert not _load(model_dir).mtp_layers


def test_the_reward_backbone_loads_its_new_head_without_complaint(tiny_model_dir):
    """The score head is the classifier's own (its `_keys_to_ignore_on_load_missing`), not a missing weight."""
    from posttrain.rm.model import load_reward_backbone, load_tokenizer

    model = load_reward_backbone(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)))
    assert model.score.weight.shape[0] == 1


def test_an_fp8_checkpoint_loads_and_its_missing_experts_are_refused(tiny_model_dir, tmp_path):
    from posttrain.fp8.convert import convert_bf16_to_fp8
    from posttrain.fp8.training import fp8_source

    src = tmp_path / "fp8"
    convert_bf16_to_fp8(tiny_model_dir, src, progress=False)
    assert fp8_source(_load(src)) is not None  # the MTP module's keys and the scales: nothing missing
    _drop_tensors(src, "model.layers.1.mlp.experts.")
    _raises(src, f"{src}: the checkpoint lacks 2 of the model's weights")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _raises(src, f"{weights}: not a valid safetensors file (invalid header length)")


def test_the_cli_says_it_in_one_line_with_exit_status_2(model_dir, tmp_path, capsys):
    import cli

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(rows),
            "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (f"dsv3-posttrain sft: error: {weights}: not a valid safetensors file "
                         "(invalid header length)"), err


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_a_checkpoint_without_its_tokenizer_is_named(model_dir, tmp_path, capsys, command):
    """transformers' error was a traceback about converting a slow tokenizer (sentencepiece, tiktoken)."""
    import cli

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)})
                            + "\n" for i in range(8)))
    argv = [command, "--model_name_or_path", str(model_dir), "--dataset_name", str(rows), "--max_steps", "1",
            "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert f"model_name_or_path {model_dir}: cannot load its tokenizer (" in err.splitlines()[-1], err


def test_eval_names_a_corrupt_checkpoint_before_an_engine_reads_it(model_dir, tmp_path, capsys):
    import cli

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = ["eval", "--model_name_or_path", str(model_dir), "--num_problems", "2", "--output_dir", str(tmp_path / "e")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{weights}: not a valid safetensors file" in err.splitlines()[-1], err
