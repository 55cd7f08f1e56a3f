"""posttrain: SFT -> DPO -> UPO post-training with LoRA on the Hugging Face stack."""

import warnings

# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so every stage, chat
# and export would print this FutureWarning; there is nothing for a user to act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
