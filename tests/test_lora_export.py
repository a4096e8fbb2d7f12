"""`dsv3-posttrain export`: a LoRA SFT run's checkpoint-N (peft adapter + balancer state) becomes the full
model the run would have written at that step. peft alone misloads it on transformers 5 (its MoE target
remap puts the MLP adapters on the fused routed experts) and leaves out the routers' moved biases; model
directory checks point at `export`; the adapter config names its base by an absolute path."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import cli
from data_pipelines.arith_task import sft_rows
from posttrain.errors import ConfigError
from posttrain.recipe import build_config, require_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
BIAS = "model.layers.{}.mlp.gate.e_score_correction_bias"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv3-posttrain export: error: "), lines[0]
    return lines[0]


def _lora_run(base: Path, root: Path) -> Path:
    """A LoRA SFT run of STEPS steps that saves checkpoint-STEPS: that checkpoint is the run's final model
    (output_dir). The base is given relative to the run's working directory, as a user types it."""
    from posttrain.sft import SFTRecipeConfig, run_sft

    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(16)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = build_config(SFTRecipeConfig, dict(
            model_name_or_path=os.path.relpath(base, root), dataset_name=str(data),
            output_dir=str(root / "run"), use_lora=True, lora_r=4, max_steps=STEPS, save_steps=STEPS,
            learning_rate=1e-2, bias_update_speed=0.01, per_device_train_batch_size=2, max_length=256,
            logging_steps=1, seed=0, disable_tqdm=True, report_to="none"))
        run_sft(cfg)
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _lora_run(tiny_model_dir, tmp_path_factory.mktemp("lora_export"))


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> Path:
    """checkpoint-STEPS exported from another working directory than the run's, base from the adapter config."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = elsewhere / "exported"
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert cli.main(["export", str(lora_run / f"checkpoint-{STEPS}"), "--output", "exported"]) == 0
    finally:
        os.chdir(cwd)
    return out


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # plain transformers: no project code
    ids = torch.arange(3, 67).reshape(2, 32) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_of_a_lora_checkpoint_is_the_trained_model(lora_run, exported, tiny_model_dir):
    """Before, `PeftModel.from_pretrained(base, checkpoint)` was the only way, and its logits were 0.1 off."""
    assert (exported / "config.json").is_file() and (exported / "tokenizer.json").is_file()
    assert not (exported / "adapter_config.json").exists()
    trained, out = _logits(lora_run), _logits(exported)
    assert not torch.allclose(trained, _logits(tiny_model_dir), atol=1e-3)  # the run did train
    torch.testing.assert_close(out, trained, atol=1e-5, rtol=0)


def test_exported_model_has_the_moved_router_biases(lora_run, exported, tiny_model_dir):
    """The balancer moved the biases (they are in moe_balancer.pt, not in the adapter)."""
    from safetensors.torch import load_file

    base, final, out = (load_file(str(d / "model.safetensors")) for d in (tiny_model_dir, lora_run, exported))
    assert set(out) == set(final)  # merged: the DeepSeek layout, no adapter keys
    for layer in (1, 2):  # a main MoE layer and the MTP module's
        key = BIAS.format(layer)
        assert not torch.equal(out[key], base[key]), key
        torch.testing.assert_close(out[key], final[key], atol=0, rtol=0)


def test_export_without_balancer_state_keeps_the_base_biases(lora_run, tiny_model_dir, tmp_path):
    """A run without balancing writes no moe_balancer.pt: nothing to apply, no error."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(lora_run / f"checkpoint-{STEPS}", ckpt)
    (ckpt / "moe_balancer.pt").unlink()
    assert cli.main(["export", str(ckpt), "--output", str(tmp_path / "out"), "--base", str(tiny_model_dir)]) == 0
    base, out = (load_file(str(d / "model.safetensors")) for d in (tiny_model_dir, tmp_path / "out"))
    assert torch.equal(out[BIAS.format(1)], base[BIAS.format(1)])


def test_adapter_config_names_the_base_by_absolute_path(lora_run, tiny_model_dir):
    """peft wrote the path as typed (relative), which no other working directory could load."""
    config = json.loads((lora_run / f"checkpoint-{STEPS}" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert Path(base).is_absolute(), base
    assert Path(base).resolve() == Path(tiny_model_dir).resolve()


def test_export_of_a_lora_run_on_an_fp8_base_is_its_fp8_final_model(tiny_model_dir, tmp_path):
    """An FP8 base trains as high-precision master weights and the run's final model is FP8 again
    (finalize_fp8_export); so is the export. peft recorded this base as "None" (the FP8 loader builds the
    model from a state dict), so the checkpoint named no base."""
    from safetensors.torch import load_file

    from posttrain.fp8.convert import convert_bf16_to_fp8

    convert_bf16_to_fp8(tiny_model_dir, tmp_path / "fp8", progress=False)
    run = _lora_run(tmp_path / "fp8", tmp_path)
    ckpt = run / f"checkpoint-{STEPS}"
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "fp8")
    assert cli.main(["export", str(ckpt), "--output", str(tmp_path / "out")]) == 0
    final, out = (load_file(str(d / "model.safetensors")) for d in (run, tmp_path / "out"))
    assert set(out) == set(final)
    assert out["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    for key in final:
        assert torch.equal(out[key].view(torch.uint8) if out[key].dtype == torch.float8_e4m3fn else out[key],
                           final[key].view(torch.uint8) if final[key].dtype == torch.float8_e4m3fn else final[key]), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"


def _bad_checkpoints(lora_run: Path, tiny_model_dir: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    data_dir = tmp / "not-a-checkpoint"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("{}\n")
    no_base = tmp / "no-base"
    shutil.copytree(lora_run / f"checkpoint-{STEPS}", no_base)
    config = json.loads((no_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp / "moved-model")
    (no_base / "adapter_config.json").write_text(json.dumps(config))
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    shutil.copy(lora_run / f"checkpoint-{STEPS}" / "adapter_config.json", no_weights)
    ckpt = str(lora_run / f"checkpoint-{STEPS}")
    return {
        "full checkpoint": ([str(tiny_model_dir)], f"{tiny_model_dir} is a full model checkpoint, not a LoRA one"),
        "no checkpoint": ([str(data_dir)], f"{data_dir} holds no LoRA adapter (no adapter_config.json)"),
        "missing": ([str(tmp / "nope")], f"{tmp / 'nope'} does not exist"),
        "no weights": ([str(no_weights)], f"{no_weights} has adapter_config.json but no adapter weights"),
        "base moved": ([str(no_base)], f"that is the base named in {no_base / 'adapter_config.json'}: give the "
                                       "base model with --base DIR"),
        "bad --base": ([ckpt, "--base", str(tmp / "nope")], f"base: no checkpoint directory at {tmp / 'nope'}"),
    }


@pytest.mark.parametrize("case", ["full checkpoint", "no checkpoint", "missing", "no weights", "base moved",
                                  "bad --base"])
def test_export_refuses_what_it_cannot_export_in_one_line(case, lora_run, tiny_model_dir, tmp_path, capsys):
    argv, message = _bad_checkpoints(lora_run, tiny_model_dir, tmp_path)[case]
    out = tmp_path / "out"
    assert cli.main(["export", argv[0], "--output", str(out), *argv[1:]]) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not out.exists()


def test_export_does_not_write_into_a_directory_that_holds_something(lora_run, tiny_model_dir, tmp_path, capsys):
    """The export's files would be mixed with another model's (or a run's) and the earlier ones partly written over."""
    out = tmp_path / "taken"
    shutil.copytree(tiny_model_dir, out)
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(["export", str(lora_run / f"checkpoint-{STEPS}"), "--output", str(out)]) == cli.EXIT_USER_ERROR
    assert "already exists and is not empty (holds chat_template.jinja, config.json" in _one_error_line(capsys.readouterr().err)
    assert (out / "model.safetensors").read_bytes() == before


def test_model_commands_point_a_lora_checkpoint_at_export(lora_run):
    """sft, grpo, rm and eval said only "not a checkpoint directory (no config.json in it)"."""
    ckpt = lora_run / f"checkpoint-{STEPS}"
    with pytest.raises(ConfigError, match=r"is a LoRA checkpoint \(adapter weights only.*"
                       + re.escape(f"`dsv3-posttrain export {ckpt} --output OUT`")):
        require_model_dir(ckpt, allow_hub=True)


def test_export_help_names_its_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "CHECKPOINT_DIR" in text and "--output" in text and "--base" in text
