"""Library contact points and patches live in `engines.compat` (the ground floor, so that vLLM's and the
trainers' are listed in one place); re-exported here for the trainers that import them from `posttrain`."""

from engines.compat import (  # noqa: F401
    CONTACT_POINTS,
    ContactPoint,
    apply_accelerate_fsdp2_loading,
    apply_training_patches,
    check_contact_points,
    fsdp2_load_full_state_dict,
    plain_lora_targets,
)
