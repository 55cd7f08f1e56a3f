"""posttrain: SFT -> DPO -> UPO post-training with LoRA on the Hugging Face stack."""

import warnings


def quiet_known_warnings() -> None:
    """Silence the FutureWarnings the pinned stack raises on every stage, about names a user does not choose.

    - PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so every stage,
      chat and export would print it.
    - TRL 1.16's configs default `gradient_checkpointing=True`, the alias transformers 5.23 deprecates for
      `activation_checkpointing`, so every stage warned whatever the recipe says (and the stages set it by model size,
      `devices.speed_defaults`); transformers resolves the alias itself.
    """
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)


quiet_known_warnings()
