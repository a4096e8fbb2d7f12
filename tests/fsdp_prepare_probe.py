"""Prepares the tiny V3 model with accelerate's `fsdp2_prepare_model` (RAM-efficient loading on)
in a one-process gloo group, first with accelerate's own full-state-dict loader, then with
engines.compat's; prints what happened (tests/test_compat.py reads it).

Everything stays on the CPU, under a CUDA build of torch too: `fully_shard`'s default mesh is on
torch's compile-time accelerator (`torch._C._get_accelerator()`, CUDA on a CUDA build even with no
GPU visible), so the probe hands accelerate an explicit one-rank CPU mesh."""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist


def prepare(model):
    import accelerate.utils.fsdp_utils as fsdp_utils
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["DeepseekV3DecoderLayer", "DeepseekV3MTPLayer"],
        cpu_ram_efficient_loading=True, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    # accelerate passes fully_shard `torch_device_mesh[parallelism_config.fsdp_dim_names]`
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=True,
                                  device=torch.device("cpu"), torch_device_mesh=mesh,
                                  parallelism_config=SimpleNamespace(fsdp_dim_names=("dp_shard",)))
    return fsdp_utils.fsdp2_prepare_model(accelerator, model)


def main() -> None:
    from engines import compat
    from posttrain.distributed import full_tensor
    from posttrain.model_init import init_model
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        init_model("tiny", tmp, seed=0)
        original = DeepseekV3ForCausalLMWithMTP.from_pretrained(tmp)
    with torch.no_grad():  # make the biases distinguishable from their zero init
        for name, buf in original.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-1, 1)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    try:
        prepare(copy.deepcopy(original))
        print("stock: loaded")
    except Exception as e:  # noqa: BLE001 - reporting what accelerate raises is the point
        print(f"stock: {type(e).__name__} {e}")
    compat.apply_accelerate_fsdp2_loading()
    model = prepare(copy.deepcopy(original))
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    bad = [k for k in reference if not torch.equal(reference[k], state[k].to(reference[k].dtype))]
    print("patched: equal" if not bad and set(state) == set(reference) else f"patched: differ {bad[:5]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
