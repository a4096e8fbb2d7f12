"""The reward model's trainer: TRL's `RewardTrainer` with the one DeepSeek-layout checkpoint path.

The RM is saved with per-expert names (DeepSeek layout), so Trainer's own non-strict reload
(transformers 5.19) would restart the routed experts from the backbone on resume; the shared
`DeepSeekLayoutCheckpoints` loads strictly, gathers under FSDP2 and trains nothing past max_steps."""

from __future__ import annotations

from trl import RewardTrainer

from ..checkpoints import DeepSeekLayoutCheckpoints


class V3RewardTrainer(DeepSeekLayoutCheckpoints, RewardTrainer):
    """`trl.RewardTrainer` (−log σ(r_chosen − r_rejected)) on a V3 backbone."""

    def __init__(self, *args, **kwargs):
        from engines.compat import apply_training_patches, avoid_cudnn_sdpa_replanning

        apply_training_patches()  # before accelerator.prepare (FSDP2 loading), as the SFT and GRPO trainers
        avoid_cudnn_sdpa_replanning()  # pairs are padded to each batch's longest: a new length per batch
        super().__init__(*args, **kwargs)
